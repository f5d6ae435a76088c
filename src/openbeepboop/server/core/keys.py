"""API keys: `obb_<role>_<secret>`, 256 random bits, only a SHA-256 hash is stored.

>>> key = new_key(Role.CLIENT)
>>> key.secret.startswith("obb_client_")
True

Keys the operator gives (`admin_key`, `node_key`, `client_key`: OPENBEEPBOOP_ADMIN_KEY
and so on, or a file that OPENBEEPBOOP_ADMIN_KEY_FILE names) are checked here
(`given_keys`) and made sure of at every start (core/auth.py `KeyRing.ensure_given`).

>>> key_problem(new_key(Role.NODE).secret, Role.NODE) is None
True
>>> key_problem("obb_node_tooshort", Role.NODE)
'its secret part is 8 characters; it needs at least 32 URL-safe characters'
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from pydantic import SecretStr

from openbeepboop.server.models import ApiKey, Role
from openbeepboop.server.settings import GIVEN_KEYS, ConfigError, ServerSettings, given_key_source

MIN_SECRET_CHARS = 32  # of a key given by the operator; `new_key` makes 43
KEY_PATTERN = re.compile(rf"^obb_(admin|client|node)_[A-Za-z0-9_-]{{{MIN_SECRET_CHARS},}}$")
_SECRET_CHARS = re.compile(r"^[A-Za-z0-9_-]*$")
GIVEN_KEY_NAME = "env"  # the name a given key is stored under


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


@dataclass(frozen=True, slots=True)
class GivenKey:
    """A key the operator gave the server (a setting), to exist in the store."""

    role: Role
    secret: SecretStr
    source: str  # where it came from, for messages: OPENBEEPBOOP_ADMIN_KEY, ...

    def record(self, now: float) -> ApiKey:
        """The record to store: its id derived from the secret, so that every replica
        starting with this key inserts the same row."""
        secret = self.secret.get_secret_value()
        digest = hashlib.sha256(b"openbeepboop given key id\x00" + secret.encode())
        return ApiKey(
            id="key_" + digest.hexdigest()[:16],
            role=self.role,
            key_hash=hash_key(secret),
            prefix=secret[: len(f"obb_{self.role.value}_") + 4],
            name=GIVEN_KEY_NAME,
            created_at=now,
        )


def key_problem(secret: str, role: Role) -> str | None:
    """Why `secret` is not a `role` key of our shape, or None (never quoting it)."""
    head, sep, rest = secret.partition("_")
    given_role, sep2, tail = rest.partition("_")
    if head != "obb" or not sep or not sep2 or given_role not in {r.value for r in Role}:
        return f"it does not look like obb_{role.value}_<secret>"
    if given_role != role.value:
        found, wanted = with_article(given_role), with_article(role.value)
        return f"it is {found} key (obb_{given_role}_...), not {wanted} key"
    if not _SECRET_CHARS.match(tail):
        return "its secret part has characters other than A-Z a-z 0-9 _ -"
    if len(tail) < MIN_SECRET_CHARS:
        return (
            f"its secret part is {len(tail)} characters; it needs at least "
            f"{MIN_SECRET_CHARS} URL-safe characters"
        )
    return None


def given_keys(settings: ServerSettings) -> list[GivenKey]:
    """The keys the operator gave (`admin_key`, `node_key`, `client_key`), checked:
    ConfigError naming the first wrong one and how to make a right one."""
    out = []
    for name, role_name in GIVEN_KEYS.items():
        value: SecretStr | None = getattr(settings, name)
        if value is None or not value.get_secret_value().strip():
            continue
        role, source = Role(role_name), given_key_source(name)
        secret = value.get_secret_value().strip()
        problem = key_problem(secret, role)
        if problem is not None:
            raise ConfigError(
                f"{source} is not a valid {role.value} key: {problem}; make one with "
                f"`openbeepboop-server keys generate --role {role.value}`"
            )
        out.append(GivenKey(role, SecretStr(secret), source))
    return out


def with_article(role: str) -> str:
    """`role` with its article: "an admin", "a client"."""
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"
