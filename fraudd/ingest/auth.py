"""Who may write: API keys, and optionally a signature over each request.

Keys come from ``--api-keys-file`` (one per line, ``#`` comments) and ``--api-keys`` /
``FRAUDD_API_KEYS`` (comma-separated); the file is re-read on SIGHUP so a key is rotated without a
restart. A presented key is compared with every configured key in constant time (``hmac.
compare_digest`` over SHA-256 digests, all of them, no early exit), so response timing tells an
attacker nothing about how close a guess was.

Signing (``--require-signature``): the client sends ``X-Fraudd-Timestamp: <Unix seconds>`` and
``X-Fraudd-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with its API key>``. A
timestamp outside ``--signature-window-s`` of the server's clock is refused, and so is a signature
seen before within the window (kept in Redis, so every ingest process and host sees it): a captured
request cannot be replayed, and a changed body does not verify.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Fraudd-Timestamp"
SIGNATURE_HEADER = "X-Fraudd-Signature"
SIGNATURE_VERSION = "v1="


class KeysError(ValueError):
    """The keys file cannot be read; the message says which and why."""


def load_keys(path: Path | None, inline: str | None) -> list[bytes]:
    """Every configured key, from the file and the comma-separated ``inline`` list."""
    keys = [k.strip() for k in (inline or "").split(",")]
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysError(f"cannot read {path}: {exc}") from None
        keys += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [k.encode() for k in keys if k]


class Authenticator:
    """Checks ``Authorization: Bearer <key>`` against the configured keys; ``reload`` on SIGHUP."""

    def __init__(self, path: Path | None, inline: str | None) -> None:
        self._path = path
        self._inline = inline
        self._digests: list[tuple[bytes, bytes]] = []
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def reload(self) -> None:
        """Re-read the keys; a file that cannot be read keeps the keys in use (and says so)."""
        try:
            keys = load_keys(self._path, self._inline)
        except KeysError as exc:
            if self._digests:
                log.error(
                    "API keys not reloaded, keeping the previous ones", extra={"event": "keys_reload_refused", "reason": str(exc)}
                )
                return
            raise
        self._digests = [(hashlib.sha256(k).digest(), k) for k in keys]
        log.info("API keys loaded", extra={"event": "keys_loaded", "keys": len(keys)})

    def key_for(self, authorization: str | None) -> bytes | None:
        """The configured key the header presents, or None."""
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode("utf-8", "surrogateescape")).digest()
        match = None
        for digest, key in self._digests:
            if hmac.compare_digest(digest, presented):
                match = key
        return match


def signature_problem(
    key: bytes, timestamp: str | None, signature: str | None, body: bytes, window_s: float, now: float | None = None
) -> str | None:
    """Why the request's signature does not hold (for the log, never for the client), or None."""
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
    expected = sign(key, stamp, body)
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
        return "bad signature"
    return None


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Fraudd-Signature`` value of ``body`` sent at ``timestamp`` (what clients compute)."""
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return SIGNATURE_VERSION + mac
