"""Which nodes are this server's own: nodes labelled `swarm=forward` (the forwarder,
which runs other members' models through them) are not. A member publishes, and
`/status` reports, only what its own nodes serve, so no member mistakes another's
forwarder for capacity (and no request is forwarded in a circle)."""

from __future__ import annotations

from openbeepboop.server.models import Node

FORWARD_LABEL = ("swarm", "forward")


def own_node(node: Node) -> bool:
    """Whether `node` runs models itself (not the swarm forwarder)."""
    return node.labels.get(FORWARD_LABEL[0]) != FORWARD_LABEL[1]
