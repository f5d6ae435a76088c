"""What a member's DHT node keeps for the keys it is close to: sets of signed records.

Kademlia's own storage keeps one value per key and lets the last write win; this one
merges. A STORE adds each record that verifies under the swarm secret and belongs
under the key (its own `node:` key, `all_nodes`, or a model it serves) to the key's set,
one record per member, the newest by its own `ts`. A record leaves the set when it has
not been refreshed for its `ttl`, timed by this node's clock (so members' clocks need
not agree). Everything is bounded: `MAX_RECORDS` a key, `MAX_KEYS` keys, the oldest
dropped first.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

from kademlia.storage import IStorage

from openbeepboop.swarm.records import MAX_RECORDS, MemberRecord, encode_value, parse_value
from openbeepboop.swarm.secret import SwarmSecret

MAX_KEYS = 4096


def digest(key: str) -> bytes:
    """Kademlia's 160-bit id of a key name (SHA-1, as the library computes it)."""
    return hashlib.sha1(key.encode()).digest()  # the DHT's id space, not security


class RecordStorage(IStorage):  # type: ignore[misc]  # kademlia is untyped
    """Signed, merged, expiring record sets by key digest."""

    def __init__(self, secret: SwarmSecret, clock: Callable[[], float] = time.monotonic) -> None:
        self._secret = secret
        self._clock = clock
        # key digest -> member id -> (record, when it was last refreshed here)
        self._sets: OrderedDict[bytes, dict[str, tuple[MemberRecord, float]]] = OrderedDict()
        self.rejected = 0  # records refused since start (bad signature, wrong key)

    def __setitem__(self, key: bytes, value: object) -> None:
        if not isinstance(key, bytes) or len(key) != 20:
            return
        now = self._clock()
        for record in parse_value(value):
            if not self._belongs(key, record):
                self.rejected += 1
                continue
            entries = self._sets.setdefault(key, {})
            held = entries.get(record.id)
            if held is None or record.ts >= held[0].ts:
                entries[record.id] = (record, now)
            self._sets.move_to_end(key)
            if len(entries) > MAX_RECORDS:
                oldest = min(entries, key=lambda i: entries[i][0].ts)
                del entries[oldest]
        while len(self._sets) > MAX_KEYS:
            self._sets.popitem(last=False)

    def _belongs(self, key: bytes, record: MemberRecord) -> bool:
        return record.verified(self._secret) and key in {digest(k) for k in record.dht_keys()}

    def records(self, key: bytes) -> list[MemberRecord]:
        """The live records under `key` (a digest)."""
        entries = self._sets.get(key)
        if not entries:
            return []
        now = self._clock()
        for member_id in [i for i, (r, at) in entries.items() if now - at > r.ttl]:
            del entries[member_id]
        if not entries:
            del self._sets[key]
            return []
        return [r for r, _ in entries.values()]

    def get(self, key: bytes, default: object = None) -> object:
        records = self.records(key) if isinstance(key, bytes) else []
        return encode_value(records) if records else default

    def __getitem__(self, key: bytes) -> object:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, object]]:
        # members republish every heartbeat: the library's hourly republish has nothing to add
        return []

    def __iter__(self) -> Iterator[tuple[bytes, object]]:
        for key in list(self._sets):
            value = self.get(key)
            if value is not None:
                yield key, value

    def __bool__(self) -> bool:
        return True  # the library takes `storage or ForgetfulStorage()`: never replace this one


class NoStorage(IStorage):  # type: ignore[misc]
    """A client's DHT node: it reads and keeps nothing (it holds no secret to check
    a record with, and leaves soon)."""

    def __setitem__(self, key: bytes, value: object) -> None:
        return None

    def __getitem__(self, key: bytes) -> object:
        raise KeyError(key)

    def get(self, key: bytes, default: object = None) -> object:
        return default

    def __bool__(self) -> bool:
        return True

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, object]]:
        return []

    def __iter__(self) -> Iterator[tuple[bytes, object]]:
        return iter(())
