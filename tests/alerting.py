"""Real peers for the alert tests: an HTTP server standing in for Slack and webhook receivers, and
an SMTP server (aiosmtpd), each on a free local port in a thread of its own.

The HTTP receiver behaves like a careful webhook consumer: it verifies Standard Webhooks
signatures with the ``standardwebhooks`` library and accepts each ``webhook-id`` once (a repeat is
answered 200 and counted, as an idempotent receiver would).
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import orjson
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from standardwebhooks import Webhook

from .services import free_port

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def webhook_channel(url: str, name: str = "hook", secret_env: str = "S", **settings: object) -> str:
    """One webhook ``[[channels]]`` block of an alerts file: to ``url`` over plain HTTP (the local
    receivers have no TLS), signed with the secret in the variable ``secret_env``; ``settings`` are
    more of the channel's keys (``retry_base_s=0.05``, ``decisions=["review"]``), as TOML values."""
    lines = ["[[channels]]", f'name = "{name}"', 'kind = "webhook"', f'url = "{url}"', "allow_insecure = true"]
    lines += [f'secret_env = "{secret_env}"', *(f"{key} = {orjson.dumps(value).decode()}" for key, value in settings.items())]
    return "\n".join(lines) + "\n"


@dataclass
class Failures:
    """How a path answers its next requests: ``count`` times ``status`` (with ``retry_after``, or
    ``location`` for a redirect) after ``delay_s``, with ``text`` (``{path}``: the request's path, as
    some servers echo it), then 200."""

    count: int = 0
    status: int = 500
    retry_after: str | None = None
    location: str | None = None
    delay_s: float = 0.0
    text: str = "unavailable"


@dataclass
class HttpReceiver:
    """Every path records what it received; webhooks paths (``/hook*``) verify and deduplicate."""

    port: int = field(default_factory=free_port)
    requests: dict[str, list[tuple[dict[str, str], bytes, float]]] = field(default_factory=lambda: defaultdict(list))
    accepted: dict[str, dict] = field(default_factory=dict)  # webhook-id -> body, first acceptance
    repeats: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: dict[str, Failures] = field(default_factory=dict)
    # webhook-id -> 503s still to answer it: a flaky load balancer failing some alerts, not the channel
    flaky: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, path: str) -> list[dict]:
        with self.lock:
            return [orjson.loads(body) for _h, body, _t in self.requests[path]]

    async def _handle(self, request: web.Request) -> web.Response:
        import time

        body = await request.read()
        headers = dict(request.headers)
        with self.lock:
            self.requests[request.path].append((headers, body, time.time()))
            failing = self.failures.get(request.path)
            if failing is not None and failing.count > 0:
                failing.count -= 1
            else:
                failing = None
            if self.flaky.get(headers.get("webhook-id", ""), 0) > 0:
                self.flaky[headers["webhook-id"]] -= 1
                failing = Failures(status=503)
        if failing is not None:
            await asyncio.sleep(failing.delay_s)
            extra = {"Retry-After": failing.retry_after} if failing.retry_after else {}
            if failing.location:
                extra["Location"] = failing.location
            return web.Response(status=failing.status, text=failing.text.format(path=request.path), headers=extra)
        if request.path.startswith("/hook"):
            Webhook(SECRET).verify(body, headers)  # raises: the test sees a 500 and fails on the log
            webhook_id = headers["webhook-id"]
            with self.lock:
                if webhook_id in self.accepted:
                    self.repeats[webhook_id] += 1
                else:
                    self.accepted[webhook_id] = orjson.loads(body)
        return web.Response(text="ok")

    def __enter__(self) -> HttpReceiver:
        self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024).start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        # As a real mail server answers a mailbox that does not exist.
        if address.endswith("@unknown.example"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(message_from_bytes(envelope.original_content, policy=policy.default))
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


SMTP_USER, SMTP_PASSWORD = "alerts", "s3cret-pass"


def _authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


@dataclass
class SmtpServer:
    """aiosmtpd with STARTTLS (a self-signed certificate the channel trusts via ``ca_file``) and AUTH."""

    directory: Path
    port: int = field(default_factory=free_port)

    def __enter__(self) -> SmtpServer:
        import ssl
        import subprocess

        self.cert, key = self.directory / "smtp.pem", self.directory / "smtp.key"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout",
                str(key),
                "-out",
                str(self.cert),
            ],
            check=True,
            capture_output=True,
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, key)
        self.mailbox = _Mailbox()
        self._controller = Controller(
            self.mailbox,
            hostname="127.0.0.1",
            port=self.port,
            tls_context=context,
            require_starttls=True,
            authenticator=_authenticate,
            auth_require_tls=True,
        )
        self._controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self._controller.stop()
