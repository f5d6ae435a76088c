"""Pinning a job to a node: `node` (a node's name or id) and `node_labels` (labels the
node must all carry, from its config's `[node] labels`), given with the job.

The claim enforces a pin (the store's `fetch_jobs`); here are the rules around it: a
pin must name something a node has registered with (else a 400 that names the field),
which live nodes may run a pinned job, and what its events say while none may.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from openbeepboop.server.errors import InvalidRequest
from openbeepboop.server.models import JSON, Job, Node


@dataclass(frozen=True, slots=True)
class Pin:
    """Where a job may run: on the node named (or with the id) `node`, on a node carrying
    every label of `labels`, or both."""

    node: str | None = None
    labels: dict[str, str] | None = None

    @classmethod
    def of(cls, job: Job) -> Pin | None:
        """The job's pin, or None when it may run anywhere."""
        if job.pin_node is None and not job.pin_labels:
            return None
        return cls(job.pin_node, job.pin_labels or None)

    def admits(self, node: Node) -> bool:
        """Whether `node` may run a job pinned so."""
        return node.may_run(self.node, self.labels)

    def describe(self) -> str:
        """The pin in words: `node 'mac' with labels gpu=a100`."""
        parts = [] if self.node is None else [f"node {self.node!r}"]
        if self.labels:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
            parts.append(f"{'with' if parts else 'a node with'} labels {labels}")
        return " ".join(parts)

    def waiting_for(self) -> JSON:
        """What a queued job's events say it waits for: the pin as it was given."""
        out: JSON = {}
        if self.node is not None:
            out["node"] = self.node
        if self.labels:
            out["node_labels"] = dict(self.labels)
        return out


def check_known(pins: Iterable[Pin], nodes: Sequence[Node]) -> None:
    """InvalidRequest (naming `node` or `node_labels`) for a pin no node that registered
    (live or not, within the server's node retention) could ever satisfy: a node name
    nobody uses, labels no such node carries. A node that registers later makes the
    same pin valid."""
    for pin in pins:
        named = nodes
        if pin.node is not None:
            named = [n for n in nodes if pin.node in (n.id, n.name)]
            if not named:
                known = sorted({n.name for n in nodes})
                raise InvalidRequest(
                    f"no node named {pin.node!r} has registered"
                    + (f"; registered nodes: {', '.join(known)}" if known else ""),
                    param="node",
                    code="unknown_node",
                )
        if pin.labels and not any(pin.admits(n) for n in named):
            raise InvalidRequest(
                f"no registered {pin.describe().removeprefix('a ')}; "
                f"labels nodes registered with: {_labels_seen(named)}",
                param="node_labels",
                code="unknown_node_labels",
            )


def _labels_seen(nodes: Sequence[Node]) -> str:
    seen = sorted({f"{k}={v}" for n in nodes for k, v in n.labels.items()})
    return ", ".join(seen) if seen else "none"


def serving(served: dict[str, list[Node]], model: str, pin: Pin | None) -> bool:
    """Whether a node in `served` (model -> live nodes) runs `model` where `pin` allows."""
    nodes = served.get(model, ())
    return bool(nodes) if pin is None else any(pin.admits(n) for n in nodes)


def take_pin(body: JSON) -> tuple[JSON, str | None, dict[str, str] | None]:
    """A batch line's body without its pin, and the pin (`node`, `node_labels`), which
    is routing, not a parameter for the model. InvalidRequest when they are not a
    string and an object of strings (an endpoint's body model checks them as well; a
    template line is not checked until it runs)."""
    if "node" not in body and "node_labels" not in body:
        return body, None, None
    node, labels = body.get("node"), body.get("node_labels")
    if node is not None and (not isinstance(node, str) or not node):
        raise InvalidRequest("'node' must be a node's name or id", param="node")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
    ):
        raise InvalidRequest("'node_labels' must be an object of strings", param="node_labels")
    rest = {k: v for k, v in body.items() if k not in ("node", "node_labels")}
    return rest, node, labels or None
