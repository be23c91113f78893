"""``python -m bench.receiver --port P --secret whsec_…``: the webhook receiver of ``bench alerts``.

A lean aiohttp server in its own process that does what a careful receiver does per request:
verify the Standard Webhooks signature (with the ``standardwebhooks`` library) and drop a
``webhook-id`` it has already accepted. It records each first arrival's time; ``GET /stats``
returns them (webhook-id -> epoch seconds) with the count of repeats and of bad signatures, the
time of every request answered (``requests``, refused ones included) and of the last request of a
webhook-id never seen before (``last_new_request``: every alert had its first attempt by then).
``GET /arrivals`` returns only how many webhook-ids arrived: what a waiting bench polls, so that
serialising every arrival ten times a second does not take the CPU of the service being measured.

``--flaky-every N``: a flaky load balancer in front of it; the alerts of one webhook-id in N (chosen
by a hash of the id, the same in every run) are answered 503 twice, then served.
"""

from __future__ import annotations

import time
import zlib

import click
import orjson
import uvloop
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--secret", required=True)
@click.option("--flaky-every", type=int, default=0, help="Answer 503 twice to one webhook-id in this many (0: never).")
def main(port: int, secret: str, flaky_every: int) -> None:
    verifier = Webhook(secret)
    arrivals: dict[str, float] = {}
    counts = {"repeats": 0, "bad_signatures": 0, "failed_503": 0}
    failed: dict[str, int] = {}
    requests: list[float] = []
    seen: set[str] = set()
    last_new_request = [0.0]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        webhook_id = request.headers.get("webhook-id", "")
        requests.append(time.time())
        if webhook_id not in seen:
            seen.add(webhook_id)
            last_new_request[0] = requests[-1]
        if flaky_every and zlib.crc32(webhook_id.encode()) % flaky_every == 0 and failed.get(webhook_id, 0) < 2:
            failed[webhook_id] = failed.get(webhook_id, 0) + 1
            counts["failed_503"] += 1
            return web.Response(status=503, text="upstream unavailable")
        try:
            verifier.verify(body, dict(request.headers), json_parse=False)
        except WebhookVerificationError:
            counts["bad_signatures"] += 1
            return web.Response(status=400, text="bad signature")
        webhook_id = request.headers["webhook-id"]
        if webhook_id in arrivals:
            counts["repeats"] += 1
        else:
            arrivals[webhook_id] = time.time()
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"arrivals": arrivals, "requests": requests, "last_new_request": last_new_request[0], **counts}),
            content_type="application/json",
        )

    async def arrived(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"arrivals": len(arrivals)}), content_type="application/json")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_get("/arrivals", arrived)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=lambda line: print("ready", flush=True), backlog=1024)


if __name__ == "__main__":
    main()
