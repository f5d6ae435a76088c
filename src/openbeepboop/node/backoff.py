"""Backoff: one for every wait on the server (registering, fetching, uploading results),
`WAIT`: 0.5 s doubling to 30 s, plus up to 1 s of jitter so that nodes that lost the
server together do not come back together. The executor's retries of a provider's
transient errors count their delays with the same `Backoff`, on their own strategy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from openbeepboop.node.client import ServerUnreachable

log = logging.getLogger("openbeepboop.node")
T = TypeVar("T")
WAIT = wait_exponential_jitter(multiplier=0.5, max=30)


class Backoff:
    """The delays of one sequence of retries: each failure in a row waits
    longer, a success starts over. `wait` is a tenacity wait strategy (default: `WAIT`,
    read when the backoff is made).

    >>> backoff = Backoff()
    >>> 0.5 <= backoff.next_delay() <= 1.5
    True
    """

    def __init__(self, wait: wait_base | None = None) -> None:
        self._wait = wait or WAIT
        self._failures = 0

    def next_delay(self) -> float:
        """Seconds to wait after one more failure."""
        self._failures += 1
        # tenacity's strategies read how far a sequence of attempts is from its call state
        state = RetryCallState(AsyncRetrying(), None, (), {})
        state.attempt_number = self._failures
        return float(self._wait(state))

    def reset(self) -> None:
        """A call went through: the next failure waits the shortest time again."""
        self._failures = 0


async def pause(seconds: float, unless: asyncio.Event, *or_: asyncio.Event) -> None:
    """Sleep `seconds`, or less if `unless` (or one of `or_`) is set meanwhile."""
    if not or_:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(unless.wait(), seconds)
        return
    waits = [asyncio.ensure_future(e.wait()) for e in (unless, *or_)]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def until_reachable(
    call: Callable[[], Awaitable[T]], stopping: asyncio.Event, attempts: int | None = None
) -> T:
    """Retry `call` while the server is unreachable, `attempts` times at most (without
    it: until `stopping` is set). The last ServerUnreachable is raised."""
    stop = stop_after_attempt(attempts) if attempts else (lambda _: stopping.is_set())
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(ServerUnreachable),
        wait=WAIT,
        stop=stop,
        before_sleep=_log_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover


def _log_retry(state: RetryCallState) -> None:
    why = state.outcome.exception() if state.outcome else None
    log.warning(
        "server unreachable; retrying", extra={"attempt": state.attempt_number, "why": str(why)}
    )
