"""The README's first command: ``fraudd demo``, the whole system end to end, kept short."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import httpx

from fraudd.localservers import free_port

from .conftest import FRAUDD


def test_demo_on_throwaway_servers_scores_everything_once_and_delivers_every_alert() -> None:
    # Nothing listens at these addresses: the demo starts its own servers and removes them after.
    env = {name: value for name, value in os.environ.items() if not name.startswith("FRAUDD_")}
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", POSTGRES_URL=f"postgresql://127.0.0.1:{free_port()}/postgres")
    result = subprocess.run(
        [FRAUDD, "demo", "--transactions", "4000", "--workers", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "starting throwaway servers" in output
    assert "every transaction scored exactly once, every alert delivered once" in output, output[-3000:]
    scored = int(re.search(r"transactions scored\s+([\d,]+)", output).group(1).replace(",", ""))
    delivered = re.search(r"alerts\s+([\d,]+) on \S+, ([\d,]+) delivered", output)
    assert 3900 <= scored <= 4000
    assert delivered and delivered.group(1) == delivered.group(2) and int(delivered.group(1).replace(",", "")) > 0
    assert re.search(r"latency\s+p50 [\d,]+ ms, p99 [\d,]+ ms", output)
    assert "removed with the demo" in output


def test_demo_ends_by_offering_the_console_on_its_cases() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FRAUDD_")}
    env.update(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", POSTGRES_URL=f"postgresql://127.0.0.1:{free_port()}/postgres")
    demo = subprocess.Popen(
        [FRAUDD, "demo", "--transactions", "2000", "--workers", "1", "--console"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            offer = re.search(
                r"console: (http://\S+)  sign in as (\S+) / (\S+) \(a lead\) to work the ([\d,]+) review cases", line
            )
            if offer:
                break
        assert offer, "".join(lines)[-3000:]
        url, username, password = offer.group(1), offer.group(2), offer.group(3)
        with httpx.Client(base_url=url, headers={"Accept": "text/html"}, timeout=10) as client:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
            client.post("/login", data={"username": username, "password": password, "csrf": token})
            # The console copies the demo's decisions into cases at its first housekeeping.
            queue = ""
            for _ in range(50):
                queue = client.get("/").text
                if "/cases/" in queue:
                    break
                time.sleep(0.2)
            assert "Claim next" in queue and "/cases/" in queue
        os.kill(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=30)
