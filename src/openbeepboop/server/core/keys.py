"""API keys: `obb_<role>_<secret>`, 256 random bits, only a SHA-256 hash is stored.

>>> key = new_key(Role.CLIENT)
>>> key.secret.startswith("obb_client_")
True
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from openbeepboop.server.models import ApiKey, Role

KEY_PATTERN = re.compile(r"^obb_(admin|client|node)_[A-Za-z0-9_-]{43,}$")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly made key: the secret (shown once) and the record to store."""

    secret: str
    record: ApiKey


def hash_key(secret: str) -> str:
    """The hex SHA-256 the store keeps instead of the key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(role: Role, name: str = "", now: float | None = None) -> IssuedKey:
    """Make a key for `role` with 256 bits from the OS's CSPRNG."""
    secret = f"obb_{role.value}_{secrets.token_urlsafe(32)}"
    record = ApiKey(
        id="key_" + secrets.token_hex(8),
        role=role,
        key_hash=hash_key(secret),
        prefix=secret[: len(f"obb_{role.value}_") + 4],
        name=name,
        created_at=time.time() if now is None else now,
    )
    return IssuedKey(secret=secret, record=record)


def looks_like_key(secret: str) -> bool:
    """Whether `secret` has the shape of one of our keys (cheap check before a lookup)."""
    return KEY_PATTERN.match(secret) is not None
