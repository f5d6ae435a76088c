"""Key management and authentication, over the store; and the watch that tells open
streams (WebSockets, event streams) that their key was revoked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from openbeepboop.server.core.keys import IssuedKey, hash_key, looks_like_key, new_key
from openbeepboop.server.core.passes import one_pass
from openbeepboop.server.errors import AuthenticationFailed, NotFound, PermissionDenied
from openbeepboop.server.models import ApiKey, Role
from openbeepboop.server.store.base import Store

log = logging.getLogger("openbeepboop.auth")

CACHE_SECONDS = 5.0


class KeyRing:
    """Creates, lists, revokes and checks API keys. A revoked key stops working within
    `CACHE_SECONDS` on every server (at once on the server that revoked it); what it
    has open (`watch`) is told at once here, and within a recheck interval
    (`run_recheck`) on every other server."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}
        self._watched: dict[str, set[asyncio.Event]] = {}  # key id -> its open streams

    async def create(self, role: Role, name: str = "") -> IssuedKey:
        issued = new_key(role, name, now=self._clock())
        await self._store.create_key(issued.record)
        return issued

    async def list_keys(self) -> list[ApiKey]:
        return await self._store.list_keys()

    async def revoke(self, key_id: str) -> ApiKey:
        key = await self._store.revoke_key(key_id, self._clock())
        if key is None:
            raise NotFound(f"no key with id {key_id!r}", param="key_id")
        self._cache = {h: v for h, v in self._cache.items() if v[0] is None or v[0].id != key_id}
        self._revoked(key_id)
        return key

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
        return await self.authenticate_hash(digest)

    async def authenticate_hash(self, digest: str) -> ApiKey:
        """The active key whose hash is `digest` (a web session keeps it), or
        AuthenticationFailed."""
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            key = cached[0]
        else:
            key = await self._store.get_key_by_hash(digest)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (key, now)
        if key is None or not key.active:
            raise AuthenticationFailed("invalid API key" if key is None else "API key revoked")
        return key


def require_role(key: ApiKey, *roles: Role) -> None:
    """PermissionDenied unless `key` has one of `roles` (admin always may)."""
    if key.role is Role.ADMIN or key.role in roles:
        return
    wanted = " or ".join(r.value for r in roles)
    raise PermissionDenied(f"this route needs a {wanted} key; this is a {key.role.value} key")
