"""When will a queued job start: its position over its model's measured pace.

A model's pace (jobs started per second) is measured from the store, so that every
server of a deployment (replicas sharing PostgreSQL) sees the same one: the jobs of the
model that nodes ran to the end in the last `WINDOW_SECONDS` (`Store.recent_runs`) and
the jobs of it running now (the job counters of `Store.stats`). Two readings, the larger
wins:

- the throughput: the jobs finished in the window over the time since the first of
  them started (the window's start at most): right once the model has been busy for a
  while, short when it sat idle in the window (it then measured how little was asked);
- Little's law: the jobs running now over their mean time in progress: right at once
  when a burst arrives after a quiet spell, or after an idle gap, but a snapshot of a
  count that jitters.

(Tried on bench/bench_eta.py: this beat preferring the start rate unless Little's law
is much faster, and a smoothed running count, which lags behind an idle gap.)

A job with `position` jobs before it starts at once when the model's free slots (on the
live nodes that serve it, less the jobs running) outnumber those jobs; otherwise after
`(position - free + 0.5) / pace` seconds (the half: the next slot frees, on average, half
a job's interval from now). Unknown (None) while nothing of the model ran in the window,
or while no live node serves it.

Reading the store is flat in queue length (an index range over the window's finished
jobs, and a few counter rows), and done at most once per `REFRESH_SECONDS` per server,
for every model at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from openbeepboop.server.models import JSON, JobStatus, Node, RecentRuns
from openbeepboop.server.store.base import Store

WINDOW_SECONDS = 60.0
REFRESH_SECONDS = 1.0
MIN_RUN_SECONDS = 0.001  # a job's time in progress, at the least (echo's can be 0)


@dataclass(frozen=True, slots=True)
class Pace:
    """A model's measured pace: jobs started per second, and how many run now."""

    per_second: float
    running: int


def measure(runs: RecentRuns, running: int, now: float, window: float) -> Pace:
    """The pace of a model from its recent runs and the jobs of it running now: the
    larger of its throughput and Little's law (module docstring)."""
    since = max(runs.first_started, now - window)
    throughput = runs.count / max(now - since, MIN_RUN_SECONDS)
    mean_run = max(runs.busy_seconds / runs.count, MIN_RUN_SECONDS)
    return Pace(max(throughput, running / mean_run), running)


def slots(model: str, nodes: Sequence[Node]) -> int:
    """How many jobs of `model` these nodes run at once: each node's `concurrency` for
    it (as it registered the model), else its whole capacity."""
    total = 0
    for node in nodes:
        entry = next((m for m in node.models if m.get("name") == model), {})
        concurrency = entry.get("concurrency")
        total += concurrency if isinstance(concurrency, int) else max(0, node.capacity)
    return total


def wait_seconds(position: int, free: int, pace: Pace) -> float:
    """How long until a job with `position` jobs before it starts, `free` slots open."""
    if position < free:
        return 0.0
    return (position - max(free, 0) + 0.5) / pace.per_second


class Eta:
    """Estimated start times of queued jobs, from the store's record of recent runs."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.time,
        window: float = WINDOW_SECONDS,
        refresh: float = REFRESH_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._window = window
        self._refresh = refresh
        self._measured: tuple[float, dict[str, Pace]] = (float("-inf"), {})
        self._lock = asyncio.Lock()

    async def paces(self) -> dict[str, Pace]:
        """Every model's pace that is known, measured within the last `refresh` seconds."""
        async with self._lock:  # one reading at a time; the others take its answer
            at, paces = self._measured
            now = self._clock()
            if now - at >= self._refresh:
                paces = await self._read(now)
                self._measured = (now, paces)
            return paces

    async def _read(self, now: float) -> dict[str, Pace]:
        runs = await self._store.recent_runs(now - self._window)
        counts = await self._store.stats()
        return {
            r.model: measure(r, _running(counts.get(r.model, {})), now, self._window)
            for r in runs
            if r.count > 0
        }

    async def start_at(self, model: str, position: int, nodes: Sequence[Node]) -> float | None:
        """When a queued job of `model` with `position` jobs before it should start
        (epoch seconds), given the live `nodes` that serve the model; None when unknown."""
        pace = (await self.paces()).get(model)
        if pace is None or not nodes:
            return None
        return self._clock() + wait_seconds(position, slots(model, nodes) - pace.running, pace)

    async def outlook(
        self, queued: Mapping[str, int], served: Mapping[str, Sequence[Node]]
    ) -> dict[str, JSON]:
        """Per model whose pace is known: `jobs_per_second`, and `wait_seconds`, how long
        a job queued now behind the `queued` ones (model -> count) would wait (None
        while no live node of `served` serves the model)."""
        out: dict[str, JSON] = {}
        for model, pace in sorted((await self.paces()).items()):
            nodes = served.get(model, [])
            free = slots(model, nodes) - pace.running
            wait = wait_seconds(queued.get(model, 0), free, pace) if nodes else None
            out[model] = {
                "jobs_per_second": round(pace.per_second, 3),
                "wait_seconds": None if wait is None else round(wait, 1),
            }
        return out


def _running(counts: Mapping[str, int]) -> int:
    return int(counts.get(JobStatus.IN_PROGRESS.value, 0))
