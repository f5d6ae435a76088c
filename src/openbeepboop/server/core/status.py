"""What this server is and how busy it is, in one read: the numbers behind `GET /status`
and `GET /info` (LlamaNet's native API) and the record a swarm member publishes.

The field names follow the swarm's `MemberRecord` (swarm/records.py): per model `queued`,
`running` and `nodes`, the same three as totals, and `tokens_per_s`. As in the record
(core/load.py), only this server's own nodes count, not the swarm's forwarder. Two reads
of the store, both cheap: the per-model job counters (`stats`) and the live nodes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from openbeepboop.server.core.identity import ServerIdentity
from openbeepboop.server.core.load import own_node
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.models import JobStatus, Node


@dataclass(frozen=True, slots=True)
class ModelCounts:
    """One model here: jobs waiting, jobs running, live nodes serving it."""

    queued: int = 0
    running: int = 0
    nodes: int = 0


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """The identity and the load of this server at `at` (unix time).

    `capacity` is the jobs the live nodes run at once (the sum of their slots);
    `tokens_per_s` the sum of what the live nodes report in their heartbeats (over
    their last minute); `load` the work here per slot, (queued + running) / capacity:
    0 idle, 1 every slot busy, above 1 jobs waiting (with no live node: the jobs
    waiting, as if there were one slot)."""

    id: str
    name: str
    url: str
    version: str
    started_at: float
    at: float
    uptime: float
    models: dict[str, ModelCounts] = field(default_factory=dict)
    queued: int = 0
    running: int = 0
    nodes: int = 0
    capacity: int = 0
    tokens_per_s: float = 0.0
    load: float = 0.0

    @property
    def served(self) -> list[str]:
        """The models at least one live node serves, sorted."""
        return sorted(m for m, c in self.models.items() if c.nodes > 0)


async def read_status(
    queue: Queue, identity: ServerIdentity, clock: Callable[[], float] = time.time
) -> ServerStatus:
    """This server's status now."""
    counts = await queue.store.stats()
    nodes = [n for n in await queue.live_nodes() if own_node(n)]
    models = model_counts(counts, nodes)
    queued = sum(c.queued for c in models.values())
    running = sum(c.running for c in models.values())
    capacity = sum(max(0, n.capacity) for n in nodes)
    now = clock()
    return ServerStatus(
        id=identity.id,
        name=identity.name,
        url=identity.url,
        version=identity.version,
        started_at=identity.started_at,
        at=now,
        uptime=round(max(0.0, now - identity.started_at), 3),
        models=models,
        queued=queued,
        running=running,
        nodes=len(nodes),
        capacity=capacity,
        tokens_per_s=tokens_per_s(nodes),
        load=load(queued, running, capacity),
    )


def model_counts(
    counts: dict[str, dict[str, int]], nodes: Iterable[Node]
) -> dict[str, ModelCounts]:
    """Per model (sorted by name), from the store's counters and the live nodes: every
    model with a job queued or running, or a live node serving it."""
    serving: dict[str, int] = {}
    for node in nodes:
        for name in set(node.model_names()):
            serving[name] = serving.get(name, 0) + 1
    out: dict[str, ModelCounts] = {}
    for model in sorted(set(counts) | set(serving)):
        by_status = counts.get(model, {})
        line = ModelCounts(
            queued=by_status.get(JobStatus.QUEUED.value, 0),
            running=by_status.get(JobStatus.IN_PROGRESS.value, 0),
            nodes=serving.get(model, 0),
        )
        if line.queued or line.running or line.nodes:
            out[model] = line
    return out


def tokens_per_s(nodes: Iterable[Node]) -> float:
    """The sum of the live nodes' reported tokens/s; a missing or odd figure (a node's
    word, not ours) counts as 0."""
    total = 0.0
    for node in nodes:
        value = (node.stats or {}).get("tokens_per_second")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value) and value > 0:
            total += float(value)
    return round(total, 2)


def load(queued: int, running: int, capacity: int) -> float:
    """(queued + running) per slot of the live nodes; with no slot, the jobs waiting."""
    work = queued + running
    return round(work / capacity, 3) if capacity > 0 else float(work)
