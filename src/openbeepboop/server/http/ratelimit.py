"""Per-key request limits (sliding window, the `limits` notation), in memory on each
server."""

from __future__ import annotations

import time

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from openbeepboop.server.errors import RateLimited
from openbeepboop.server.models import ApiKey, Role


class KeyRateLimiter:
    """Counts each key's requests against the limits of its role."""

    def __init__(self, client_limit: str, node_limit: str) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._limits: dict[Role, list[RateLimitItem]] = {
            Role.CLIENT: parse_many(client_limit) if client_limit else [],
            Role.NODE: parse_many(node_limit) if node_limit else [],
            Role.ADMIN: [],
        }

    def hit(self, key: ApiKey) -> None:
        """Count one request of `key`; RateLimited (with Retry-After) over a limit."""
        for item in self._limits[key.role]:
            if not self._limiter.hit(item, key.id):
                stats = self._limiter.get_window_stats(item, key.id)
                raise RateLimited(
                    f"rate limit of {item} for this key exceeded",
                    retry_after=max(1.0, stats.reset_time - time.time()),
                )
