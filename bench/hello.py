"""``python -m bench.hello PORT WORKERS``: the HTTP stack's own ceiling for ``bench ingest``.

aiohttp on uvloop, the same socket sharing as ``fraudd ingest`` (bound once, ``WORKERS`` forked
processes accepting on it), answering every POST with a fixed 202 after reading the body, and
``/healthz``: no validation, no Redis, no metrics.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import uvloop
from aiohttp import web

ANSWER = b'{"id":"1764385200000-0","transaction_id":"txn_ab12"}'


async def accepted(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=ANSWER, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def serve(sock: socket.socket) -> None:
    app = web.Application()
    app.router.add_post("/v1/transactions", accepted)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    await stop
    await runner.cleanup()


def main() -> None:
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            uvloop.run(serve(sock))
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, lambda signum, frame: [os.kill(pid, signal.SIGTERM) for pid in children])
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue


if __name__ == "__main__":
    main()
