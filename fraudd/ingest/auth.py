"""Who may write what: API keys with scopes, and optionally a signature over each request.

Keys come from ``--api-keys-file`` (one per line, ``#`` comments) and ``--api-keys`` /
``FRAUDD_API_KEYS`` (comma-separated). An entry is either

- ``KEY_ID:TOKEN:SIGNING_SECRET[:SCOPE+SCOPE...]``: the key ``KEY_ID`` (named in the logs), sent
  as ``Authorization: Bearer TOKEN``, signing with ``SIGNING_SECRET`` (may be empty: the key
  cannot sign), allowed the routes of its scopes (default ``transactions+score``); or
- a bare ``TOKEN`` (as files written before scopes and signing secrets hold): scopes
  ``transactions`` and ``score``, no signing secret.

Scopes: ``transactions`` (``POST /v1/transactions`` and ``/batch``), ``score`` (``POST
/v1/score``), ``labels`` (``POST /v1/labels``): labels are the training data, so a key that may
post transactions cannot relabel them unless given ``labels``.

The file is re-read on SIGHUP, by the supervisor (whose keys every respawned server process
inherits) and by every server process. A reload that cannot read the file, finds an entry it
cannot parse, would leave no key at all, or (with ``--require-signature``) a key without a
signing secret is refused and logged as an error: the keys in use stay. Authentication, once on,
never turns off by a reload.

A presented token is compared with every configured key in constant time (``hmac.compare_digest``
over SHA-256 digests, all of them, no early exit), so response timing tells an attacker nothing
about how close a guess was.

Signing (``--require-signature``): the client sends ``X-Fraudd-Timestamp: <Unix seconds>`` and
``X-Fraudd-Signature: v2=<hex HMAC-SHA256 keyed with the key's signing secret>`` of
``"<timestamp>\\n<METHOD>\\n<request target>\\n"`` followed by the body, the request target being
the path (and query) as sent. The secret never travels, so a captured request neither reveals how
to sign another nor verifies against another method, path or body. A timestamp outside
``--signature-window-s`` of the server's clock is refused, and so is a signature seen before within
the window (kept in Redis, so every ingest process and host sees it): a captured request cannot be
replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Fraudd-Timestamp"
SIGNATURE_HEADER = "X-Fraudd-Signature"
SIGNATURE_VERSION = "v2="
SCOPES = ("transactions", "score", "labels")
DEFAULT_SCOPES = frozenset(("transactions", "score"))
KEY_FORMAT = "TOKEN or KEY_ID:TOKEN:SIGNING_SECRET[:SCOPE+SCOPE...]"


class KeysError(ValueError):
    """The keys cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    token_digest: bytes  # SHA-256 of the token: what a presented token is compared with
    signing_secret: bytes | None
    scopes: frozenset[str]


def parse_key(entry: str, where: str) -> ApiKey:
    """One key from its entry (see the module docstring); ``where`` names it in errors."""
    fields = entry.split(":")
    if len(fields) == 1:
        digest = hashlib.sha256(entry.encode()).digest()
        return ApiKey("sha256:" + digest.hex()[:12], digest, None, DEFAULT_SCOPES)
    if len(fields) not in (3, 4):
        raise KeysError(f"{where}: expected {KEY_FORMAT}")
    key_id, token, secret = (f.strip() for f in fields[:3])
    if not key_id or not token:
        raise KeysError(f"{where}: KEY_ID and TOKEN must not be empty")
    scopes = DEFAULT_SCOPES
    if len(fields) == 4:
        scopes = frozenset(s.strip() for s in fields[3].split("+"))
        unknown = sorted(scopes - set(SCOPES))
        if unknown or not scopes:
            raise KeysError(f"{where}: unknown scope {', '.join(unknown) or '(none)'} (scopes: {'+'.join(SCOPES)})")
    return ApiKey(key_id, hashlib.sha256(token.encode()).digest(), secret.encode() or None, scopes)


def load_keys(path: Path | None, inline: str | None) -> list[ApiKey]:
    """Every configured key, from the file and the comma-separated ``inline`` list."""
    entries = [("--api-keys", entry.strip()) for entry in (inline or "").split(",")]
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysError(f"--api-keys-file: cannot read {path}: {exc}") from None
        entries += [(f"{path}:{number}", line.split("#", 1)[0].strip()) for number, line in enumerate(text.splitlines(), 1)]
    keys = [parse_key(entry, where) for where, entry in entries if entry]
    for attribute in ("key_id", "token_digest"):
        values = [getattr(key, attribute) for key in keys]
        if len(set(values)) < len(values):
            raise KeysError(f"API keys: two keys share a {'key id' if attribute == 'key_id' else 'token'}")
    return keys


class Authenticator:
    """Checks ``Authorization: Bearer <token>`` against the configured keys; ``reload`` on SIGHUP."""

    def __init__(self, path: Path | None, inline: str | None, require_signature: bool = False) -> None:
        self._path = path
        self._inline = inline
        self._require_signature = require_signature
        self._keys: list[ApiKey] = []
        self._keys = self._load()
        self._log_loaded()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _load(self) -> list[ApiKey]:
        """The keys as configured now; refuses a set this process must not switch to."""
        keys = load_keys(self._path, self._inline)
        if self._keys and not keys:
            raise KeysError("no API key left: authentication would turn off")
        if self._require_signature:
            if not keys:
                raise KeysError("--require-signature needs API keys (--api-keys-file / FRAUDD_API_KEYS)")
            unsigned = [key.key_id for key in keys if key.signing_secret is None]
            if unsigned:
                raise KeysError(f"--require-signature: keys without a signing secret: {', '.join(unsigned)}")
        return keys

    def reload(self) -> None:
        """Re-read the keys; a set that cannot be used keeps the keys in use (and says so as an error)."""
        try:
            self._keys = self._load()
        except KeysError as exc:
            log.error(
                "API keys not reloaded, keeping the previous ones",
                extra={"event": "keys_reload_refused", "reason": str(exc), "keys": len(self._keys)},
            )
            return
        self._log_loaded()

    def _log_loaded(self) -> None:
        log.info(
            "API keys loaded", extra={"event": "keys_loaded", "keys": len(self._keys), "key_ids": [k.key_id for k in self._keys]}
        )

    def key_for(self, authorization: str | None) -> ApiKey | None:
        """The configured key the header presents, or None."""
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode("utf-8", "surrogateescape")).digest()
        match = None
        for key in self._keys:
            if hmac.compare_digest(key.token_digest, presented):
                match = key
        return match


def signature_problem(
    key: ApiKey,
    timestamp: str | None,
    signature: str | None,
    method: str,
    target: str,
    body: bytes,
    window_s: float,
    now: float | None = None,
) -> str | None:
    """Why the request's signature does not hold (for the log, never for the client), or None."""
    if key.signing_secret is None:
        return "key has no signing secret"
    if not timestamp or not signature:
        return "unsigned"
    try:
        stamp = int(timestamp)
    except ValueError:
        return "bad timestamp"
    if abs((time.time() if now is None else now) - stamp) > window_s:
        return "timestamp outside the window"
    if not signature.startswith(SIGNATURE_VERSION):
        return "unknown signature version"
    expected = sign(key.signing_secret, stamp, method, target, body)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
        return "bad signature"
    return None


def sign(secret: bytes, timestamp: int, method: str, target: str, body: bytes) -> str:
    """The ``X-Fraudd-Signature`` value of a request (what clients compute): ``target`` is the
    path, with its query if any, exactly as sent."""
    message = f"{timestamp}\n{method.upper()}\n{target}\n".encode() + body
    return SIGNATURE_VERSION + hmac.new(secret, message, hashlib.sha256).hexdigest()
