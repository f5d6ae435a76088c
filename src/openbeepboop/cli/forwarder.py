"""The swarm's forwarder: models that none of this server's own nodes serve, but another
member's do, served here by in-process nodes whose `swarm` backend sends each job on to
the least loaded member serving it (docs/swarm.md, "Forwarding").

A forwarded job stays this server's job: queued, leased, streamed, retried and kept
here like any other; only its node is one that asks another member. It lives here, in
the CLI, because it is where a server and a node meet in one process (as `serve`'s
embedded node): neither package imports the other.

- One node per forwarded model (`NodeRunner`, labelled `swarm=forward`, so that this
  server's record does not count it: core/load.py), started on the heartbeat that first
  sees the model remote-only, drained and stopped once it has not been for
  `REMOVE_AFTER_BEATS` heartbeats (a member whose record is late does not stop and start
  it). One per model rather than one node restarted with each new set: adding or
  dropping a model never disturbs the jobs the other models are running.
- The nodes talk to this server over loopback with a node key kept in
  DIR/forward-node-key (0600; made on first need, made again when revoked); at the other
  members they use the swarm-signed client key derived from this member's id
  (`derived_key(CLIENT, secret, "forward:<id>")`), the same on every start.
- Never twice: a job that came here forwarded (its metadata names the forwarding member)
  is not forwarded again; the forward node fails it as retryable, so that an own node
  may take it (and the member that sent it tries the next one).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openbeepboop.node.backends.base import Backend
from openbeepboop.node.backends.swarm import FORWARDED_METADATA, SwarmBackend, SwarmModel
from openbeepboop.node.config import NodeConfig
from openbeepboop.node.executor import Executor, ModelSettings
from openbeepboop.node.jobs import LeasedJob, Outcome
from openbeepboop.node.runner import NodeRunner
from openbeepboop.private_paths import private_dir, write_private
from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.identity import WILDCARDS
from openbeepboop.server.core.load import FORWARD_LABEL, own_node
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.core.signed_keys import derived_key
from openbeepboop.server.errors import AuthenticationFailed
from openbeepboop.server.models import Role
from openbeepboop.server.settings import ServerSettings

if TYPE_CHECKING:
    from openbeepboop.server.core.swarm import SwarmMember
    from openbeepboop.swarm.records import MemberRecord

log = logging.getLogger("openbeepboop.swarm")
KEY_FILE = "forward-node-key"
STATE_DIR = "forward"
REMOVE_AFTER_BEATS = 3
DRAIN_SECONDS = 30.0


def remote_only(members: list[MemberRecord], own: set[str]) -> set[str]:
    """The models some member's own nodes serve and none of this server's own nodes."""
    served = {m for r in members for m, load in r.models.items() if load.nodes > 0}
    return served - own


def loopback_url(settings: ServerSettings) -> str:
    """Where this process reaches its own server."""
    host = settings.host
    if host in WILDCARDS:
        host = "[::1]" if ":" in host else "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


@dataclass
class _Forwarded:
    runner: NodeRunner
    task: asyncio.Task[int]


class Forwarder:
    """The forward nodes of one server, kept in step with the swarm on each heartbeat."""

    def __init__(
        self, swarm: SwarmMember, queue: Queue, keyring: KeyRing, settings: ServerSettings
    ) -> None:
        self._swarm = swarm
        self._queue = queue
        self._keyring = keyring
        self._settings = settings
        self._node_key: str | None = None
        self._client_key = derived_key(Role.CLIENT, swarm.secret, f"forward:{swarm.member_id}")
        self._nodes: dict[str, _Forwarded] = {}
        self._last_wanted: dict[str, int] = {}  # model -> the beat that last wanted it
        self._beats = 0

    def targets(self, model: str) -> list[str]:
        """The base URLs of the members serving `model` with their own nodes, least
        loaded first (never this server: its record is not among the others')."""
        return [r.url for r in self._swarm.serving(model) if r.id != self._swarm.member_id]

    async def beat(self, members: list[MemberRecord]) -> None:
        """Start a node for each model that became remote-only, stop those that have
        not been for a while."""
        self._beats += 1
        own = {m for n in await self._queue.live_nodes() if own_node(n) for m in n.model_names()}
        for model in remote_only(members, own):
            self._last_wanted[model] = self._beats
        for model, forwarded in list(self._nodes.items()):
            if forwarded.task.done():
                del self._nodes[model]
                if _failed(forwarded.task):  # e.g. its key was revoked: check it again
                    self._node_key = None
        for model, beat in list(self._last_wanted.items()):
            running = model in self._nodes
            if self._beats - beat >= REMOVE_AFTER_BEATS:
                del self._last_wanted[model]
                if running:
                    log.info("forwarding stops", extra={"model": model})
                    self._nodes[model].runner.stop()
            elif not running:
                await self._start(model)

    async def _start(self, model: str) -> None:
        key = await self._key()
        runner = NodeRunner(self._config(model, key), backends=self._backend)
        for slot in runner.slots.values():
            slot.executor = NotTwice(slot.executor, self._forwarded_by)
        task = asyncio.create_task(runner.run(install_signals=False))
        self._nodes[model] = _Forwarded(runner, task)
        log.info("forwarding starts", extra={"model": model, "to": self.targets(model)})

    def _config(self, model: str, key: str) -> NodeConfig:
        state = self._settings.data_dir / STATE_DIR
        entry = SwarmModel(
            name=model,
            backend="swarm",
            concurrency=self._settings.forward_concurrency,
            timeout_seconds=self._settings.sync_timeout_seconds,
            max_attempts=3,
            api_key=self._client_key.secret,
            forwarded_by=self._swarm.member_id,
        )
        return NodeConfig.model_validate(
            {
                "server": {"url": loopback_url(self._settings), "api_key": key},
                "node": {
                    "name": f"swarm-forward {model}"[:256],
                    "labels": dict([FORWARD_LABEL]),
                    "state_dir": str(state),
                    "models_dir": str(state),
                    "drain_seconds": DRAIN_SECONDS,
                    "heartbeat_seconds": min(10.0, self._settings.lease_seconds / 3),
                },
                "models": [entry],
            }
        )

    def _backend(self, config: Any, models_dir: Path) -> Backend:
        return SwarmBackend(config, models_dir, targets=self.targets)

    async def _forwarded_by(self, job_id: str) -> str | None:
        job = await self._queue.store.get_job(job_id)
        mark = (job.metadata or {}).get(FORWARDED_METADATA) if job is not None else None
        return mark if isinstance(mark, str) and mark else None

    async def _key(self) -> str:
        """The forward nodes' key here: the one kept in DIR/forward-node-key while it
        works, else a new one kept there."""
        if self._node_key is not None:
            return self._node_key
        path = self._settings.data_dir / KEY_FILE
        kept = path.read_text().strip() if path.is_file() else ""
        if kept:
            try:
                await self._keyring.authenticate(kept)
                self._node_key = kept
                return kept
            except AuthenticationFailed:
                log.warning("the kept forward node key no longer works: a new one is made")
        issued = await self._keyring.create(Role.NODE, "swarm forwarder")
        private_dir(path.parent, tighten=False)
        write_private(path, issued.secret + "\n")
        self._node_key = issued.secret
        return issued.secret


class NotTwice:
    """An executor that runs a job on `inner` unless the job came here forwarded (then
    it fails it as retryable: a forward node never forwards a job a second time)."""

    def __init__(self, inner: Executor, forwarded_by: Any) -> None:
        self._inner = inner
        self._forwarded_by = forwarded_by

    @property
    def config(self) -> ModelSettings:
        return self._inner.config

    @property
    def state(self) -> str:
        return self._inner.state

    @property
    def progress(self) -> float:
        return self._inner.progress

    @property
    def error(self) -> str | None:
        return self._inner.error

    async def load(self) -> None:
        await self._inner.load()

    async def run(self, job: LeasedJob) -> Outcome:
        member = await self._forwarded_by(job.id)
        if member is not None:
            message = (
                f"job {job.id} was forwarded here by {member}: it is not forwarded again "
                f"(no node of this server serves {job.model!r} now)"
            )
            return Outcome.failed(message, "model_not_available", True)
        return await self._inner.run(job)

    async def close(self) -> None:
        await self._inner.close()

    async def unload(self) -> None:
        await self._inner.unload()


def _failed(task: asyncio.Task[int]) -> bool:
    """Whether a forward node's run ended in an error (rather than stopped)."""
    if task.cancelled():
        return False
    return task.exception() is not None or task.result() != 0


def install(app: Any) -> Forwarder | None:
    """A forwarder for the app's swarm member, run on its heartbeats (None outside a
    swarm)."""
    state = app.obb
    if state.swarm is None:
        return None
    forwarder = Forwarder(state.swarm, state.queue, state.keyring, state.settings)
    state.swarm.on_beat("forwarding", forwarder.beat)
    return forwarder
