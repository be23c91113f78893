"""Password hashing: scrypt (memory-hard, in the standard library), parameters stored with each hash.

A stored hash reads ``scrypt$<n>$<r>$<p>$<salt>$<key>`` (base64), so stronger parameters later
still verify the old hashes. An unknown username is checked against a throwaway hash, so the
answer takes as long as for a known one and does not tell which usernames exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # 32 MiB and about 0.1 s per hash
_MAXMEM = 64 * 2**20
MIN_LENGTH = 8


class PasswordError(ValueError):
    """A password that may not be set; the message says why."""


def hash_password(password: str) -> str:
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"a password needs at least {MIN_LENGTH} characters")
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` matches ``stored``; None (no such user) costs the same and is False."""
    candidate = stored or _DUMMY
    try:
        _scheme, n, r, p, salt, key = candidate.split("$")
        expected = base64.b64decode(key)
        derived = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), maxmem=_MAXMEM, dklen=len(expected)
        )
    except ValueError:
        return False
    return stored is not None and hmac.compare_digest(derived, expected)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_DUMMY = hash_password("not a password of anyone")
