"""Key management and authentication, over the store; and the watch that tells open
streams (WebSockets, event streams) that their key was revoked.

In a swarm (a swarm secret given), client and node keys are signed (core/signed_keys.py):
a member that meets one it has not seen verifies it, checks the swarm's revocations and
keeps it from then on; revoking one here records the revocation for the other members
(core/swarm_keys.py carries it to them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from openbeepboop.server.core.keys import (
    GIVEN_KEY_NAME,
    GivenKey,
    IssuedKey,
    hash_key,
    looks_like_key,
    new_key,
    with_article,
)
from openbeepboop.server.core.passes import one_pass
from openbeepboop.server.core.shares import check_group
from openbeepboop.server.core.signed_keys import (
    SWARM_ROLES,
    adopted_record,
    looks_signed,
    new_signed_key,
    signed_by,
)
from openbeepboop.server.errors import AuthenticationFailed, NotFound, PermissionDenied
from openbeepboop.server.models import ApiKey, Role, SwarmRevocation
from openbeepboop.server.settings import StartupRefused
from openbeepboop.server.store.base import Store
from openbeepboop.swarm.secret import SwarmSecret

log = logging.getLogger("openbeepboop.auth")

CACHE_SECONDS = 5.0


class KeyRing:
    """Creates, lists, revokes and checks API keys. A revoked key stops working within
    `CACHE_SECONDS` on every server (at once on the server that revoked it); what it
    has open (`watch`) is told at once here, and within a recheck interval
    (`run_recheck`) on every other server."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        signer: SwarmSecret | None = None,
        origin: str = "",
    ) -> None:
        self._store = store
        self._clock = clock
        self._signer = signer  # the swarm secret: client and node keys work swarm-wide
        self._origin = origin  # this server's id, on the revocations it records
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}
        self._watched: dict[str, set[asyncio.Event]] = {}  # key id -> its open streams
        self._swarm_listeners: list[Callable[[SwarmRevocation], None]] = []

    @property
    def signer(self) -> SwarmSecret | None:
        """The swarm secret keys are signed with, or None (keys stay on this server)."""
        return self._signer

    async def create(self, role: Role, name: str = "", group: str | None = None) -> IssuedKey:
        """A new key; `group`: the share its jobs are scheduled in (core/shares.py)."""
        if self._signer is not None and role in SWARM_ROLES:
            issued = new_signed_key(role, self._signer, name, now=self._clock())
        else:
            issued = new_key(role, name, now=self._clock())
        if group is not None:
            issued = replace(issued, record=replace(issued.record, group=check_group(group)))
        await self._store.create_key(issued.record)
        return issued

    async def ensure_given(self, given: GivenKey) -> ApiKey:
        """Make sure the key the operator gave exists (at every start): stored under an
        id derived from it when its hash is not (a replica that stored it first wins;
        theirs is read); left as it is when stored, revoked too (a revocation is never
        undone by a restart: a warning says so). StartupRefused when its hash is stored
        under another role."""
        secret = given.secret.get_secret_value()
        digest = hash_key(secret)
        found = await self._store.get_key_by_hash(digest)
        if found is None:
            record = await self._given_record(given)
            try:
                await self._store.create_key(record)
            except Exception:  # another replica stored it first: read theirs
                found = await self._store.get_key_by_hash(digest)
                if found is None:
                    raise
            else:
                log.info("%s: %s key %s stored", given.source, given.role.value, record.id)
                return record
        if found.role is not given.role:
            stored, wanted = with_article(found.role.value), with_article(given.role.value)
            raise StartupRefused(
                f"{given.source} is stored as {stored} key ({found.id}), not {wanted} key: "
                f"give a key made for the {given.role.value} role"
            )
        if not found.active:
            log.warning(
                "%s: key %s was revoked and stays revoked (a restart never undoes a "
                "revocation): give a new key to replace it",
                given.source,
                found.id,
            )
        return found

    async def _given_record(self, given: GivenKey) -> ApiKey:
        """The record a given key is stored under: a swarm key signed with our secret
        keeps its own id (and a revocation the swarm recorded); any other, an id
        derived from it (core/keys.py)."""
        now = self._clock()
        if self._signer is not None:
            adopted = adopted_record(given.secret.get_secret_value(), self._signer, now)
            if adopted is not None:
                revocation = await self._store.get_revocation(adopted.id)
                revoked_at = None if revocation is None else revocation.revoked_at
                return replace(adopted, name=GIVEN_KEY_NAME, revoked_at=revoked_at)
        return given.record(now)

    async def set_group(self, key_id: str, group: str | None) -> ApiKey:
        """Put a key in a share group (None: its own share again); servers apply it
        within `CACHE_SECONDS`, to the jobs it has queued too."""
        key = await self._store.set_key_group(key_id, None if group is None else check_group(group))
        if key is None:
            raise NotFound(f"no key with id {key_id!r}", param="key_id")
        self._cache = {h: v for h, v in self._cache.items() if v[0] is None or v[0].id != key_id}
        return key

    async def list_keys(self) -> list[ApiKey]:
        return await self._store.list_keys()

    async def revoke(self, key_id: str) -> ApiKey:
        key = await self._store.revoke_key(key_id, self._clock())
        if key is None:
            raise NotFound(f"no key with id {key_id!r}", param="key_id")
        if looks_signed(key):  # the other members of the swarm learn it
            revoked_at = self._clock() if key.revoked_at is None else key.revoked_at
            revocation = SwarmRevocation(key_id, revoked_at, self._origin)
            await self._store.add_revocations([revocation])
            for listener in self._swarm_listeners:
                listener(revocation)
        self.forget([key_id])
        return key

    def on_swarm_revocation(self, listener: Callable[[SwarmRevocation], None]) -> None:
        """Call `listener` with each swarm key revoked here (the gossip's digest)."""
        self._swarm_listeners.append(listener)

    def forget(self, key_ids: Iterable[str]) -> None:
        """Keys revoked elsewhere (by the swarm): dropped from the cache, so that they
        stop here at once, and their open streams told."""
        gone = set(key_ids)
        self._cache = {h: v for h, v in self._cache.items() if v[0] is None or v[0].id not in gone}
        for key_id in gone:
            self._revoked(key_id)

    @contextlib.contextmanager
    def watch(self, key_id: str) -> Iterator[asyncio.Event]:
        """While the block runs: an event set once the key is revoked (at once when it
        is revoked here, else at the next `recheck`)."""
        event = asyncio.Event()
        self._watched.setdefault(key_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._watched.get(key_id, set())
            events.discard(event)
            if not events:
                self._watched.pop(key_id, None)

    async def recheck(self) -> None:
        """Look up the keys being watched (one query): set the events of those no longer
        active (revoked by another server or by the CLI)."""
        if not self._watched:
            return
        active = {k.id for k in await self._store.list_keys() if k.active}
        for key_id in [k for k in self._watched if k not in active]:
            self._revoked(key_id)

    async def run_recheck(self, interval: float) -> None:
        """`recheck` every `interval` seconds, forever (a background task of the server)."""
        while True:
            await asyncio.sleep(interval)
            await one_pass("key recheck", self.recheck, log)

    def _revoked(self, key_id: str) -> None:
        for event in self._watched.get(key_id, ()):
            event.set()

    async def authenticate(self, secret: str | None) -> ApiKey:
        """The active key behind `secret`, or AuthenticationFailed."""
        if not secret:
            raise AuthenticationFailed(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        digest = hash_key(secret)
        if not looks_like_key(secret) and digest not in self._cache:  # not worth a lookup
            raise AuthenticationFailed("invalid API key")
        key = await self._lookup(digest)
        if self._signer is not None:
            if key is None:
                key = await self._adopt(secret, digest)
            elif not signed_by(secret, self._signer):  # made under a secret since replaced
                raise AuthenticationFailed("invalid API key")
        return _active(key)

    async def authenticate_hash(self, digest: str) -> ApiKey:
        """The active key whose hash is `digest` (a web session keeps it), or
        AuthenticationFailed."""
        return _active(await self._lookup(digest))

    async def _lookup(self, digest: str) -> ApiKey | None:
        """The key with this hash, through a cache of `CACHE_SECONDS`."""
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            return cached[0]
        key = await self._store.get_key_by_hash(digest)
        self._remember(digest, key, now)
        return key

    def _remember(self, digest: str, key: ApiKey | None, now: float) -> None:
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (key, now)

    async def _adopt(self, secret: str, digest: str) -> ApiKey | None:
        """A swarm key met here for the first time: kept (revoked already if the swarm
        revoked it) when its signature verifies; None when it does not."""
        assert self._signer is not None
        now = self._clock()
        record = adopted_record(secret, self._signer, now)
        if record is None:
            return None
        revocation = await self._store.get_revocation(record.id)
        if revocation is not None:
            record = replace(record, revoked_at=revocation.revoked_at)
        try:
            await self._store.create_key(record)
        except Exception:  # another request (or replica) kept it first: read theirs
            found = await self._store.get_key_by_hash(digest)
            if found is None:  # the store answers: another key has that id here
                log.warning("swarm key %s not kept: a key of that id exists here", record.id)
                return None
            record = found
        else:
            log.info("swarm key %s (%s) seen for the first time: kept", record.id, record.role)
            if revocation is None and await self._store.get_revocation(record.id) is not None:
                # its revocation arrived between the check and the insert
                record = await self._store.revoke_key(record.id, now) or record
        self._remember(digest, record, now)
        return record


def _active(key: ApiKey | None) -> ApiKey:
    """`key` if it is active, else AuthenticationFailed (unknown or revoked)."""
    if key is None or not key.active:
        raise AuthenticationFailed("invalid API key" if key is None else "API key revoked")
    return key


def require_role(key: ApiKey, *roles: Role) -> None:
    """PermissionDenied unless `key` has one of `roles` (admin always may)."""
    if key.role is Role.ADMIN or key.role in roles:
        return
    wanted = " or ".join(r.value for r in roles)
    raise PermissionDenied(f"this route needs a {wanted} key; this is a {key.role.value} key")
