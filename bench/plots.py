"""Pictures of a bench run, written next to ``bench/RESULTS.md`` by the command that measured them.

``latency.png``: p50/p99/p99.9 against the offered load, up to the highest rate run, and the
latency CDF at the rate nearest half the maximum. ``throughput.png``: CPU-µs per transaction of
each drain, stacked by process, and fraudd's workers split by stage. ``soak.png``: each process's
CPU-µs per transaction minute by minute, against the rows stored and the lag, so a cost that grows
with time or data shows as a slope. Drawn with matplotlib's
file-only backend: no display is needed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

HERE = Path(__file__).parent
CURVES = (("p50", "p50"), ("p99", "p99"), ("p99.9", "p99.9"))
PROCESSES = ("workers", "consumers", "supervisor", "redis", "postgres", "producer")


def latency(result: dict, title: str, directory: Path = HERE) -> Path:
    phases = sorted(result["phases"], key=lambda p: p["target_rate"])
    figure, (curves, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = [p["target_rate"] for p in phases]
    for key, label in CURVES:
        curves.plot(rates, [p["latency_ms"].get(key) for p in phases], marker="o", label=label)
    curves.set(xlabel="offered load, tx/s", ylabel="latency, ms (log)", yscale="log", title="latency against offered load")
    _plain(curves.yaxis)
    curves.grid(True, which="both", alpha=0.3)
    curves.legend()
    half = min(phases, key=lambda p: abs(p["fraction_of_max"] - 0.5))
    points = half["latency_cdf"]
    cdf.plot(points["ms"], points["fraction"], drawstyle="steps-post")
    cdf.set(
        xlabel="latency, ms (log)",
        ylabel="fraction of transactions",
        xscale="log",
        title=f"CDF at {half['fraction_of_max']:.0%} of max ({half['target_rate']:,.0f} tx/s)",
    )
    _plain(cdf.xaxis)
    cdf.grid(True, which="both", alpha=0.3)
    figure.suptitle(textwrap.fill(f"{title} (latency source: {result['latency_source']})", 140), fontsize=9)
    return _save(figure, directory / "latency.png")


def throughput(result: dict, title: str, directory: Path = HERE) -> Path:
    drains = result["drains"]
    bars: list[tuple[str, dict[str, float]]] = []
    off_scale: list[str] = []
    for kind, drain in drains.items():
        cpu = drain["cpu_us_per_tx"]
        parts = {p: cpu[p] for p in PROCESSES if cpu.get(p)}
        if kind == "naive":  # an order of magnitude above the rest: named, not drawn
            off_scale.append(f"naive (per message): {sum(parts.values()):,.0f} CPU-µs/tx, off scale")
            continue
        bars.append((kind, parts))
        stages = drain.get("worker_stages_cpu_us_per_tx")
        if stages:
            bars.append((f"{kind} workers by stage\n(split by wall-time share)", stages))
    figure, axes = plt.subplots(figsize=(9, 5))
    for i, (_name, parts) in enumerate(bars):
        bottom = 0.0
        for part, value in parts.items():
            axes.bar(i, value, bottom=bottom, color=_colour(part), edgecolor="white")
            if value >= 1.5:
                axes.text(i, bottom + value / 2, f"{part} {value:.1f}", ha="center", va="center", fontsize=8)
            bottom += value
        axes.text(i, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontweight="bold")
    axes.set_xticks(range(len(bars)), [name for name, _ in bars])
    axes.set_ylabel("CPU-µs per transaction")
    axes.set_title(textwrap.fill(title, 100), fontsize=9)
    if off_scale:
        axes.text(0.99, 0.97, "\n".join(off_scale), transform=axes.transAxes, ha="right", va="top", fontsize=8)
    axes.grid(True, axis="y", alpha=0.3)
    return _save(figure, directory / "throughput.png")


def soak(result: dict, title: str, directory: Path = HERE) -> Path:
    minutes = result["per_minute"]
    figure, (cost, state) = plt.subplots(1, 2, figsize=(12, 4.5))
    t = [w["t"] for w in minutes]
    for process in ("workers", "redis", "postgres", "postgres_backends", "producer"):
        values = [w["cpu_us_per_tx"].get(process) for w in minutes]
        if any(v is not None for v in values):
            cost.plot(t, values, marker="o", label=process, color=_colour(process))
    cost.set(xlabel="seconds into the run", ylabel="CPU-µs per transaction", title="cost per transaction, minute by minute")
    cost.set_ylim(bottom=0)
    cost.grid(True, alpha=0.3)
    cost.legend(fontsize=8)
    state.plot(t, [w["rows"] / 1e6 for w in minutes], marker="o", label="rows stored (millions)")
    state.plot(t, [w["lag"] / 1e6 for w in minutes], marker="o", label="lag (millions of entries)")
    state.set(xlabel="seconds into the run", title="what the run had stored, and how far behind it was")
    state.grid(True, alpha=0.3)
    state.legend(fontsize=8)
    figure.suptitle(textwrap.fill(title, 140), fontsize=9)
    return _save(figure, directory / "soak.png")


def _plain(axis) -> None:
    """Plain numbers at 1, 2, 5 × 10^k on a log axis; no minor labels (they overlap)."""
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


_COLOURS: dict[str, str] = {}


def _colour(part: str) -> str:
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return _COLOURS.setdefault(part, palette[len(_COLOURS) % len(palette)])


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
