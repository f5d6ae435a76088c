"""Key management and authentication, over the store."""

from __future__ import annotations

import time
from collections.abc import Callable

from openbeepboop.server.core.keys import IssuedKey, hash_key, looks_like_key, new_key
from openbeepboop.server.errors import AuthenticationFailed, NotFound, PermissionDenied
from openbeepboop.server.models import ApiKey, Role
from openbeepboop.server.store.base import Store

CACHE_SECONDS = 5.0


class KeyRing:
    """Creates, lists, revokes and checks API keys. A revoked key stops working within
    `CACHE_SECONDS` on every server (at once on the server that revoked it)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}

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
        return key

    async def authenticate(self, secret: str | None) -> ApiKey:
        """The active key behind `secret`, or AuthenticationFailed."""
        if not secret:
            raise AuthenticationFailed(
                "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        digest = hash_key(secret)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            key = cached[0]
        elif not looks_like_key(secret):  # not worth a lookup
            raise AuthenticationFailed("invalid API key")
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
