"""Revocations across a swarm: what each member knows, and the gossip that spreads it.

Every member publishes, in its DHT record, `digest()`: a short hash of the ids of the
swarm keys it knows revoked (no secret: key ids are not keys). Each heartbeat, the swarm
loop calls `sync(members)`: from every member whose digest differs from ours we fetch
its list (`GET /swarm/revocations`, member-authenticated; the fetch is injected, HTTP
lives at the edge), record what is new (the store revokes those keys here in the same
transaction) and drop them from the key cache and tell their open streams. A revocation
made anywhere is thus everywhere within a heartbeat or two of the members that differ.

>>> digest_of([])
''
>>> len(digest_of(["key_0123456789abcdef"]))
16
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.identity import SECRET_FILE, swarm_secret_of
from openbeepboop.server.core.signed_keys import KEY_ID
from openbeepboop.server.models import SwarmRevocation
from openbeepboop.server.settings import ServerSettings
from openbeepboop.server.store.base import Store
from openbeepboop.swarm.records import MemberRecord
from openbeepboop.swarm.secret import MIN_LENGTH, SwarmSecret

log = logging.getLogger("openbeepboop.swarm.keys")

ROUTE = "/swarm/revocations"
MAX_ITEMS = 1_000_000  # what one member's answer may hold
MAX_ORIGIN = 128
Fetch = Callable[[str], Awaitable[Any]]  # a member's revocations URL -> its list (JSON)


def key_signer(settings: ServerSettings) -> SwarmSecret | None:
    """The swarm secret this server signs client and node keys with, or None (keys stay
    on this server): the configured `swarm_secret`; else, for a swarm member (`dht_port`
    set), the secret it keeps in its data directory; else that kept secret if the server
    was ever a member (so that `keys create` run without the swarm's flags agrees)."""
    if settings.swarm_secret or settings.dht_port is not None:
        return SwarmSecret(swarm_secret_of(settings))
    kept = settings.data_dir / SECRET_FILE
    text = kept.read_text().strip() if kept.is_file() else ""
    return SwarmSecret(text) if len(text) >= MIN_LENGTH else None


class Publishes(Protocol):
    """What publishes this member's digest (the swarm member: `MemberRecord.revocations`)."""

    revocations: str


def digest_of(key_ids: Iterable[str]) -> str:
    """The published digest of a set of revoked key ids: empty for none, else 16 hex
    digits of the SHA-256 of the sorted ids, one per line."""
    ids = sorted(set(key_ids))
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] if ids else ""


def parse_revocations(data: Any) -> list[SwarmRevocation]:
    """The well-formed revocations of a member's answer (a JSON list of objects with
    `key_id`, `revoked_at`, `origin`); anything else in it is left out."""
    if not isinstance(data, list):
        return []
    out = []
    for item in data[:MAX_ITEMS]:
        if not isinstance(item, dict):
            continue
        key_id, at, origin = item.get("key_id"), item.get("revoked_at"), item.get("origin", "")
        if not isinstance(key_id, str) or KEY_ID.match(key_id) is None:
            continue
        if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
            continue
        if not isinstance(origin, str) or len(origin) > MAX_ORIGIN or "\x00" in origin:
            continue
        out.append(SwarmRevocation(key_id, float(at), origin))
    return out


def revocation_json(r: SwarmRevocation) -> dict[str, Any]:
    return {"key_id": r.key_id, "revoked_at": r.revoked_at, "origin": r.origin}


class SwarmKeys:
    """This member's view of the swarm's revocations, and the gossip pass. The swarm
    member publishes `digest()` (`publish_to`) and calls `sync` every heartbeat."""

    def __init__(self, store: Store, keyring: KeyRing, fetch: Fetch) -> None:
        self._store = store
        self._keyring = keyring
        self._fetch = fetch
        self._ids: frozenset[str] = frozenset()
        self._digest = ""
        self._failures: dict[str, str] = {}  # member id -> the error last logged
        self._publisher: Publishes | None = None
        keyring.on_swarm_revocation(self._revoked_here)

    def digest(self) -> str:
        """What this member publishes as `MemberRecord.revocations`: current with every
        revocation made here, learnt by `sync`, or read by `refresh`."""
        return self._digest

    async def revocations(self) -> list[SwarmRevocation]:
        """Every revocation this member knows (what `GET /swarm/revocations` answers)."""
        found = await self._store.list_revocations()
        self._learn(found)
        return found

    async def refresh(self) -> str:
        """Read the revocations again (revoked here, or by a replica on the same
        database); the digest."""
        await self.revocations()
        return self._digest

    def publish_to(self, publisher: Publishes) -> None:
        """Keep `publisher.revocations` (the swarm member's next record) equal to the
        digest from now on: a key revoked here is in the very next record."""
        self._publisher = publisher
        publisher.revocations = self._digest

    async def sync(self, members: Sequence[MemberRecord]) -> int:
        """One gossip pass over the other members' records (each heartbeat): how many
        revocations were new here."""
        return await self.sync_from(members, self._fetch)

    async def sync_from(self, records: Sequence[MemberRecord], fetch: Fetch) -> int:
        """`sync` with the fetch given: a member that fails to answer is left for the
        next pass."""
        await self.refresh()
        added = 0
        for record in records:
            if not record.revocations or record.revocations == self._digest:
                continue
            url = record.url.rstrip("/") + ROUTE
            try:
                items = parse_revocations(await fetch(url))
            except Exception as exc:  # one member down or refusing: the others go on
                self._failed(record, url, exc)
                continue
            self._failures.pop(record.id, None)
            added += await self.add(items)
        return added

    def _failed(self, record: MemberRecord, url: str, exc: Exception) -> None:
        """Log a member's failure once (then at DEBUG until it changes or heals): the
        pass is retried every heartbeat."""
        what = f"{type(exc).__name__}: {exc}"
        level = logging.DEBUG if self._failures.get(record.id) == what else logging.WARNING
        self._failures[record.id] = what
        log.log(level, "revocations of member %s (%s): %s", record.name, url, what)

    async def add(self, items: Sequence[SwarmRevocation]) -> int:
        """Record revocations learnt from a member; the keys they name stop here at once."""
        fresh = [r for r in items if r.key_id not in self._ids]
        if not fresh:
            return 0
        added = await self._store.add_revocations(fresh)
        self._keyring.forget(r.key_id for r in fresh)
        if added:
            log.info("learnt %d key revocation(s) from the swarm", added)
        await self.refresh()
        return added

    def _revoked_here(self, revocation: SwarmRevocation) -> None:
        """A swarm key revoked on this server (told by the keyring)."""
        self._learn_ids(self._ids | {revocation.key_id})

    def _learn(self, found: Sequence[SwarmRevocation]) -> None:
        self._learn_ids(frozenset(r.key_id for r in found))

    def _learn_ids(self, ids: frozenset[str]) -> None:
        self._ids = ids
        self._digest = digest_of(ids)
        if self._publisher is not None:
            self._publisher.revocations = self._digest
