"""Token deltas of running jobs, fanned out to any number of subscribers.

Nodes push a running job in pieces (`index` 0, 1, 2, ...): text, or OpenAI chunk
choices for what is not choice 0's text (choices.py); every
subscriber reads the same shared list from its own position, so a late subscriber
first gets the text so far and memory does not grow with the number of subscribers.
A piece with index 0 arriving for a stream that already has text starts it over (the
job is being run again). Streams of finished jobs that someone followed are kept for
`keep_seconds` (a subscriber may reconnect and resume); the text of a job nobody
followed (most batch lines) is dropped when it finishes: its result has it.

With several servers, a bridge (`forward_to`) is handed every piece accepted here and
every finish (index None), and `deliver`s those of other servers, so that a client may
follow a job on any server whatever server its node pushes to.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from openbeepboop.server.models import Piece


@dataclass
class _Stream:
    parts: list[Piece] = field(default_factory=list)
    generation: int = 0  # bumped when the text starts over
    finished_at: float | None = None
    followed: bool = False  # a subscriber has read it: keep it a while after the end
    changed: asyncio.Event | None = None  # made only when someone waits

    def waiter(self) -> asyncio.Event:
        if self.changed is None:
            self.changed = asyncio.Event()
        return self.changed

    def wake(self) -> None:
        if self.changed is not None:
            self.changed.set()
            self.changed = None


class DeltaHub:
    """In-memory streams of job text, one per running job."""

    def __init__(self, keep_seconds: float = 60.0, max_parts: int = 100_000) -> None:
        self._streams: dict[str, _Stream] = {}
        self._keep = keep_seconds
        self._max_parts = max_parts
        self._forward: Callable[[str, int | None, Piece], None] | None = None
        self._finished: deque[tuple[float, str]] = deque()  # in finishing order
        self._ended: dict[str, float] = {}  # finished jobs nobody followed: no text kept

    def forward_to(self, forward: Callable[[str, int | None, Piece], None] | None) -> None:
        """Also hand every piece accepted by `push`, and every `finish` (index None), to
        `forward` (a bridge to other servers)."""
        self._forward = forward

    def push(self, job_id: str, index: int, text: Piece) -> bool:
        """Add piece `index` of a job's text; False for a duplicate or a gap."""
        accepted = self.deliver(job_id, index, text)
        if accepted and self._forward is not None:
            self._forward(job_id, index, text)
        return accepted

    def deliver(self, job_id: str, index: int | None, text: Piece) -> bool:
        """What another server accepted (a piece, or with index None the finish): kept
        here, not forwarded."""
        if index is None:
            self._finish(job_id)
            return True
        if job_id in self._ended:
            return False
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
        self._finish(job_id)
        if self._forward is not None:
            self._forward(job_id, None, "")

    def _finish(self, job_id: str) -> None:
        stream = self._streams.get(job_id)
        if stream is None:
            stream = self._streams[job_id] = _Stream()
        stream.finished_at = time.monotonic()
        stream.wake()
        if not stream.followed:  # keep only the mark that it ended (late pieces are refused)
            del self._streams[job_id]
            self._ended[job_id] = stream.finished_at
        self._finished.append((stream.finished_at, job_id))
        self._forget_old()

    def has_parts(self, job_id: str) -> bool:
        """Pieces of the job are kept here (it runs, or finished and was followed)."""
        stream = self._streams.get(job_id)
        return bool(stream and stream.parts)

    def follow(
        self, job_id: str, is_final: Callable[[], Awaitable[bool]], every: float = 1.0
    ) -> AsyncIterator[Piece]:
        """Yield the job's pieces one by one, from the start, until it finishes. If the
        text starts over (a re-run), the pieces of the new run follow what was sent.
        `is_final` is asked when nothing happened for `every` seconds (a job can end
        without any piece, or on another server).

        The job counts as followed from this call on, not from the first read, so text
        pushed and finished before the follower's first read is kept for it."""
        stream = self._streams.get(job_id)
        if stream is None:
            if job_id in self._ended:  # finished, nobody followed it: no text kept
                return self._read(job_id, _Stream(finished_at=self._ended[job_id]), is_final, every)
            stream = self._streams[job_id] = _Stream()
        stream.followed = True
        return self._read(job_id, stream, is_final, every)

    async def _read(
        self,
        job_id: str,
        stream: _Stream,
        is_final: Callable[[], Awaitable[bool]],
        every: float,
    ) -> AsyncIterator[Piece]:
        sent, generation = 0, stream.generation
        while True:
            stream = self._streams.get(job_id) or stream
            stream.followed = True
            if stream.generation != generation:  # restarted: resume at what we sent
                generation = stream.generation
                sent = min(sent, len(stream.parts))
            while sent < len(stream.parts):
                sent += 1
                yield stream.parts[sent - 1]
            if stream.finished_at is not None:
                return
            try:
                await asyncio.wait_for(stream.waiter().wait(), every)
            except TimeoutError:
                if await is_final():
                    self.finish(job_id)

    def _forget_old(self) -> None:
        """Drop streams finished more than `keep_seconds` ago (oldest first: each
        finish costs O(1), however many streams are kept)."""
        cutoff = time.monotonic() - self._keep
        while self._finished and self._finished[0][0] < cutoff:
            finished_at, job_id = self._finished.popleft()
            stream = self._streams.get(job_id)
            if stream is not None and stream.finished_at == finished_at:
                del self._streams[job_id]
            if self._ended.get(job_id) == finished_at:
                del self._ended[job_id]

    def __len__(self) -> int:
        return len(self._streams)
