"""Heartbeats: the leases of running jobs renewed in time, the node's stats reported, and
the jobs the server no longer wants from us (cancelled by their owner, or whose lease is
lost) stopped. The leases of results still waiting in the outbox are renewed too: after
an outage the server may be back before the uploader's next try, and the result must
still find its lease."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from openbeepboop.node.backends.base import JSON
from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.jobs import LeasedJob, Running
from openbeepboop.node.session import Session

log = logging.getLogger("openbeepboop.node")
MIN_SECONDS = 0.05
MAX_PENDING = 10_000  # outbox leases renewed per beat (the oldest first)


class Heartbeat:
    """Beats every `heartbeat_seconds`, or every third of the lease when that is shorter
    (the lease length comes with the first job, in server time: a skewed clock does not
    matter)."""

    def __init__(
        self,
        session: Session,
        running: Running,
        stats: Callable[[], JSON],
        heartbeat_seconds: float,
        pending: Callable[[int], list[str]] | None = None,
        back: Callable[[], None] | None = None,
    ) -> None:
        self._session = session
        self._running = running
        self._pending = pending
        self._back = back  # called when a beat goes through after failed ones
        self._failing = False
        self._stats = stats
        self._heartbeat_seconds = heartbeat_seconds
        self.lease_seconds: float | None = None

    def learn(self, job: LeasedJob) -> None:
        """Take the lease length from the first job that carries one."""
        if self.lease_seconds is None and job.lease_seconds:
            self.lease_seconds = max(0.1, job.lease_seconds)

    def every(self) -> float:
        """Seconds between two beats."""
        every = self._heartbeat_seconds
        if self.lease_seconds:
            every = min(every, self.lease_seconds / 3)
        return max(every, MIN_SECONDS)

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            await asyncio.sleep(self.every())
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat; a failed one is only logged (the next may go through)."""
        try:
            leases = self._running.lease_ids()
            if self._pending is not None:
                leases += self._pending(MAX_PENDING)
            reply = await self._session.heartbeat(leases, self._stats())
        except ServerUnreachable as exc:
            log.warning("heartbeat failed", extra={"why": str(exc)})
            self._failing = True
            return
        except ServerRefused as exc:
            log.warning("heartbeat refused", extra={"status": exc.status, "why": exc.message})
            return
        if self._failing:
            self._failing = False
            if self._back is not None:
                self._back()
        for job_id in reply.get("cancelled", []):
            self._running.stop(job_id, "cancelled")
        if lost := reply.get("lost"):
            self._running.stop_leases(set(lost), "lost")
