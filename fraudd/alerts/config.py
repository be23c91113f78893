"""The channels file of ``fraudd alerts`` (TOML): which alerts go where, and how.

Read and checked entirely at start-up: a bad file stops the service with one line naming the key
(``channels[1] (ops-slack).url: required``) rather than failing on the first alert. Secrets (webhook
signing keys, SMTP passwords, Slack webhook URLs, which embed a token) are read from the
environment or from files named in the config, never from the config itself; a file holding one
anyway (a ``password``, a Slack ``url``) is refused, and so is an SMTP password sent over a connection
without TLS. HTTP channels need ``https://`` unless the channel says ``allow_insecure = true``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

KINDS = ("webhook", "slack", "email")
TLS_MODES = ("starttls", "implicit", "none")
ALERT_DECISIONS = ("review", "decline")  # the non-approve decisions that the fraud stream carries (DESIGN.md)
PREFETCH_ROUNDS = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Keys that would put a secret in clear in the file: each names the way it must be given instead.
_CLEAR_SECRETS = {
    "secret": "secret_env or secret_file",
    "password": "password_env or password_file",
}
_CLEAR_SECRETS_OF_KIND = {"slack": {"url": "url_env or url_file (a Slack webhook URL carries its token)"}}


class AlertConfigError(ValueError):
    """The channels file is unusable; the message is one line naming the key."""


@dataclass(frozen=True, slots=True)
class Route:
    """Which alerts a channel receives: every condition must hold (an empty ``reasons`` matches any)."""

    decisions: frozenset[str] = frozenset(ALERT_DECISIONS)
    min_score: float = 0.0
    min_amount: float = 0.0
    reasons: frozenset[str] = frozenset()

    def matches(self, alert: dict) -> bool:
        return (
            alert.get("decision") in self.decisions
            and (alert.get("score") or 0.0) >= self.min_score
            and (alert.get("amount") or 0.0) >= self.min_amount
            and (not self.reasons or not self.reasons.isdisjoint(alert.get("reasons") or ()))
        )


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: str
    secret: str  # whsec_<base64>, the Standard Webhooks form


@dataclass(frozen=True, slots=True)
class SlackTarget:
    url: str  # the incoming-webhook URL (a secret: it carries the token)
    console_url: str | None  # link template, ``{transaction_id}`` filled in


@dataclass(frozen=True, slots=True)
class EmailTarget:
    host: str
    port: int
    tls: str
    sender: str
    recipients: tuple[str, ...]
    username: str | None
    password: str | None
    ca_file: str | None  # trust this CA (a private relay's certificate) instead of the system's
    console_url: str | None


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    name: str
    kind: str
    target: WebhookTarget | SlackTarget | EmailTarget
    route: Route = field(default_factory=Route)
    timeout_s: float = 10.0
    concurrency: int = 32
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    digest_above: int | None = None  # alerts per digest interval sent one by one; the rest go in the digest
    digest_interval_s: float = 60.0

    @property
    def prefetch(self) -> int:
        """Deliveries a worker claims ahead: a claim is a round trip, so several rounds of sends are
        claimed at once, or the channel would wait on the claims instead of its peer."""
        return PREFETCH_ROUNDS * self.concurrency

    @property
    def lease_s(self) -> float:
        """How long a claimed delivery stays the claimer's. A delivery is only attempted while a
        whole attempt still fits in its lease (``send_by``); one waiting longer is handed back."""
        return 2 * self.timeout_s + 5.0

    def send_by(self, claimed_at: float) -> float:
        """The latest (monotonic) start of an attempt claimed at ``claimed_at``."""
        return claimed_at + self.lease_s - self.timeout_s - 1.0


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    channels: tuple[ChannelConfig, ...]
    path: Path


_COMMON = {
    "name",
    "kind",
    "decisions",
    "min_score",
    "min_amount",
    "reasons",
    "timeout_s",
    "concurrency",
    "retry_base_s",
    "retry_max_s",
    "digest_above",
    "digest_interval_s",
}
_KIND_KEYS = {
    "webhook": {"url", "secret_env", "secret_file", "allow_insecure"},
    "slack": {"url_env", "url_file", "console_url", "allow_insecure"},
    "email": {"host", "port", "tls", "from", "to", "username", "password_env", "password_file", "ca_file", "console_url"},
}
_DEFAULT_CONCURRENCY = {"webhook": 64, "slack": 4, "email": 4}


def load(path: Path, environ: Mapping[str, str] | None = None) -> AlertsConfig:
    """Parse and check the channels file; raise ``AlertConfigError`` naming the first bad key."""
    variables = os.environ if environ is None else environ
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise AlertConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AlertConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(document) - {"channels"}
    if unknown:
        raise AlertConfigError(f"{path}: {min(unknown)}: unknown key (expected [[channels]])")
    tables = document.get("channels")
    if not isinstance(tables, list) or not tables:
        raise AlertConfigError(f"{path}: channels: at least one [[channels]] table is required")
    channels: list[ChannelConfig] = []
    for index, table in enumerate(tables):
        channel = _Channel(path, index, table, variables).parse()
        if any(c.name == channel.name for c in channels):
            raise AlertConfigError(f"{path}: channels[{index}].name: {channel.name!r} is used twice")
        channels.append(channel)
    return AlertsConfig(tuple(channels), path)


class _Channel:
    """One ``[[channels]]`` table being checked; every error names ``channels[i] (name).key``."""

    def __init__(self, path: Path, index: int, table: Any, environ: Mapping[str, str]) -> None:
        self.path, self.index, self.table, self.environ = path, index, table, environ
        self.label = f"channels[{index}]"

    def fail(self, key: str, why: str) -> AlertConfigError:
        return AlertConfigError(f"{self.path}: {self.label}.{key}: {why}")

    def parse(self) -> ChannelConfig:
        if not isinstance(self.table, dict):
            raise AlertConfigError(f"{self.path}: {self.label}: must be a table")
        name = self.get("name", str, required=True)
        if not _NAME.match(name):
            raise self.fail("name", f"{name!r}: letters, digits, '_', '.', '-' only, at most 64")
        self.label = f"channels[{self.index}] ({name})"
        kind = self.get("kind", str, required=True)
        if kind not in KINDS:
            raise self.fail("kind", f"{kind!r}: must be one of {', '.join(KINDS)}")
        clear_secrets = _CLEAR_SECRETS | _CLEAR_SECRETS_OF_KIND.get(kind, {})
        for key in self.table:
            if key in clear_secrets:
                raise self.fail(key, f"secrets are never read from the config; use {clear_secrets[key]}")
            if key not in _COMMON | _KIND_KEYS[kind]:
                raise self.fail(key, f"unknown key for a {kind} channel")
        decisions = self.get("decisions", list, default=list(ALERT_DECISIONS))
        bad = [d for d in decisions if d not in ALERT_DECISIONS]
        if bad or not decisions:
            raise self.fail("decisions", f"must list some of {', '.join(ALERT_DECISIONS)}, got {decisions}")
        reasons = self.get("reasons", list, default=[])
        if not all(isinstance(r, str) for r in reasons):
            raise self.fail("reasons", "must be a list of reason codes (strings)")
        route = Route(
            frozenset(decisions),
            self.number("min_score", 0.0, lo=0.0),
            self.number("min_amount", 0.0, lo=0.0),
            frozenset(reasons),
        )
        digest_above = self.get("digest_above", int, default=None)
        if digest_above is not None:
            if kind == "webhook":
                raise self.fail("digest_above", "webhook channels deliver each alert on its own (the receiver's idempotency key)")
            if digest_above < 0:
                raise self.fail("digest_above", f"must be >= 0, got {digest_above}")
        return ChannelConfig(
            name=name,
            kind=kind,
            target=getattr(self, f"_{kind}")(),
            route=route,
            timeout_s=self.number("timeout_s", 10.0, lo=0.001),
            concurrency=self.integer("concurrency", _DEFAULT_CONCURRENCY[kind], lo=1),
            retry_base_s=self.number("retry_base_s", 1.0, lo=0.001),
            retry_max_s=self.number("retry_max_s", 300.0, lo=0.001),
            digest_above=digest_above,
            digest_interval_s=self.number("digest_interval_s", 60.0, lo=0.1),
        )

    # -- kinds -----------------------------------------------------------------------------

    def _webhook(self) -> WebhookTarget:
        url = self.url("url")
        secret = self.secret("secret", required=True)
        if not secret.startswith("whsec_"):
            raise self.fail("secret_env", "the signing secret must have the Standard Webhooks form whsec_<base64>")
        try:
            if not base64.b64decode(secret[len("whsec_") :] + "==", validate=False):
                raise ValueError("empty")
        except (binascii.Error, ValueError):
            raise self.fail("secret_env", "the signing secret's whsec_ part is not base64") from None
        return WebhookTarget(url, secret)

    def _slack(self) -> SlackTarget:
        url = self.secret("url", required=True)
        self.check_scheme("url_env" if "url_env" in self.table else "url_file", url, shown="the URL")
        return SlackTarget(url, self.console_url())

    def _email(self) -> EmailTarget:
        tls = self.get("tls", str, default="starttls")
        if tls not in TLS_MODES:
            raise self.fail("tls", f"{tls!r}: must be one of {', '.join(TLS_MODES)}")
        recipients = self.get("to", list, required=True)
        if not recipients or not all(isinstance(r, str) and "@" in r for r in recipients):
            raise self.fail("to", "must list e-mail addresses")
        sender = self.get("from", str, required=True)
        if "@" not in sender:
            raise self.fail("from", f"{sender!r} is not an e-mail address")
        username = self.get("username", str, default=None)
        if username is not None and tls == "none":
            raise self.fail("tls", '"none" would send the SMTP password in clear: use starttls or implicit')
        password = self.secret("password", required=False)
        if username is not None and password is None:
            raise self.fail("password_env", "a username needs a password (password_env or password_file)")
        ca_file = self.get("ca_file", str, default=None)
        if ca_file is not None and not Path(ca_file).is_file():
            raise self.fail("ca_file", f"{ca_file}: no such file")
        default_port = {"starttls": 587, "implicit": 465, "none": 25}[tls]
        return EmailTarget(
            self.get("host", str, required=True),
            self.integer("port", default_port, lo=1, hi=65535),
            tls,
            sender,
            tuple(recipients),
            username,
            password,
            ca_file,
            self.console_url(),
        )

    # -- typed getters ---------------------------------------------------------------------

    def get(self, key: str, kind: type, required: bool = False, default: Any = None) -> Any:
        if key not in self.table:
            if required:
                raise self.fail(key, "required")
            return default
        value = self.table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {'a ' + kind.__name__ if kind is not list else 'a list'}, got {value!r}")
        return value

    def number(self, key: str, default: float, lo: float) -> float:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
            raise self.fail(key, f"must be a number >= {lo}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, lo: int, hi: int | None = None) -> int:
        value = self.get(key, int, default=default)
        if value < lo or (hi is not None and value > hi):
            raise self.fail(key, f"must be between {lo} and {hi}" if hi else f"must be >= {lo}, got {value}")
        return value

    def url(self, key: str) -> str:
        value = self.get(key, str, required=True)
        self.check_scheme(key, value, shown=repr(value))
        return value

    def check_scheme(self, key: str, url: str, shown: str) -> None:
        """``https://``, or ``http://`` where the channel allows it (a receiver on a trusted network)."""
        allow_insecure = self.get("allow_insecure", bool, default=False)
        if url.startswith("https://") or (allow_insecure and url.startswith("http://")):
            return
        if url.startswith("http://"):
            raise self.fail(key, f"{shown}: must be https:// (or set allow_insecure = true for a plain-http receiver)")
        raise self.fail(key, f"{shown}: must be an https:// URL")

    def console_url(self) -> str | None:
        template = self.get("console_url", str, default=None)
        if template is not None:
            try:
                template.format(transaction_id="x")
            except (KeyError, IndexError, ValueError):
                raise self.fail("console_url", "may only use the {transaction_id} placeholder") from None
        return template

    @overload
    def secret(self, stem: str, required: Literal[True]) -> str: ...
    @overload
    def secret(self, stem: str, required: bool) -> str | None: ...
    def secret(self, stem: str, required: bool) -> str | None:
        """``<stem>_env`` (a variable's name) or ``<stem>_file`` (a path): the secret's value."""
        env_key, file_key = f"{stem}_env", f"{stem}_file"
        if env_key in self.table and file_key in self.table:
            raise self.fail(env_key, f"give {env_key} or {file_key}, not both")
        if env_key in self.table:
            variable = self.get(env_key, str)
            value = self.environ.get(variable)
            if not value:
                raise self.fail(env_key, f"environment variable {variable} is not set")
            return value
        if file_key in self.table:
            secret_path = Path(self.get(file_key, str))
            try:
                value = secret_path.read_text().strip()
            except OSError as exc:
                raise self.fail(file_key, f"{secret_path}: cannot read: {exc.strerror or exc}") from None
            if not value:
                raise self.fail(file_key, f"{secret_path} is empty")
            return value
        if required:
            raise self.fail(env_key, f"required ({env_key} or {file_key})")
        return None
