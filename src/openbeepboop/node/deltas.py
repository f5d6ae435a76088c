"""Token deltas: the stream of running jobs (text, and OpenAI chunk choices for the rest:
other choices, tool-call fragments, logprobs), pushed to the server as it is made for
clients that stream (`/internal/queue/events`).

Deltas are best effort (the submitted result is what counts), so they are batched: one
call every DELTA_SECONDS carries every job's new pieces. The first piece of a job whose
client streams goes at once instead, since a client is waiting to see it."""

from __future__ import annotations

import asyncio
import contextlib

from openbeepboop.node.backends.base import JSON
from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.jobs import LeasedJob
from openbeepboop.node.session import Session

DELTA_SECONDS = 0.05
FIRST_PIECE_SECONDS = 1.0  # the longest a generation waits for its first piece's push


class DeltaPusher:
    """Collects pieces from the executors and pushes them, one call at a time so that a
    job's pieces arrive in order."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._waiting: list[JSON] = []
        self._one_at_a_time = asyncio.Lock()
        self._sending: set[asyncio.Future[None]] = set()

    def push(
        self,
        job: LeasedJob,
        index: int,
        text: str,
        choices: list[JSON] | None,
        progress: JSON | None = None,
    ) -> None:
        """Queue the `index`th piece of `job`'s stream (0 starts it over): the first
        choice's text, and the chunk choices when the piece carries more than that; or
        the progress of the model the job waits for."""
        event = {"job_id": job.id, "lease_id": job.lease_id, "index": index, "delta": text}
        if choices:
            event["choices"] = choices
        if progress:
            event["progress"] = progress
        self._waiting.append(event)

    async def run(self) -> None:
        """Push what is waiting every DELTA_SECONDS, until cancelled."""
        while True:
            await asyncio.sleep(DELTA_SECONDS)
            await self.send()

    async def send_first_piece(self) -> None:
        """Send now rather than at the next tick. The caller (a generation) waits for
        that send, so that a fast backend's burst does not delay it, but not for long:
        a slow server must not stall the generation."""
        send = asyncio.ensure_future(self.send())
        self._sending.add(send)  # a reference while it runs on after a timeout
        send.add_done_callback(self._sending.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(send), FIRST_PIECE_SECONDS)

    async def send(self) -> None:
        """Send the waiting pieces; those that cannot be delivered are dropped."""
        async with self._one_at_a_time:
            if not self._waiting:
                return
            batch, self._waiting = self._waiting, []
            with contextlib.suppress(ServerUnreachable, ServerRefused):
                await self._session.events(batch)
