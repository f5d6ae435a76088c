"""Per-key request limits (the `limits` notation, e.g. `200/second;6000/minute`).

One server (SQLite): sliding windows in memory. Several servers on one database
(PostgreSQL): fixed windows counted in the database (the store's `hit_counters`: one
round trip per request for all of a key's limits), so the deployment grants a key its
limit once, not once per server. A server that has seen a window full refuses the
rest of that window's requests without asking the database.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from openbeepboop.server.errors import RateLimited
from openbeepboop.server.models import ApiKey, Role

# {counter name: window start} -> {counter name: (hits of its current window, its start)}
SharedCounter = Callable[[Mapping[str, float]], Awaitable[dict[str, tuple[int, float]]]]
MAX_FULL = 10_000  # windows remembered as full


class KeyRateLimiter:
    """Counts each key's requests against the limits of its role, in memory or, given
    `shared` (the store's `hit_counters`), in the database."""

    def __init__(
        self,
        client_limit: str,
        node_limit: str,
        shared: SharedCounter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._limits: dict[Role, list[RateLimitItem]] = {
            Role.CLIENT: parse_many(client_limit) if client_limit else [],
            Role.NODE: parse_many(node_limit) if node_limit else [],
            Role.ADMIN: [],
        }
        self._shared = shared
        self._clock = clock
        self._full: dict[str, float] = {}  # counter name -> end of its window seen full

    async def hit(self, key: ApiKey) -> None:
        """Count one request of `key`; RateLimited (with Retry-After) over a limit."""
        items = self._limits[key.role]
        if not items:
            return
        if self._shared is not None:
            await self._hit_shared(self._shared, items, key.id)
            return
        for item in items:
            if not self._limiter.hit(item, key.id):
                stats = self._limiter.get_window_stats(item, key.id)
                raise _limited(item, stats.reset_time - time.time())

    async def _hit_shared(
        self, shared: SharedCounter, items: list[RateLimitItem], key_id: str
    ) -> None:
        now = self._clock()
        names = {item.key_for(key_id): item for item in items}
        for name, item in names.items():  # a window seen full here: no need to ask
            full_until = self._full.get(name, 0.0)
            if now < full_until:
                raise _limited(item, full_until - now)
        periods = {name: float(item.get_expiry()) for name, item in names.items()}
        counted = await shared({name: now - now % p for name, p in periods.items()})
        for name, (hits, start) in counted.items():
            item = names[name]
            if hits > item.amount:
                if len(self._full) >= MAX_FULL:
                    self._full.clear()
                self._full[name] = start + periods[name]
                raise _limited(item, start + periods[name] - now)


def _limited(item: RateLimitItem, wait: float) -> RateLimited:
    return RateLimited(f"rate limit of {item} for this key exceeded", retry_after=max(1.0, wait))
