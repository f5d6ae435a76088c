"""Results to the server: each is written to the outbox (on disk) before anything is
sent, then sent in batches and deleted once the server has answered for it, so that a
result survives a server outage and a node restart."""

from __future__ import annotations

import asyncio
import logging
import time

from openbeepboop.node.backends.base import JSON
from openbeepboop.node.backoff import Backoff, pause
from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.jobs import Outcome
from openbeepboop.node.outbox import Outbox, Pending
from openbeepboop.node.session import Session

log = logging.getLogger("openbeepboop.node")
SUBMIT_BATCH = 200
REFUSED_PAUSE = 30.0  # after an upload refused for a reason a retry will not change soon
UNREADABLE = (400, 413, 422)  # a batch the server cannot take: send its results one by one


class Uploader:
    """Sends the outbox whenever a result is put in it, retrying while the server is
    away. `release_now` (a second stop signal) ends the retries: what is left is sent on
    the next start."""

    def __init__(self, session: Session, outbox: Outbox, release_now: asyncio.Event) -> None:
        self._session = session
        self._outbox = outbox
        self._release_now = release_now
        self._ready = asyncio.Event()
        self._retry_now = asyncio.Event()  # the server answers again: no more backing off

    def put(self, job_id: str, lease_id: str, outcome: Outcome) -> None:
        """Write the outcome to the outbox, then have it sent."""
        self._outbox.put(Pending(job_id, lease_id, outcome.payload))
        self._ready.set()

    def server_back(self) -> None:
        """The server answers again after an outage (a heartbeat went through): retry
        now rather than at the end of the backoff, so results reach it while their
        leases are fresh."""
        self._retry_now.set()

    async def run(self) -> None:
        """Send the outbox each time something is put in it, until cancelled (results
        a previous run left there go first)."""
        self._ready.set()
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self.flush()

    async def flush(self, deadline: float | None = None) -> None:
        """Send everything in the outbox, retrying while the server cannot be reached,
        until `deadline` (monotonic) or `release_now`."""
        backoff = Backoff()
        while items := self._outbox.take(SUBMIT_BATCH):
            try:
                answers = await self._session.submit([_body(item) for item in items])
            except ServerRefused as exc:
                if exc.status in UNREADABLE:
                    await self._send_one_by_one(items)
                    continue
                log.error("result upload refused", extra={"status": exc.status, "why": exc.message})
                delay = REFUSED_PAUSE
            except ServerUnreachable as exc:
                if self._give_up(deadline):
                    return
                log.warning("result upload failed; will retry", extra={"why": str(exc)})
                delay = backoff.next_delay()
            else:
                backoff.reset()
                self._acknowledged(answers)
                continue
            if self._give_up(deadline):
                return
            await pause(delay, self._release_now, self._retry_now)
            self._retry_now.clear()

    def _give_up(self, deadline: float | None) -> bool:
        past = deadline is not None and time.monotonic() > deadline
        return past or self._release_now.is_set()

    def _acknowledged(self, answers: list[JSON]) -> None:
        self._outbox.remove([a["job_id"] for a in answers])
        for answer in answers:
            if not answer.get("accepted"):
                log.info(
                    "result refused",
                    extra={"job": answer["job_id"], "reason": answer.get("reason")},
                )

    async def _send_one_by_one(self, items: list[Pending]) -> None:
        """A batch the server cannot parse: send items alone; one it still refuses is
        replaced by an error so that its job fails visibly instead of looping here."""
        for item in items:
            try:
                await self._session.submit([_body(item)])
            except ServerRefused as exc:
                message = f"the server refused the result: {exc.message}"
                rejected = Outcome.failed(message, "result_rejected", retryable=False)
                self._outbox.put(Pending(item.job_id, item.lease_id, rejected.payload))
                continue
            except ServerUnreachable:
                return
            self._outbox.remove([item.job_id])


def _body(item: Pending) -> JSON:
    return {"job_id": item.job_id, "lease_id": item.lease_id, **item.payload}
