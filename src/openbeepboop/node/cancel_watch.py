"""Cancels heard at once: while jobs run, the node keeps one long-poll open
(`/internal/queue/watch`) that names their leases; the server answers it the moment
one of those jobs is cancelled, and the job's task is cancelled here. A generation so
stops within milliseconds of its owner's cancel instead of at the node's next heartbeat
(up to `lease_seconds / 3`, 20 s by default).

Why a long-poll rather than, say, a list of cancelled jobs in the answer to the delta
push: not every running job pushes pieces (a long prompt's prefill, a backend that
answers whole, a provider that has not answered yet), and a long-poll answers in
milliseconds whatever the job does, yet costs one idle connection and nothing else
while no job is cancelled (none at all while no job runs).

A job that starts while the poll is open is not in it: the poll is dropped (its
connection closed, which ends it on the server too) and made again for the new set,
at most every RENEW_SECONDS so that a node starting hundreds of jobs a second does not
make a call for each (a job cancelled in its first RENEW_SECONDS is heard of that much
later). Jobs that end stay in the open poll until it answers, which is harmless: the
server reports only cancelled ones. A server without the call (404) leaves cancels to the
heartbeat, as before it existed."""

from __future__ import annotations

import asyncio
import logging

from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.jobs import Running
from openbeepboop.node.session import Session

log = logging.getLogger("openbeepboop.node")
WATCH_SECONDS = 30.0  # one long-poll's length (the server may cut it shorter)
RENEW_SECONDS = 0.2  # the shortest life of a poll dropped for new jobs
RETRY_SECONDS = 1.0  # after a failed poll; the heartbeat still carries cancels meanwhile


class CancelWatch:
    """Keeps the watch open over the running jobs' leases and stops the jobs the
    server says were cancelled (`Running.stop(job_id, "cancelled")`)."""

    def __init__(self, session: Session, running: Running) -> None:
        self._session = session
        self._running = running
        self._changed = asyncio.Event()
        self.supported = True  # False once the server said it has no such call

    def started(self) -> None:
        """A job started: watch it too (the open poll is made again)."""
        self._changed.set()

    async def run(self) -> None:
        """Watch until cancelled (or for good, once the server turns out to lack it)."""
        while self.supported:
            self._changed.clear()
            leases = self._running.leases()
            if not leases:
                await self._changed.wait()
                continue
            await self._watch_once(leases)

    async def _watch_once(self, leases: dict[str, str]) -> None:
        renew_at = asyncio.get_running_loop().time() + RENEW_SECONDS
        poll = asyncio.ensure_future(self._session.watch(leases, WATCH_SECONDS))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({poll, changed}, return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():  # new jobs: let more start before the poll is made again
                delay = renew_at - asyncio.get_running_loop().time()
                await asyncio.wait({poll}, timeout=max(delay, 0))
        finally:
            for waiting in (poll, changed):
                if not waiting.done():
                    waiting.cancel()
            await asyncio.gather(poll, changed, return_exceptions=True)
        if poll.cancelled():  # the set of jobs changed: watch again
            return
        try:
            cancelled = poll.result()
        except ServerRefused as exc:
            if exc.status in (404, 405) and exc.code != "node_not_registered":
                self.supported = False
                log.warning("the server has no cancel watch; cancels come with heartbeats")
                return
            await self._pause(f"{exc.status} {exc.message}")
            return
        except ServerUnreachable as exc:
            await self._pause(str(exc))
            return
        except Exception as exc:  # an answer not as documented: the heartbeat still works
            log.warning("cancel watch failed", extra={"why": f"{type(exc).__name__}: {exc}"})
            await self._pause(str(exc))
            return
        for job_id in cancelled:
            self._running.stop(job_id, "cancelled")

    async def _pause(self, why: str) -> None:
        log.debug("cancel watch failed", extra={"why": why})
        await asyncio.sleep(RETRY_SECONDS)
