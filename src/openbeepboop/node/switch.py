"""Models that take turns (`[node] exclusive_models`): a node that cannot hold all its
models at once (one GPU's memory) keeps one loaded. A job of another model waits for the
running jobs of the loaded one to end; then that model is unloaded and the job's model
loaded (a switch), and the job runs. Jobs pass in the order they came, so a switch is
not put off by jobs of the loaded model that came after it.

Each switch costs a load, so the node tells the server which model it holds and since
when (`loaded`), and the server's model affinity keeps handing it that model's jobs while
they last, within `affinity_max_wait_seconds` for the others'."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from openbeepboop.node.fetcher import Slot

log = logging.getLogger("openbeepboop.node")


class ModelSwitch:
    """Which model is loaded (`held`, since when), and the turns of the jobs. `changed`
    is set after each switch (the fetch loop then asks for the new model's free slots)."""

    def __init__(self, changed: asyncio.Event) -> None:
        self.held: Slot | None = None
        self.switches = 0
        self._since = time.monotonic()
        self._changed = changed
        self._gate = asyncio.Lock()  # jobs take their turn one by one, first come first
        self._active = 0  # jobs past the gate and not yet ended
        self._idle = asyncio.Condition()

    async def start(self, slots: Sequence[Slot]) -> None:
        """At startup, every model loaded (to find the ones that cannot load): keep the
        first that loaded, unload the rest."""
        for slot in slots:
            if slot.executor.state != "ready":
                continue
            if self.held is None:
                self.held, self._since = slot, time.monotonic()
            else:
                await slot.executor.unload()

    def loaded(self) -> dict[str, float]:
        """The model loaded, with the seconds since it was (for the fetch)."""
        held = self.held
        if held is None or held.executor.state != "ready":
            return {}
        return {held.name: round(time.monotonic() - self._since, 3)}

    @asynccontextmanager
    async def turn(self, slot: Slot) -> AsyncIterator[None]:
        """Hold `slot`'s model while a job of it runs: switch to it first if need be."""
        async with self._gate:
            if slot is not self.held:
                async with self._idle:
                    await self._idle.wait_for(lambda: self._active == 0)
                await self._switch(slot)
            self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            async with self._idle:
                self._idle.notify_all()

    async def _switch(self, slot: Slot) -> None:
        started = time.monotonic()
        previous = self.held
        if previous is not None:
            await previous.executor.unload()
        self.held = None
        try:
            await slot.executor.load()
        except asyncio.CancelledError:  # the job was cancelled as its model loaded
            await slot.executor.unload()  # "unloaded": its next job loads it again
            raise
        self.held, self._since = slot, time.monotonic()
        self.switches += 1
        self._changed.set()
        log.info(
            "model switched",
            extra={
                "model": slot.name,
                "from": previous.name if previous else "",
                "seconds": round(self._since - started, 3),
            },
        )
