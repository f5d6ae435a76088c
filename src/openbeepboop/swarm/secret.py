"""The swarm's shared secret, and the keys derived from it for each purpose.

Every member of a swarm is given the same secret (`swarm_secret`). Nothing secret is
published: records carry an HMAC made with a key derived for records, API keys one made
with a key derived for keys, and members authenticate to one another with a third. A
leaked record key cannot sign API keys, and the other way round.

>>> s = SwarmSecret("correct horse battery staple")
>>> s.verify("records", b"x", s.mac("records", b"x"))
True
>>> s.verify("keys", b"x", s.mac("records", b"x"))
False
"""

from __future__ import annotations

import hashlib
import hmac

MIN_LENGTH = 16


class SwarmSecret:
    """HMAC-SHA256 under a key derived from the shared secret for each `purpose`."""

    __slots__ = ("_keys", "_secret")

    def __init__(self, secret: str) -> None:
        if len(secret) < MIN_LENGTH:
            raise ValueError(f"the swarm secret must be at least {MIN_LENGTH} characters")
        self._secret = secret.encode()
        self._keys: dict[str, bytes] = {}

    def _key(self, purpose: str) -> bytes:
        key = self._keys.get(purpose)
        if key is None:
            label = f"openbeepboop swarm v1 {purpose}".encode()
            key = self._keys[purpose] = hmac.new(self._secret, label, hashlib.sha256).digest()
        return key

    def mac(self, purpose: str, data: bytes) -> bytes:
        """The 32-byte HMAC of `data` for `purpose`."""
        return hmac.new(self._key(purpose), data, hashlib.sha256).digest()

    def verify(self, purpose: str, data: bytes, mac: bytes) -> bool:
        """Whether `mac` is `data`'s HMAC for `purpose` (in constant time; a prefix of
        at least 16 bytes is accepted, for MACs shortened to fit a key)."""
        return len(mac) >= 16 and hmac.compare_digest(self.mac(purpose, data)[: len(mac)], mac)

    def fingerprint(self) -> str:
        """A short public name of the secret (which swarm this is), safe to show."""
        return self.mac("fingerprint", b"")[:6].hex()

    def __repr__(self) -> str:
        return f"SwarmSecret({self.fingerprint()})"
