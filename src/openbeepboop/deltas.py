"""Token deltas of running jobs, fanned out to any number of subscribers.

Nodes push the text of a running job in pieces (`index` 0, 1, 2, ...); every
subscriber reads the same shared list from its own position, so a late subscriber
first gets the text so far and memory does not grow with the number of subscribers.
A piece with index 0 arriving for a stream that already has text starts it over (the
job is being run again). Streams of finished jobs are dropped after `keep_seconds`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class _Stream:
    parts: list[str] = field(default_factory=list)
    generation: int = 0  # bumped when the text starts over
    finished_at: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class DeltaHub:
    """In-memory streams of job text, one per running job."""

    def __init__(self, keep_seconds: float = 60.0, max_parts: int = 100_000) -> None:
        self._streams: dict[str, _Stream] = {}
        self._keep = keep_seconds
        self._max_parts = max_parts

    def push(self, job_id: str, index: int, text: str) -> bool:
        """Add piece `index` of a job's text; False for a duplicate or a gap."""
        stream = self._streams.setdefault(job_id, _Stream())
        if stream.finished_at is not None:
            return False
        if index == 0 and stream.parts:
            stream.parts = []
            stream.generation += 1
        if index != len(stream.parts) or index >= self._max_parts:
            return False
        stream.parts.append(text)
        stream.wake()
        return True

    def finish(self, job_id: str) -> None:
        """The job is final: subscribers end once they have read everything."""
        stream = self._streams.get(job_id)
        if stream is None:
            stream = self._streams[job_id] = _Stream()
        stream.finished_at = time.monotonic()
        stream.wake()
        self._forget_old()

    def text(self, job_id: str) -> str:
        stream = self._streams.get(job_id)
        return "".join(stream.parts) if stream else ""

    async def follow(
        self, job_id: str, is_final: Callable[[], Awaitable[bool]], every: float = 1.0
    ) -> AsyncIterator[str]:
        """Yield the job's text piece by piece, from the start, until it finishes. If the
        text starts over (a re-run), the pieces of the new run follow what was sent.
        `is_final` is asked when nothing happened for `every` seconds (a job can end
        without any piece, or on another server)."""
        stream = self._streams.setdefault(job_id, _Stream())
        sent, generation = 0, stream.generation
        while True:
            stream = self._streams.get(job_id) or stream
            if stream.generation != generation:  # restarted: resume at what we sent
                generation = stream.generation
                sent = min(sent, len(stream.parts))
            while sent < len(stream.parts):
                sent += 1
                yield stream.parts[sent - 1]
            if stream.finished_at is not None:
                return
            try:
                await asyncio.wait_for(stream.changed.wait(), every)
            except TimeoutError:
                if await is_final():
                    self.finish(job_id)

    def _forget_old(self) -> None:
        cutoff = time.monotonic() - self._keep
        old = [j for j, s in self._streams.items() if s.finished_at and s.finished_at < cutoff]
        for job_id in old:
            del self._streams[job_id]

    def __len__(self) -> int:
        return len(self._streams)
