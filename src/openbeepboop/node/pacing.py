"""Request pacing per model: a configured `rpm`, plus what the provider teaches us —
a 429's `Retry-After` pauses every job of the model, not just the one that met it."""

from __future__ import annotations

import asyncio
import time

from aiolimiter import AsyncLimiter


class Pacer:
    """Await `ready()` before each provider call."""

    def __init__(self, rpm: float | None) -> None:
        # one call every 60/rpm s, evenly spaced: a bucket of `rpm` would let a whole
        # minute's budget out at once, and providers enforce limits over shorter windows
        self._limiter = AsyncLimiter(1, 60 / rpm) if rpm else None
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every call for `seconds` (learnt from a 429 or a rate-limit header)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def ready(self) -> None:
        # the pause may grow while we sleep, so look again after each sleep
        while (wait := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait)
        if self._limiter is not None:
            await self._limiter.acquire()
