"""CPU time and memory of the processes a run involves, read from /proc.

Figures come from the kernel's own accounting (utime + stime), so nothing has to run inside the
measured processes. A process's ``children`` time holds the CPU of the children it has reaped:
PostgreSQL's postmaster reaps every backend, so summing it keeps the CPU of backends that exit
during a measurement.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    comm: str
    ppid: int
    cpu_s: float  # own user + system time
    children_cpu_s: float  # reaped children's user + system time
    rss_bytes: int


def read(pid: int) -> Proc | None:
    """The process's stat line, or None if it has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read().decode()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm is parenthesised and may itself hold spaces or parentheses: split at the last ')'.
    head, _, rest = line.rpartition(")")
    fields = rest.split()
    # fields[0] is the state (stat field 3): stat field k is fields[k - 3].
    return Proc(
        pid=pid,
        comm=head[head.index("(") + 1 :],
        ppid=int(fields[1]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        children_cpu_s=(int(fields[13]) + int(fields[14])) / CLOCK_TICKS,
        rss_bytes=int(fields[21]) * PAGE_BYTES,
    )


def run_s(pid: int) -> float:
    """The process's CPU time to the nanosecond (``/proc/<pid>/schedstat``), where ``read`` counts
    10 ms ticks: what a COPY of a few milliseconds is measured by."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def all_processes() -> list[Proc]:
    procs = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = read(int(name))
            if proc is not None:
                procs.append(proc)
    return procs


def tree(roots: Iterable[int], procs: list[Proc]) -> list[Proc]:
    """``roots`` and all their descendants among ``procs``."""
    children: dict[int, list[Proc]] = {}
    by_pid = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
        by_pid[proc.pid] = proc
    found = [by_pid[pid] for pid in roots if pid in by_pid]
    todo = list(found)
    while todo:
        for child in children.get(todo.pop().pid, []):
            found.append(child)
            todo.append(child)
    return found


def total_cpu_s(procs: Iterable[Proc]) -> float:
    return sum(p.cpu_s + p.children_cpu_s for p in procs)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle since boot: the yardstick for "other" load."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    # guest time is already counted in user/nice
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    proc = read(pid)
    return None if proc is None else proc.rss_bytes
