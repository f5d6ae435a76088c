"""This server's load as the swarm sees it: per model, jobs queued and running and the
live nodes serving it; totals; tokens per second over the live nodes.

Nodes labelled `swarm=forward` (the forwarder, which runs other members' models here)
are not counted: a member publishes only what its own nodes serve."""

from __future__ import annotations

from dataclasses import dataclass

from openbeepboop.server.core.queue import Queue
from openbeepboop.server.models import Node
from openbeepboop.swarm.records import ModelLoad

FORWARD_LABEL = ("swarm", "forward")


@dataclass(frozen=True, slots=True)
class Load:
    """What a member's record says about its work."""

    models: dict[str, ModelLoad]
    queued: int
    running: int
    nodes: int
    tokens_per_s: float


def own_node(node: Node) -> bool:
    """Whether `node` runs models itself (not the swarm forwarder)."""
    return node.labels.get(FORWARD_LABEL[0]) != FORWARD_LABEL[1]


async def read_load(queue: Queue) -> Load:
    per_model = await queue.store.stats()
    nodes = [n for n in await queue.live_nodes() if own_node(n)]
    serving: dict[str, int] = {}
    for node in nodes:
        for name in node.model_names():
            serving[name] = serving.get(name, 0) + 1
    models = {
        name: ModelLoad(
            queued=int(per_model.get(name, {}).get("queued", 0)),
            running=int(per_model.get(name, {}).get("running", 0)),
            nodes=serving.get(name, 0),
        )
        for name in set(per_model) | set(serving)
        if serving.get(name)
        or per_model.get(name, {}).get("queued")
        or per_model.get(name, {}).get("running")
    }
    return Load(
        models=models,
        queued=sum(m.queued for m in models.values()),
        running=sum(m.running for m in models.values()),
        nodes=len(nodes),
        tokens_per_s=sum(_number(n.stats.get("tokens_per_second")) for n in nodes),
    )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value >= 0 else 0.0
