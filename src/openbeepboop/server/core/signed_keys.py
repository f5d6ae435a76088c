"""Keys that work across a swarm: signed with the swarm's secret, verified offline.

A signed key is still `obb_<role>_<secret>` (it matches `KEY_PATTERN`); its secret is
`s1` (the format's version), the key id's 16 hex digits, 32 random bytes and a 16-byte
HMAC ("keys" purpose of the swarm secret) over the role, the key id and those random
bytes, both in unpadded URL-safe base64. Any member holding the same swarm secret can
tell such a key is genuine without having seen it; what it cannot tell offline is
whether it was revoked (core/swarm_keys.py: the revocation list the members gossip).

>>> from openbeepboop.swarm.secret import SwarmSecret
>>> signer = SwarmSecret("a swarm secret of 16+ chars")
>>> issued = new_signed_key(Role.CLIENT, signer, "laptop", now=0.0)
>>> verified_id(issued.secret, signer) == issued.record.id
True
>>> verified_id(issued.secret.replace("obb_client_", "obb_node_"), signer) is None
True
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time

from openbeepboop.server.core.keys import IssuedKey, hash_key
from openbeepboop.server.models import ApiKey, Role
from openbeepboop.swarm.secret import SwarmSecret

PURPOSE = "keys"
VERSION = "s1"
RANDOM_BYTES = 32
MAC_BYTES = 16
SWARM_ROLES = frozenset({Role.CLIENT, Role.NODE})  # an admin key stays with its server
_B64 = r"[A-Za-z0-9_-]"
SIGNED = re.compile(rf"^obb_(client|node)_{VERSION}([0-9a-f]{{16}})({_B64}{{43}})({_B64}{{22}})$")
KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes | None:
    """The bytes of `text`, only in its one canonical spelling (no two secrets for one
    key)."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _b64(raw) == text else None


def _signed_bytes(role: str, hex_id: str, random: bytes) -> bytes:
    return b"\x00".join((b"openbeepboop key", role.encode(), hex_id.encode(), random))


def new_signed_key(
    role: Role, signer: SwarmSecret, name: str = "", now: float | None = None
) -> IssuedKey:
    """A client or node key that every member of the swarm of `signer` accepts."""
    if role not in SWARM_ROLES:
        raise ValueError(f"a {role.value} key is not signed for the swarm")
    hex_id = secrets.token_hex(8)
    random = secrets.token_bytes(RANDOM_BYTES)
    mac = signer.mac(PURPOSE, _signed_bytes(role.value, hex_id, random))[:MAC_BYTES]
    secret = f"obb_{role.value}_{VERSION}{hex_id}{_b64(random)}{_b64(mac)}"
    return IssuedKey(secret=secret, record=_record(secret, role, hex_id, name, now))


def _record(secret: str, role: Role, hex_id: str, name: str, now: float | None) -> ApiKey:
    return ApiKey(
        id="key_" + hex_id,
        role=role,
        key_hash=hash_key(secret),
        prefix=secret[: len(f"obb_{role.value}_") + 4],
        name=name,
        created_at=time.time() if now is None else now,
    )


def verified_id(secret: str, signer: SwarmSecret) -> str | None:
    """The key id of `secret` if it is a key signed with `signer`, else None (another
    swarm's, tampered with, or not a signed key at all)."""
    found = SIGNED.match(secret)
    if found is None:
        return None
    role, hex_id, random_text, mac_text = found.groups()
    random, mac = _unb64(random_text), _unb64(mac_text)
    if random is None or mac is None or len(random) != RANDOM_BYTES or len(mac) != MAC_BYTES:
        return None
    if not signer.verify(PURPOSE, _signed_bytes(role, hex_id, random), mac):
        return None
    return "key_" + hex_id


def signed_by(secret: str, signer: SwarmSecret) -> bool:
    """False only for a key in the signed format that `signer` did not sign (the swarm's
    secret was replaced since it was made: rotation ends such keys everywhere); a key in
    today's local format (never of that length) is not a signed key at all."""
    return SIGNED.match(secret) is None or verified_id(secret, signer) is not None


def adopted_record(secret: str, signer: SwarmSecret, now: float) -> ApiKey | None:
    """The record under which a member keeps a signed key it sees for the first time
    (same id, hash and role as where it was made), or None unless it verifies."""
    key_id = verified_id(secret, signer)
    if key_id is None:
        return None
    role = Role(secret.split("_", 2)[1])
    return _record(secret, role, key_id.removeprefix("key_"), "swarm key", now)


def looks_signed(key: ApiKey) -> bool:
    """Whether a stored key was (by its prefix) made as a swarm key: its revocation is
    told to the other members."""
    return key.role in SWARM_ROLES and key.prefix.startswith(f"obb_{key.role.value}_{VERSION}")
