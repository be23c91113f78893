"""``fraudd ingest`` as a real server process for the HTTP tests, and what they send it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

from .conftest import FRAUDD, Namespace
from .services import free_port

NOW = int(time.time())


def tx(txid: str, **fields) -> dict:
    """One valid transaction (DESIGN.md's input message)."""
    return {
        "transaction_id": txid,
        "user_id": fields.pop("user_id", "user_1"),
        "amount": fields.pop("amount", 42.5),
        "merchant": fields.pop("merchant", "Amazon"),
        "timestamp": fields.pop("timestamp", NOW - 60),
        **fields,
    }


@dataclass
class IngestServer:
    process: subprocess.Popen
    port: int
    log_path: Path
    scheme: str = "http"

    @classmethod
    def start(
        cls,
        ns: Namespace,
        tmp_path: Path,
        *args: str,
        scheme: str = "http",
        host: str = "127.0.0.1",
        wait: bool = True,
        **env: str,
    ) -> IngestServer:
        port = free_port()
        log_path = tmp_path / f"ingest-{port}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [FRAUDD, "ingest", "--listen", f"{host}:{port}", *args],
                env=ns.env(**env),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        server = cls(process, port, log_path, scheme)
        if wait:
            server.wait_ready()
        return server

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"fraudd ingest exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"fraudd ingest not ready after {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def post(client: httpx.Client, path: str, body, headers: dict | None = None) -> httpx.Response:
    """POST ``body`` (bytes as is, anything else as JSON) with ``Content-Type: application/json``."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(path, content=content, headers={"Content-Type": "application/json", **(headers or {})})
