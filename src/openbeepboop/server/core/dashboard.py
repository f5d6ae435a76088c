"""The live dashboard's numbers: one shared sampler for every viewer of the Overview and
Nodes pages.

While at least one viewer watches, one task samples the store every `step` seconds: the
per-model counters (`stats`, a read of a few rows), the jobs that finished since the
last sample (`finished_counts`, an index range of a few seconds of jobs) and the live
nodes. Each sample becomes a `Snapshot` that every watcher gets; nothing is read per
viewer. When the last viewer leaves the task stops; the next one resumes it, and the jobs
finished meanwhile are counted in one read (up to `span` seconds back).

Finished jobs are counted per step once the step is `lag` seconds old, so a job whose
finish was stamped just before a sample but committed just after it is not missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from openbeepboop.server.core.queue import Queue
from openbeepboop.server.models import JobStatus, Node

log = logging.getLogger("openbeepboop.server")


@dataclass(frozen=True, slots=True)
class ModelLine:
    """One model's counts (or the totals, model ''): jobs queued and running now, jobs
    completed and failed in the last `recent` seconds, live nodes serving it."""

    model: str
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    nodes: int = 0


@dataclass(frozen=True, slots=True)
class Bucket:
    """Jobs finished in [at, at + step), per model: (completed, failed)."""

    at: float
    by_model: dict[str, tuple[int, int]]

    @property
    def completed(self) -> int:
        return sum(c for c, _ in self.by_model.values())

    @property
    def failed(self) -> int:
        return sum(f for _, f in self.by_model.values())


@dataclass(frozen=True, slots=True)
class Depth:
    """Queued and running jobs (all models) at one sample."""

    at: float
    queued: int
    running: int


@dataclass(frozen=True)
class Snapshot:
    """What the dashboard shows at one sample. `buckets` and `depths` are the chart
    points this sample added; `memo` caches views derived from it (a rendered fragment)
    so that every viewer shares them."""

    tick: int
    at: float
    lines: list[ModelLine]
    total: ModelLine
    nodes: list[Node]
    buckets: list[Bucket]
    depths: list[Depth]
    memo: dict[str, Any] = field(default_factory=dict, compare=False)


class Dashboard:
    """The shared sampler: `watch()` yields each new snapshot while the caller listens;
    `current()` is the latest (sampled at once when none is fresh); `history()` the chart
    series of the last `span` seconds."""

    def __init__(
        self,
        queue: Queue,
        step: float = 2.0,
        recent: float = 300.0,
        span: float = 3600.0,
        lag: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.step, self.recent, self.span, self.lag = step, recent, span, lag
        self._clock = clock
        self._buckets: deque[Bucket] = deque(maxlen=int(span / step) + 1)
        self._depths: deque[Depth] = deque(maxlen=int(span / step) + 1)
        self._counted_until: float | None = None
        self._latest: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def watchers(self) -> int:
        return self._watchers

    async def current(self) -> Snapshot:
        """The latest snapshot if younger than a step, else one sampled now."""
        latest = self._latest
        if latest is not None and self._clock() - latest.at < self.step:
            return latest
        async with self._lock:
            latest = self._latest
            if latest is not None and self._clock() - latest.at < self.step:
                return latest
            return await self._sample()

    async def watch(self) -> AsyncGenerator[Snapshot, None]:
        """The current snapshot, then each new one, until the server shuts down (close it
        with `contextlib.aclosing`: the watcher is counted until then)."""
        self._watchers += 1
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run())
        try:
            seen = await self.current()
            yield seen
            while not self._closed:
                async with self._changed:
                    await self._changed.wait_for(self._newer_than(seen.tick))
                if self._closed or self._latest is None:
                    return
                seen = self._latest
                yield seen
        finally:
            self._watchers -= 1

    def _newer_than(self, tick: int) -> Callable[[], bool]:
        return lambda: self._closed or (self._latest is not None and self._latest.tick > tick)

    def history(self) -> dict[str, list[list[float]]]:
        """The chart series (uPlot's columns): throughput per step as jobs/s, completed
        and failed; queue depth, queued and running."""
        b, d = list(self._buckets), list(self._depths)
        return {
            "throughput": [
                [x.at for x in b],
                [x.completed / self.step for x in b],
                [x.failed / self.step for x in b],
            ],
            "depth": [[x.at for x in d], [x.queued for x in d], [x.running for x in d]],
        }

    async def close(self) -> None:
        """Stop the sampler and end every watcher's stream (at the server's shutdown)."""
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        if self._task is not None:
            self._task.cancel()

    # -- sampling ----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while self._watchers > 0 and not self.queue.closing:
                began = self._clock()
                try:
                    async with self._lock:
                        if self._latest is None or began - self._latest.at >= self.step / 2:
                            await self._sample()
                except Exception:  # a store hiccup: the watchers wait for the next step
                    log.exception("dashboard sample failed")
                async with self._changed:
                    self._changed.notify_all()
                await asyncio.sleep(max(0.1, self.step - (self._clock() - began)))
        finally:
            self._task = None
            if self.queue.closing:
                self._closed = True
                async with self._changed:
                    self._changed.notify_all()

    async def _sample(self) -> Snapshot:
        now = self._clock()
        counts = await self.queue.store.stats()
        nodes = await self.queue.live_nodes()
        new_buckets = await self._count_finished(now)
        depth = Depth(
            now,
            sum(c.get(JobStatus.QUEUED.value, 0) for c in counts.values()),
            sum(c.get(JobStatus.IN_PROGRESS.value, 0) for c in counts.values()),
        )
        self._depths.append(depth)
        cutoff = now - self.span
        while self._depths and self._depths[0].at < cutoff:
            self._depths.popleft()
        lines = self._lines(counts, nodes, now)
        tick = 1 + (self._latest.tick if self._latest else 0)
        total = ModelLine(
            "",
            sum(x.queued for x in lines),
            sum(x.running for x in lines),
            sum(x.completed for x in lines),
            sum(x.failed for x in lines),
            len(nodes),
        )
        self._latest = Snapshot(tick, now, lines, total, nodes, new_buckets, [depth])
        return self._latest

    async def _count_finished(self, now: float) -> list[Bucket]:
        """The buckets of the steps that ended `lag` seconds ago or earlier, not counted
        yet (after a pause, up to `span` back), zeros included."""
        until = (now - self.lag) // self.step * self.step
        since = self._counted_until
        if since is None or since < until - self.span:
            since = until - (self.span // self.step) * self.step
            self._buckets.clear()
        if until <= since:
            return []
        found: dict[int, dict[str, tuple[int, int]]] = {}
        for i, model, status, n in await self.queue.store.finished_counts(since, until, self.step):
            done, failed = found.setdefault(i, {}).get(model, (0, 0))
            if status == JobStatus.COMPLETED.value:
                done += n
            else:
                failed += n
            found[i][model] = (done, failed)
        steps = round((until - since) / self.step)
        added = [Bucket(since + i * self.step, found.get(i, {})) for i in range(steps)]
        self._buckets.extend(added)
        self._counted_until = until
        return added

    def _lines(
        self, counts: dict[str, dict[str, int]], nodes: list[Node], now: float
    ) -> list[ModelLine]:
        """One line per model that has jobs or a live node serving it."""
        recent: dict[str, tuple[int, int]] = {}
        for bucket in self._buckets:
            if bucket.at >= now - self.lag - self.recent:
                for model, (c, f) in bucket.by_model.items():
                    rc, rf = recent.get(model, (0, 0))
                    recent[model] = (rc + c, rf + f)
        serving: dict[str, int] = {}
        for node in nodes:
            for name in set(node.model_names()):
                serving[name] = serving.get(name, 0) + 1
        models = sorted(set(counts) | set(serving) | set(recent))
        return [
            ModelLine(
                m,
                counts.get(m, {}).get(JobStatus.QUEUED.value, 0),
                counts.get(m, {}).get(JobStatus.IN_PROGRESS.value, 0),
                *recent.get(m, (0, 0)),
                serving.get(m, 0),
            )
            for m in models
        ]
