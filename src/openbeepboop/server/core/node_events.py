"""The life of one node as events, for anyone watching it (`GET /v1/nodes/{id}/events`):
its models' states and progress as its heartbeats report them, in rbee's vocabulary.

First `node` (the whole node, as `GET /v1/nodes` shows it), then, per model whose state
or progress changed: `downloading` {model, fraction} and `loading` {model, fraction}
while a model is fetched or loaded, else `state` {model, state, error?} (`ready`,
`busy`, `unloaded`, `error`); `gone` {node_id} once the node is no longer live (its
heartbeats stopped for `node_ttl_seconds`), which ends the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from openbeepboop.server.core.queue import Queue
from openbeepboop.server.errors import NotFound
from openbeepboop.server.models import JSON, Node

POLL_SECONDS = 0.5  # how often the node's row is read (a heartbeat is every second or so)


def model_states(node: Node) -> dict[str, JSON]:
    """Model name -> its latest state: the last heartbeat's, else the registration's."""
    reported = (node.stats or {}).get("models")
    models = reported if isinstance(reported, list) else node.models
    return {str(m.get("name")): m for m in models if isinstance(m, dict)}


def state_event(name: str, model: JSON) -> JSON:
    state = str(model.get("state") or "ready")
    if state in ("downloading", "loading"):
        return {"type": state, "model": name, "fraction": float(model.get("progress") or 0.0)}
    event: JSON = {"type": "state", "model": name, "state": state}
    if model.get("error"):
        event["error"] = model["error"]
    return event


async def node_events(
    queue: Queue, node_id: str, shown: Callable[[Node], JSON]
) -> AsyncGenerator[JSON, None]:
    """The node's events until it is gone; NotFound for a node that never registered or
    is no longer live. `shown` renders the first `node` event."""
    node = await queue.live_node(node_id)
    if node is None:
        raise NotFound(f"no live node {node_id!r}", param="node_id", code="node_not_found")
    yield {"type": "node", "node": shown(node)}
    last = {name: state_event(name, m) for name, m in model_states(node).items()}
    while True:
        await asyncio.sleep(POLL_SECONDS)
        node = await queue.live_node(node_id)
        if node is None:
            yield {"type": "gone", "node_id": node_id}
            return
        for name, model in model_states(node).items():
            event = state_event(name, model)
            if last.get(name) != event:
                last[name] = event
                yield event
