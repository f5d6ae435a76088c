"""In-process wake-ups for long-polls: a waiter listens on topics, a publisher sets them.

Topics used by the queue: `model:<name>` (work for that model appeared), `job:<id>`
(that job reached a final state) and `nodes` (the set of live nodes changed). A
multi-server store bridges its own notifications (e.g. PostgreSQL LISTEN/NOTIFY) into
`publish` so that waiters need not know where a change came from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

MODEL_PREFIX = "model:"


def model_topic(model: str) -> str:
    """Published when jobs for `model` are queued."""
    return MODEL_PREFIX + model


def job_topic(job_id: str) -> str:
    """Published when the job reaches a final state."""
    return "job:" + job_id


NODES_TOPIC = "nodes"


class Notifier:
    """Sets the events of everyone listening on a topic."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def listen(self, topics: Iterable[str]) -> Iterator[asyncio.Event]:
        """An event set whenever one of `topics` is published while the block runs.
        Listen first, then check the state, then wait: no wake-up is missed."""
        event = asyncio.Event()
        names = list(dict.fromkeys(topics))
        for name in names:
            self._waiters.setdefault(name, set()).add(event)
        try:
            yield event
        finally:
            for name in names:
                waiters = self._waiters.get(name)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[name]

    def publish(self, topics: Iterable[str]) -> None:
        for name in topics:
            for event in self._waiters.get(name, ()):
                event.set()

    def publish_everything(self) -> None:
        """Wake every waiter (the server is shutting down)."""
        self.publish(list(self._waiters))

    def publish_all_models(self) -> None:
        """Wake every fetch (jobs of unknown models went back to the queue)."""
        self.publish([t for t in self._waiters if t.startswith(MODEL_PREFIX)])

    def listeners(self) -> int:
        return sum(len(w) for w in self._waiters.values())
