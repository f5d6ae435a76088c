"""Fetching: one long-poll loop per ready model, each asking for as many jobs as its
model has free slots, so that a busy model never keeps another model's free slots
waiting; or, when the models take turns (`exclusive_models`, switch.py), one loop for
them all that reports the model loaded. Jobs are parsed here, once, into `LeasedJob`s."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from openbeepboop.node.backends.base import JSON
from openbeepboop.node.backoff import Backoff, pause
from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.executor import SERVING, Executor
from openbeepboop.node.jobs import LeasedJob, MalformedJob
from openbeepboop.node.session import Session

log = logging.getLogger("openbeepboop.node")
REFUSED_PAUSE = 5.0  # after a fetch the server refused for another reason than ours


@dataclass(eq=False)
class Slot:
    """One configured model: its executor and how many of its jobs run now."""

    executor: Executor
    running: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a job ended, or stop

    @property
    def name(self) -> str:
        return self.executor.config.name

    def free(self) -> int:
        """How many more jobs the model takes now (none unless it serves: ready, or unloaded)."""
        if self.executor.state not in SERVING:
            return 0
        return self.executor.config.concurrency - self.running


class Turns(Protocol):
    """Models that take turns: the one loaded (`held`), and `loaded()` for the fetch."""

    @property
    def held(self) -> Slot | None: ...

    def loaded(self) -> dict[str, float]: ...


class Fetcher:
    """Leases jobs for free slots and hands each to `start` (or to `reject` when the
    server sent something that is not a job). `stop` ends the loops at once, long-polls
    in flight included; `stopping` is set by then."""

    def __init__(
        self,
        session: Session,
        slots: list[Slot],
        start: Callable[[LeasedJob], None],
        reject: Callable[[MalformedJob], None],
        poll_seconds: float,
        stopping: asyncio.Event,
        turns: Turns | None = None,
    ) -> None:
        self._session = session
        self._turns = turns
        self._slots = slots
        self._start = start
        self._reject = reject
        self._poll_seconds = poll_seconds
        self._stopping = stopping
        self._fetching: set[asyncio.Task[list[JSON]]] = set()
        self._added: set[asyncio.Task[None]] = set()

    async def run(self, batch: bool = False) -> None:
        """Fetch until `stop`; in `batch` mode, until no model finds anything more."""
        if self._turns is not None:
            await self._turns_loop(self._turns, batch)
            return
        ready = [slot for slot in self._slots if slot.executor.state in SERVING]
        await asyncio.gather(*(self._model_loop(slot, batch) for slot in ready))
        await asyncio.gather(*self._added, return_exceptions=True)

    def add(self, slot: Slot) -> None:
        """Fetch for one more model from now on (a model added on demand)."""
        self._slots.append(slot)
        task = asyncio.create_task(self._model_loop(slot, batch=False))
        self._added.add(task)
        task.add_done_callback(self._added.discard)

    def stop(self) -> None:
        """Interrupt the loops (call after setting `stopping`). A cancelled long-poll
        closes its connection (aiohttp drops a connection whose answer is unread), so
        the server sees the node leave and leases it nothing more while it drains."""
        for task in self._fetching:
            task.cancel()
        for slot in self._slots:
            slot.changed.set()

    async def _model_loop(self, slot: Slot, batch: bool) -> None:
        models, backoff = [slot.name], Backoff()
        wait = 0.0 if batch else self._poll_seconds
        while not self._stopping.is_set():
            free = slot.free()
            if free <= 0:
                await self._wait_change(slot)
                continue
            jobs = await self._fetch(models, free, wait, backoff)
            if jobs is None:
                continue
            if not jobs and batch:
                if slot.running == 0:
                    return
                await self._wait_change(slot)
            for raw in jobs:
                self._take(raw)

    async def _turns_loop(self, turns: Turns, batch: bool) -> None:
        """One loop for models that take turns (their slots share one `changed` event):
        asks for every model, as many jobs as the loaded one has free slots, and says
        which is loaded, so the server prefers its jobs; fetches nothing while a job of
        another model waits for its switch."""
        backoff = Backoff()
        wait = 0.0 if batch else self._poll_seconds
        anchor = self._slots[0]
        while not self._stopping.is_set():
            held = turns.held
            busy = [slot for slot in self._slots if slot.running]
            models = [slot.name for slot in self._slots if slot.executor.state in SERVING]
            free = 1 if held is None else held.free()
            if any(slot is not held for slot in busy) or free <= 0 or not models:
                await self._wait_change(anchor)
                continue
            jobs = await self._fetch(models, free, wait, backoff, turns.loaded())
            if jobs is None:
                continue
            if not jobs and batch:
                if not busy:
                    return
                await self._wait_change(anchor)
            for raw in jobs:
                self._take(raw)

    async def _fetch(
        self,
        models: list[str],
        max_jobs: int,
        wait: float,
        backoff: Backoff,
        loaded: dict[str, float] | None = None,
    ) -> list[JSON] | None:
        """The jobs leased, or None after a failure (and its pause) or a stop."""
        task = asyncio.create_task(self._session.fetch(models, max_jobs, wait, loaded))
        self._fetching.add(task)
        try:
            jobs = await task
        except asyncio.CancelledError:
            if self._stopping.is_set():
                return None
            raise
        except ServerUnreachable as exc:
            log.warning("fetch failed; backing off", extra={"why": str(exc)})
            await pause(backoff.next_delay(), self._stopping)
            return None
        except ServerRefused as exc:
            log.error("fetch refused", extra={"status": exc.status, "why": exc.message})
            await pause(REFUSED_PAUSE, self._stopping)
            return None
        finally:
            self._fetching.discard(task)
        backoff.reset()
        return jobs

    def _take(self, raw: JSON) -> None:
        try:
            job = LeasedJob.parse(raw)
        except MalformedJob as exc:
            self._reject(exc)
            return
        self._start(job)

    async def _wait_change(self, slot: Slot) -> None:
        """Until one of the slot's jobs ends, or the node stops."""
        slot.changed.clear()
        if not self._stopping.is_set():
            await slot.changed.wait()
