"""The node's standing with its server: the `node_id` it registered under, and the node
protocol's calls made under that id (docs/node-protocol.md).

A server that has forgotten the node (a fresh database) answers 404
`node_not_registered`; whichever call meets that registers the node again (once, however
many loops notice at the same time) and is made once more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from openbeepboop.node import hardware
from openbeepboop.node.backends.base import JSON
from openbeepboop.node.backoff import until_reachable
from openbeepboop.node.client import ServerClient, ServerRefused

log = logging.getLogger("openbeepboop.node")
T = TypeVar("T")


class Session:
    """Registers the node and makes its calls with the current `node_id`.

    `models` says what the node serves (name, state, ...) at the moment it registers;
    `stopping` ends the wait for an unreachable server; with `llama`, the machine's
    description (hardware.py) says what llama.cpp can offload to."""

    def __init__(
        self,
        client: ServerClient,
        name: str,
        models: Callable[[], list[JSON]],
        capacity: int,
        stopping: asyncio.Event,
        llama: bool = False,
    ) -> None:
        self.client = client
        self.name = name
        self.node_id = ""
        self._models = models
        self._capacity = capacity
        self._stopping = stopping
        self._registering = asyncio.Lock()
        self._llama = llama
        self._hardware: JSON | None = None

    async def register(self, give_up: bool = False) -> None:
        """Register, retrying while the server is unreachable: until `stopping`, or four
        times when `give_up` (batch mode). Raises ServerUnreachable or ServerRefused."""
        if self._hardware is None:  # once: nvidia-smi and llama.cpp's report take a while
            self._hardware = await asyncio.to_thread(hardware.detect, self._llama)
        found = self._hardware
        call = lambda: self.client.register(  # noqa: E731
            self.name, self._models(), self._capacity, found
        )
        attempts = 4 if give_up else None
        self.node_id = await until_reachable(call, self._stopping, attempts)
        log.info("registered", extra={"node_id": self.node_id, "node_name": self.name})

    async def fetch(
        self,
        models: list[str],
        max_jobs: int,
        wait: float,
        loaded: dict[str, float] | None = None,
    ) -> list[JSON]:
        """Lease up to `max_jobs` jobs of `models`; a long-poll of `wait` seconds.
        `loaded`: the models loaded now, each with the seconds it has been (affinity)."""
        if not loaded:
            return await self._call(lambda node: self.client.fetch(node, models, max_jobs, wait))
        return await self._call(
            lambda node: self.client.fetch(node, models, max_jobs, wait, loaded)
        )

    async def heartbeat(self, lease_ids: list[str], stats: JSON) -> JSON:
        """Extend `lease_ids`; the answer lists the leases lost and the jobs cancelled."""
        return await self._call(lambda node: self.client.heartbeat(node, lease_ids, stats))

    async def watch(self, leases: dict[str, str], wait: float) -> list[str]:
        """The jobs among `leases` (job id -> lease id) cancelled; a long-poll of `wait`
        seconds that answers as soon as one is."""
        return await self._call(lambda node: self.client.watch(node, leases, wait))

    async def events(self, events: list[JSON]) -> int:
        """Push text deltas of running jobs."""
        return await self._call(lambda node: self.client.events(node, events))

    async def demand(self, prefixes: list[str]) -> list[str]:
        """The models of queued jobs that start with one of `prefixes`."""
        return await self._call(lambda node: self.client.demand(node, prefixes))

    async def submit(self, results: list[JSON]) -> list[JSON]:
        """Send results; the answer says, for each, whether the server took it."""
        return await self._call(lambda node: self.client.submit(node, results))

    async def _call(self, call: Callable[[str], Awaitable[T]]) -> T:
        node_id = self.node_id
        try:
            return await call(node_id)
        except ServerRefused as exc:
            if exc.code != "node_not_registered":
                raise
        async with self._registering:
            if self.node_id == node_id:  # not yet done by another loop
                await self.register()
        return await call(self.node_id)
