"""Wake-ups and token deltas between server replicas, over PostgreSQL LISTEN/NOTIFY.

Each server keeps one dedicated connection (outside the pool) that LISTENs on two
channels and also sends this server's own notifications, in order:

- `openbeepboop_wake`: topics published on this server's `Notifier` (`model:<name>` on
  submit and re-queue, `job:<id>` on final states, `nodes`, ...), newline-separated;
- `openbeepboop_delta`: token deltas accepted by this server's `DeltaHub`, and finishes,
  as JSON `[[job_id, index, text], ...]` (index null: the job finished). A piece too big
  for one notification (PostgreSQL allows 8000 bytes) travels as fragments
  `[job_id, index, text_part, part, parts]`, joined again on arrival.

What arrives is handed to the local notifier and hub (`deliver`); our own notifications
(same backend pid) are skipped. Everything is sent after the change it announces was
committed, so a woken waiter finds it.

Notifications can be missed: the connection drops (PostgreSQL restarts, the backend is
terminated: the loop reconnects with backoff and keeps what it had not sent), or a
server dies between its COMMIT and its NOTIFY. So once a second a fallback re-checks
what this server's waiters wait for: fetches of models that have queued jobs, and
waiters of jobs that are final, are woken; waiters of other topics are simply woken
(they re-check). A missed notification costs at most about a second. Deltas missed
while disconnected are not replayed: a stream that missed pieces gets the rest of the
text from the final result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg
import orjson

from openbeepboop.server.models import Piece
from openbeepboop.server.store.base import DeltaRelay, TopicRelay
from openbeepboop.server.topics import JOB_PREFIX, MODEL_PREFIX


class Probe(Protocol):
    """What the fallback asks the database (the store answers)."""

    async def models_with_queued_jobs(self, models: Sequence[str]) -> list[str]:
        """Which of `models` have a queued job."""

    async def final_job_ids(self, job_ids: Sequence[str]) -> list[str]:
        """Which of `job_ids` are final."""


log = logging.getLogger("openbeepboop.store.pg_bridge")

WAKE = "openbeepboop_wake"
DELTA = "openbeepboop_delta"
PAYLOAD_BYTES = 7900  # PostgreSQL refuses payloads of 8000 bytes or more
FRAGMENT_CHARS = 1000  # at most 6 bytes each once JSON-escaped
MAX_PENDING = 100_000  # beyond this (a long outage), unsent items are dropped
_SEND = "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)"

Item = tuple[str, Any]  # ("t", topic) or ("d", [job_id, index | None, text])


class PgBridge:
    """Carries one server's notifier topics and deltas to the others, and theirs here."""

    def __init__(
        self,
        url: str,
        probe: Probe,
        notifier: TopicRelay,
        deltas: DeltaRelay,
        fallback_seconds: float = 1.0,
        ping_seconds: float = 5.0,
    ) -> None:
        self._url = url
        self._probe = probe
        self._notifier = notifier
        self._deltas = deltas
        self._fallback = fallback_seconds
        self._ping = ping_seconds
        self._pending: list[Item] = []
        self._wake = asyncio.Event()  # something to send, or the connection was lost
        self._lost = False
        self._own_pid = -1
        self._fragments: dict[tuple[str, int], list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.sent = self.received = 0  # notifications, for tests and curiosity

    def start(self) -> None:
        self._notifier.forward_to(self._topics_out)
        self._deltas.forward_to(self._delta_out)
        self._tasks = [
            asyncio.create_task(self._connection_loop(), name="pg-bridge"),
            asyncio.create_task(self._fallback_loop(), name="pg-bridge-fallback"),
        ]

    async def stop(self) -> None:
        self._notifier.forward_to(None)
        self._deltas.forward_to(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # -- outgoing ---------------------------------------------------------------

    def _topics_out(self, topics: list[str]) -> None:
        self._queue([("t", t) for t in topics])

    def _delta_out(self, job_id: str, index: int | None, piece: Piece) -> None:
        self._queue([("d", [job_id, index, piece])])

    def _queue(self, items: list[Item]) -> None:
        if len(self._pending) > MAX_PENDING:
            log.warning("dropping %d unsent notifications (database away)", len(self._pending))
            self._pending.clear()  # the fallback re-checks waiters; streams end from results
        self._pending.extend(items)
        self._wake.set()

    async def _connection_loop(self) -> None:
        """Connect, LISTEN, send what is pending; reconnect with backoff when lost."""
        delay, down_since = 0.1, 0.0
        while True:
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=5,
                    server_settings={"application_name": "openbeepboop-bridge"},
                )
                self._lost = False
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(WAKE, self._on_wake)
                await conn.add_listener(DELTA, self._on_delta)
                self._own_pid = conn.get_server_pid()
                if down_since:  # what was missed meanwhile: the fallback's next re-check
                    log.info(
                        "notifications reconnected after %.1f s", time.monotonic() - down_since
                    )
                delay, down_since = 0.1, 0.0
                self.connected.set()
                await self._pump(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not down_since:
                    down_since = time.monotonic()
                    log.warning("notifications connection lost (%s); reconnecting", exc)
            finally:
                self.connected.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    def _on_terminated(self, _conn: object) -> None:
        self._lost = True
        self._wake.set()

    async def _pump(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        """Send pending notifications as they come; ping when idle. Returns never: it
        raises when the connection is gone."""
        while True:
            if self._lost or conn.is_closed():
                raise ConnectionError("the connection was closed")
            if not self._pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self._ping)
                except TimeoutError:
                    await conn.fetchval("SELECT 1", timeout=self._ping)
                continue
            items, self._pending = self._pending, []
            channels, payloads = encode(items)
            try:
                await conn.execute(_SEND, channels, payloads)
            except BaseException:
                self._pending[:0] = items  # sent again after reconnecting (wake-ups are
                raise  # idempotent; a delta seen twice is refused as a duplicate)
            self.sent += len(payloads)

    # -- incoming ---------------------------------------------------------------

    def _on_wake(self, _conn: Any, pid: int, _channel: str, payload: object) -> None:
        if pid == self._own_pid:
            return
        self.received += 1
        self._notifier.deliver(str(payload).split("\n"))

    def _on_delta(self, _conn: Any, pid: int, _channel: str, payload: object) -> None:
        if pid == self._own_pid:
            return
        self.received += 1
        try:
            items = orjson.loads(str(payload))
        except orjson.JSONDecodeError:
            log.warning("ignoring a malformed delta notification")
            return
        for item in items:
            if len(item) == 3:
                self._deltas.deliver(item[0], item[1], item[2])
            else:
                self._fragment(*item)

    def _fragment(
        self, job_id: str, index: int, text: str, part: int, parts: int, kind: str = "t"
    ) -> None:
        key = (job_id, index)
        got = self._fragments.setdefault(key, [])
        if part != len(got):  # a fragment went missing: give this piece up
            self._fragments.pop(key, None)
            return
        got.append(text)
        if len(got) == parts:
            del self._fragments[key]
            joined = "".join(got)
            piece: Piece = joined if kind == "t" else orjson.loads(joined)
            self._deltas.deliver(job_id, index, piece)

    # -- the fallback -------------------------------------------------------------

    async def _fallback_loop(self) -> None:
        while True:
            await asyncio.sleep(self._fallback)
            try:
                await self.recheck()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: try again next time
                log.debug("fallback re-check failed: %s", exc)

    async def recheck(self) -> None:
        """Wake this server's waiters whose condition may have changed unannounced."""
        topics = self._notifier.topics()
        models = [t.removeprefix(MODEL_PREFIX) for t in topics if t.startswith(MODEL_PREFIX)]
        jobs = [t.removeprefix(JOB_PREFIX) for t in topics if t.startswith(JOB_PREFIX)]
        others = [t for t in topics if not t.startswith((MODEL_PREFIX, JOB_PREFIX))]
        wake = others
        if models:
            ready = await self._probe.models_with_queued_jobs(models)
            wake += [MODEL_PREFIX + m for m in ready]
        if jobs:
            wake += [JOB_PREFIX + j for j in await self._probe.final_job_ids(jobs)]
        if wake:
            self._notifier.deliver(wake)


def encode(items: Sequence[Item]) -> tuple[list[str], list[str]]:
    """Pack items, in order, into as few notifications as fit (channel, payload)."""
    channels: list[str] = []
    payloads: list[str] = []
    topics: dict[str, None] = {}
    size = 0
    deltas: list[list[Any]] = []
    dsize = 0

    def flush_topics() -> None:
        nonlocal size
        if topics:
            channels.append(WAKE)
            payloads.append("\n".join(topics))
            topics.clear()
            size = 0

    def flush_deltas() -> None:
        nonlocal dsize
        if deltas:
            channels.append(DELTA)
            payloads.append(orjson.dumps(deltas).decode())
            deltas.clear()
            dsize = 0

    for kind, value in items:
        if kind == "t":
            flush_deltas()
            n = len(value.encode()) + 1
            if n > PAYLOAD_BYTES:
                log.warning("topic too long to notify other servers: %.60s...", value)
                continue
            if value not in topics:
                if size + n > PAYLOAD_BYTES:
                    flush_topics()
                topics[value] = None
                size += n
            continue
        flush_topics()
        for piece in _split(value):
            n = len(orjson.dumps(piece)) + 1
            if dsize + n > PAYLOAD_BYTES:
                flush_deltas()
            deltas.append(piece)
            dsize += n
    flush_topics()
    flush_deltas()
    return channels, payloads


def _split(delta: list[Any]) -> list[list[Any]]:
    """A delta as one item, or as fragments when it is long: fragments of its text, or of
    the JSON of its chunk choices (marked "j")."""
    job_id, index, piece = delta
    text = piece if isinstance(piece, str) else orjson.dumps(piece).decode()
    if len(text) <= FRAGMENT_CHARS:
        return [delta]
    parts = [text[i : i + FRAGMENT_CHARS] for i in range(0, len(text), FRAGMENT_CHARS)]
    if isinstance(piece, str):
        return [[job_id, index, part, n, len(parts)] for n, part in enumerate(parts)]
    return [[job_id, index, part, n, len(parts), "j"] for n, part in enumerate(parts)]
