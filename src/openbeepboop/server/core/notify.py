"""In-process wake-ups for long-polls: a waiter listens on topics, a publisher sets them.

Topics are named in server/topics.py.
A multi-server store bridges notifications between servers (PostgreSQL: LISTEN/NOTIFY,
server/store/pg_bridge.py): it is handed every topic published here (`forward_to`) and hands
in what other servers published (`deliver`), so that waiters need not know where a
change came from. A wake-up may be spurious (a bridge re-wakes when it cannot be sure
nothing changed): a waiter re-checks its condition after every wake-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from openbeepboop.server.topics import ALL_MODELS, MODEL_PREFIX


class Notifier:
    """Sets the events of everyone listening on a topic."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._forward: Callable[[list[str]], None] | None = None

    def forward_to(self, forward: Callable[[list[str]], None] | None) -> None:
        """Also hand every published topic to `forward` (a bridge to other servers)."""
        self._forward = forward

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
        """Wake the waiters of `topics` here and, through a bridge, on other servers."""
        names = list(topics)
        self.deliver(names)
        if self._forward is not None and names:
            self._forward(names)

    def deliver(self, topics: Iterable[str]) -> None:
        """Wake the waiters of `topics` in this process only."""
        for name in topics:
            if name == ALL_MODELS:
                self.deliver([t for t in self._waiters if t.startswith(MODEL_PREFIX)])
                continue
            for event in self._waiters.get(name, ()):
                event.set()

    def publish_everything(self) -> None:
        """Wake every waiter in this process (the server is shutting down)."""
        self.deliver(list(self._waiters))

    def publish_all_models(self) -> None:
        """Wake every fetch (jobs of unknown models went back to the queue)."""
        self.publish([ALL_MODELS])

    def topics(self) -> list[str]:
        """The topics someone in this process is waiting on."""
        return list(self._waiters)

    def listeners(self) -> int:
        return sum(len(w) for w in self._waiters.values())
