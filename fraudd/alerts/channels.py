"""The three kinds of channel: a signed JSON webhook, a Slack incoming webhook, SMTP e-mail.

Each channel sends one alert (``send``) or, for Slack and e-mail under storm control, one digest
of many (``send_digest``), and says why an attempt failed by raising ``DeliveryFailed`` (with the
wait the peer asked for, when it did: HTTP ``Retry-After``, Slack's 429; or that retrying is pointless:
a 4xx answer other than 408, 425 and 429, an SMTP 5xx reply; or that the peer could not be reached
at all). Redirects are never followed: a 3xx is a failed attempt, so a signed body never goes to a
place the channels file does not name. Error texts pass through ``redact`` before they reach a log,
the delivery table or the DLQ: a Slack URL (and any webhook URL's path and query) is a secret.
Clients are opened once
per worker process and kept: one aiohttp session with a bounded keep-alive pool per HTTP channel,
a small pool of authenticated SMTP connections per e-mail channel.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import hmac
import html
import ssl
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime

import aiohttp
import aiosmtplib
import orjson

from .config import ChannelConfig, EmailTarget, SlackTarget, WebhookTarget

DIGEST_LISTED = 20  # alerts named one by one in a digest; the rest are counted
_ERROR_BODY_CHARS = 200


# 4xx answers that say "later", not "never": request timeout, too early, too many requests.
_HTTP_TRANSIENT = frozenset({408, 425, 429})


class DeliveryFailed(Exception):
    """One attempt failed; ``retry_after`` is the wait the peer asked for, if it did. ``permanent``:
    the peer refused this alert for good (it answered, so the channel itself is not down).
    ``unreachable``: no connection to the peer at all (refused, no route, no name, TLS handshake),
    which says the whole channel is down, not this alert."""

    def __init__(self, reason: str, retry_after: float | None = None, permanent: bool = False, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.permanent = permanent
        self.unreachable = unreachable


@dataclass(slots=True)
class Alert:
    """One alert for one channel: the fraud stream's ``data`` document, as sent and parsed."""

    transaction_id: str
    stream_id: str
    body: bytes  # the ``data`` JSON, the body of a webhook
    parsed: dict | None = None

    @property
    def document(self) -> dict:
        """The parsed document, parsed on first use: a webhook sends the body as it is."""
        if self.parsed is None:
            self.parsed = orjson.loads(self.body)
        return self.parsed


class Channel(abc.ABC):
    """What every kind offers; ``open`` and ``close`` bracket the worker process's life."""

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self.name = config.name
        self._secrets: tuple[str, ...] = ()  # texts that must never appear in an error

    def redact(self, text: str) -> str:
        """``text`` without any secret of this channel's target (its URL's path and query)."""
        for secret in self._secrets:
            text = text.replace(secret, "/[redacted]")
        return text

    async def open(self) -> None:  # noqa: B027  optional: only a kind with clients to open overrides it
        pass

    async def close(self) -> None:  # noqa: B027  likewise
        pass

    @abc.abstractmethod
    async def send(self, alert: Alert) -> None:
        """Deliver one alert or raise ``DeliveryFailed``."""

    async def send_digest(self, alerts: list[Alert], digest_id: str) -> None:
        """Deliver one digest of ``alerts`` (storm control); the config refuses digests where unsupported."""
        raise TypeError(f"{self.config.kind} channels send no digests")


class _HttpChannel(Channel):
    def __init__(self, config: ChannelConfig, url: str) -> None:
        super().__init__(config)
        self._url = url
        parts = urllib.parse.urlsplit(url)
        token = parts.path + (f"?{parts.query}" if parts.query else "")
        # As given and as an HTTP client or server may print it back (percent-encoded or not).
        self._secrets = tuple(
            sorted(
                {t for t in (token, urllib.parse.unquote(token), urllib.parse.quote(token, safe="/?=&")) if t.strip("/")},
                key=len,
                reverse=True,
            )
        )

    async def open(self) -> None:
        # No cookie jar, no decompression, no automatic headers: a delivery needs none, and each
        # is per-request work on the path of every alert.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.concurrency, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"User-Agent": "fraudd-alerts"},
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                if response.status < 300:
                    await response.read()
                    return
                text = (await response.text(errors="replace"))[:_ERROR_BODY_CHARS]
                raise DeliveryFailed(
                    f"HTTP {response.status}: {' '.join(text.split())}",
                    _retry_after(response.headers.get("Retry-After")),
                    permanent=400 <= response.status < 500 and response.status not in _HTTP_TRANSIENT,
                )
        except aiohttp.ClientConnectorError as exc:  # TLS handshake failures included
            raise DeliveryFailed(describe(exc), unreachable=True) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryFailed(describe(exc)) from None


class WebhookChannel(_HttpChannel):
    """Standard Webhooks: body = the alert's ``data``; ``webhook-id`` = ``<transaction_id>:<channel>``,
    the same on every attempt, so the receiver can drop a repeat after a crash between sending and
    recording; the signature is made afresh per attempt so that a late retry is not "too old"."""

    def __init__(self, config: ChannelConfig) -> None:
        target = config.target
        assert isinstance(target, WebhookTarget)
        super().__init__(config, target.url)
        self._key = base64.b64decode(target.secret[len("whsec_") :] + "==")

    def headers(self, alert: Alert, timestamp: int) -> dict[str, str]:
        webhook_id = f"{alert.transaction_id}:{self.name}"
        signed = b"%s.%d.%s" % (webhook_id.encode(), timestamp, alert.body)
        signature = base64.b64encode(hmac.digest(self._key, signed, hashlib.sha256)).decode()
        return {
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": f"v1,{signature}",
        }

    async def send(self, alert: Alert) -> None:
        await self._post(self._url, alert.body, self.headers(alert, int(time.time())))


class SlackChannel(_HttpChannel):
    """A Block Kit message per alert (amount, user, merchant, score, decision, reasons, a console link)."""

    def __init__(self, config: ChannelConfig) -> None:
        target = config.target
        assert isinstance(target, SlackTarget)
        super().__init__(config, target.url)
        self._console_url = target.console_url

    async def send(self, alert: Alert) -> None:
        await self._post(
            self._url, orjson.dumps(slack_message(alert.document, self._console_url)), {"Content-Type": "application/json"}
        )

    async def send_digest(self, alerts: list[Alert], digest_id: str) -> None:
        await self._post(
            self._url,
            orjson.dumps(slack_digest(alerts, self.config.digest_interval_s, self._console_url)),
            {"Content-Type": "application/json"},
        )


class EmailChannel(Channel):
    """One message per alert (plain-text and HTML parts) over a pool of kept SMTP connections."""

    def __init__(self, config: ChannelConfig) -> None:
        super().__init__(config)
        target = config.target
        assert isinstance(target, EmailTarget)
        self._target = target
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(config.concurrency)

    async def close(self) -> None:
        for client in self._idle:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()
        self._idle.clear()

    def _client(self) -> aiosmtplib.SMTP:
        t = self._target
        context = ssl.create_default_context(cafile=t.ca_file) if t.tls != "none" else None
        return aiosmtplib.SMTP(
            hostname=t.host,
            port=t.port,
            username=t.username,
            password=t.password,
            use_tls=t.tls == "implicit",
            start_tls=t.tls == "starttls",
            tls_context=context,
            timeout=self.config.timeout_s,
        )

    async def send(self, alert: Alert) -> None:
        await self._deliver(email_message(alert.document, self._target, self.name, self._target.console_url))

    async def send_digest(self, alerts: list[Alert], digest_id: str) -> None:
        await self._deliver(email_digest(alerts, self._target, self.name, digest_id, self.config.digest_interval_s))

    async def _deliver(self, message: EmailMessage) -> None:
        async with self._slots:
            client = self._idle.pop() if self._idle else self._client()
            try:
                if not client.is_connected:
                    await client.connect()
                await client.send_message(message)
            except (aiosmtplib.SMTPConnectError, ssl.SSLError, ConnectionRefusedError) as exc:
                client.close()
                raise DeliveryFailed(describe(exc), unreachable=True) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                raise DeliveryFailed(describe(exc), permanent=_smtp_permanent(exc)) from None
            self._idle.append(client)


def open_channel(config: ChannelConfig) -> Channel:
    kinds: dict[str, type[Channel]] = {"webhook": WebhookChannel, "slack": SlackChannel, "email": EmailChannel}
    return kinds[config.kind](config)


# -- message content -----------------------------------------------------------------------


def _slack_escape(text: object) -> str:
    """Slack's escaping of message text: ``& < >`` only, so that an identifier can never become a
    mention (``<!channel>``), a link or a user reference."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def console_link(template: str, transaction_id: str) -> str:
    """The console URL of a transaction, its id percent-encoded (it may hold ``/``, ``?``, ``#``…)."""
    return template.format(transaction_id=urllib.parse.quote(transaction_id, safe=""))


def _money(document: dict) -> str:
    return f"{document.get('amount', 0):,.2f} {document.get('currency') or 'USD'}"


def _headline(document: dict) -> str:
    return (
        f"{str(document.get('decision', '?')).upper()}: {_money(document)} at {document.get('merchant', '?')} "
        f"by {document.get('user_id', '?')} (score {document.get('score', 0):.3f})"
    )


def explanation_text(document: dict, top: int = 3) -> str | None:
    """The features that moved the score most, either way: ``name = value (+contribution)``.

    From the row's exact explanation (``transactions.explanation``); None when the row has none.
    """
    explanation = document.get("explanation")
    if not explanation:
        return None
    values = explanation.get("values") or {}
    strongest = sorted(explanation["contributions"].items(), key=lambda item: -abs(item[1]))[:top]
    return ", ".join(f"{name} = {_number(values.get(name))} ({contribution:+.2f})" for name, contribution in strongest)


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "?"


def _fields(document: dict) -> list[tuple[str, object]]:
    """What a person reads about one alert, in order (the Slack fields and the e-mail table)."""
    fields = [
        ("Amount", _money(document)),
        ("User", document.get("user_id")),
        ("Merchant", document.get("merchant")),
        ("Score", f"{document.get('score', 0):.3f}"),
        ("Decision", document.get("decision")),
        ("Reasons", ", ".join(map(str, document.get("reasons") or [])) or "none"),
    ]
    why = explanation_text(document)
    if why:
        fields.append(("Why (log-odds)", why))
    return fields


def slack_message(document: dict, console_url: str | None) -> dict:
    txid = str(document.get("transaction_id"))
    fields = _fields(document)
    blocks: list[dict] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Fraud alert: {str(document.get('decision')).upper()}"}},
        {
            "type": "section",
            "fields": [{"type": "mrkdwn", "text": f"*{label}*\n{_slack_escape(value)}"} for label, value in fields],
        },
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"transaction `{_slack_escape(txid)}`"}]},
    ]
    if console_url:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in console"},
                        "url": console_link(console_url, txid),
                    }
                ],
            }
        )
    return {"text": f"Fraud alert {_slack_escape(_headline(document))}", "blocks": blocks}


def _digest_lines(alerts: list[Alert]) -> tuple[str, list[str]]:
    decisions = Counter(a.document.get("decision") for a in alerts)
    total = sum(float(a.document.get("amount") or 0) for a in alerts)
    summary = f"{len(alerts)} alerts ({', '.join(f'{n} {d}' for d, n in sorted(decisions.items()))}), {total:,.2f} in total"
    return summary, [_headline(a.document) + f" [{a.transaction_id}]" for a in alerts[:DIGEST_LISTED]]


def slack_digest(alerts: list[Alert], interval_s: float, console_url: str | None) -> dict:
    summary, lines = _digest_lines(alerts)
    more = len(alerts) - len(lines)
    text = "\n".join(f"• {_slack_escape(line)}" for line in lines) + (f"\n… and {more} more in alert_deliveries" if more else "")
    return {
        "text": f"Fraud alert digest: {_slack_escape(summary)}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": f"Fraud alert digest: {len(alerts)} alerts"}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"{_slack_escape(summary)} within {interval_s:g}s (storm control)"},
            },
            {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}},
        ],
    }


def email_message(document: dict, target: EmailTarget, channel: str, console_url: str | None) -> EmailMessage:
    txid = str(document.get("transaction_id"))
    rows = [("Transaction", txid), *_fields(document)]
    link = console_link(console_url, txid) if console_url else None
    plain = "\n".join(f"{label}: {value}" for label, value in rows) + (f"\n\n{link}\n" if link else "\n")
    cells = "".join(
        f"<tr><th align=left>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>" for label, value in rows
    )
    anchor = f'<p><a href="{html.escape(link)}">Open in console</a></p>' if link else ""
    # A stable Message-ID: a repeat after a crash between sending and recording is recognisable.
    return _envelope(
        f"[fraudd] {_headline(document)}", plain, f"<table>{cells}</table>{anchor}", target, f"<{txid}.{channel}@fraudd>"
    )


def email_digest(alerts: list[Alert], target: EmailTarget, channel: str, digest_id: str, interval_s: float) -> EmailMessage:
    summary, lines = _digest_lines(alerts)
    more = len(alerts) - len(lines)
    tail = f"… and {more} more in alert_deliveries (digest {digest_id})" if more else f"(digest {digest_id})"
    plain = f"{summary} within {interval_s:g}s (storm control)\n\n" + "\n".join(lines) + f"\n{tail}\n"
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return _envelope(
        f"[fraudd] digest: {summary}",
        plain,
        f"<p>{html.escape(summary)}</p><ul>{items}</ul><p>{html.escape(tail)}</p>",
        target,
        f"<{digest_id}.{channel}@fraudd>",
    )


def _envelope(subject: str, plain: str, body_html: str, target: EmailTarget, message_id: str) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = target.sender
    message["To"] = ", ".join(target.recipients)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id
    message.set_content(plain)
    message.add_alternative(f"<html><body>{body_html}</body></html>", subtype="html")
    return message


# -- failures ------------------------------------------------------------------------------


def _smtp_permanent(exc: BaseException) -> bool:
    """A 5xx reply (unknown recipient, message or credentials refused) stays the same however often asked."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(_smtp_permanent(refused) for refused in exc.recipients)
    return 500 <= getattr(exc, "code", 0) < 600


def _retry_after(header: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds; an HTTP date is read as its distance)."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def describe(exc: BaseException) -> str:
    """One line naming what went wrong, short enough for a log field and a table column."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:_ERROR_BODY_CHARS] if text else type(exc).__name__
