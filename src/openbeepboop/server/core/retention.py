"""Retention: final jobs (with their results), finished batches and files that have
outlived their settings are deleted, a few hundred rows per transaction, each followed by
a pause nine times as long as it took: the pruner takes about a tenth of the database's
time, however busy the queue, and the queue's own writes are never held up for long.

Never pruned: a job that is not final, a job of a batch that is not final (its output
is not written yet), a file that a batch still running reads or writes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from openbeepboop.server.core.passes import one_pass
from openbeepboop.server.models import JobStatus
from openbeepboop.server.store.base import Store

log = logging.getLogger("openbeepboop.retention")

# Which final statuses each setting covers (expired jobs are kept as failed ones are).
JOB_KINDS = {
    JobStatus.COMPLETED: "completed_seconds",
    JobStatus.FAILED: "failed_seconds",
    JobStatus.EXPIRED: "failed_seconds",
    JobStatus.CANCELLED: "cancelled_seconds",
}


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long each kind is kept (0: forever), and how gently it is pruned."""

    completed_seconds: float = 0.0
    failed_seconds: float = 0.0
    cancelled_seconds: float = 0.0
    batches_seconds: float = 0.0
    batch_rows: int = 500  # rows per transaction
    share: float = 0.1  # of the time: each transaction is followed by a pause 9x as long
    pause_seconds: float = 0.02  # the shortest pause between transactions
    reclaim_pages: int = 1024  # SQLite pages given back per transaction

    def pause_after(self, took: float) -> float:
        """The pause after a transaction that took `took` seconds (waiting for the
        writer included: the busier the queue, the slower the pruning)."""
        return max(self.pause_seconds, took * (1 - self.share) / self.share)


def kind_name(status: JobStatus) -> str:
    return f"{status.value}_jobs"


class Retention:
    """Prunes a `Store` by a `RetentionConfig`."""

    def __init__(
        self, store: Store, config: RetentionConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.config = config
        self._clock = clock

    def _job_cutoffs(self, now: float) -> dict[JobStatus, float]:
        """Final status -> jobs that finished before this go (kept forever: left out)."""
        out = {}
        for status, setting in JOB_KINDS.items():
            keep = float(getattr(self.config, setting))
            if keep > 0:
                out[status] = now - keep
        return out

    def _unused_before(self, now: float) -> float:
        """Batch files without an expiry, used by no batch, made before this, go."""
        keep = self.config.batches_seconds
        return now - keep if keep > 0 else 0.0  # 0.0: no file is that old

    async def plan(self) -> dict[str, int]:
        """What `prune` would delete now, per kind (`--dry-run`)."""
        now = self._clock()
        counts = {kind_name(s): 0 for s in JOB_KINDS}
        for status, cutoff in self._job_cutoffs(now).items():
            counts[kind_name(status)] = await self.store.count_prunable_jobs(status, cutoff)
        keep = self.config.batches_seconds
        batches = await self.store.count_prunable_batches(now - keep) if keep > 0 else 0
        files = await self.store.prunable_files(now, self._unused_before(now), 1 << 62)
        return {**counts, "batches": batches, "files": len(files)}

    async def prune(self) -> dict[str, int]:
        """Delete everything that has outlived its setting, a batch of rows at a time;
        returns how many of each kind went (and SQLite pages given back)."""
        now = self._clock()
        rows = self.config.batch_rows
        counts = {kind_name(s): 0 for s in JOB_KINDS}
        for status, cutoff in self._job_cutoffs(now).items():
            step = functools.partial(self.store.prune_jobs, status, cutoff, rows)
            counts[kind_name(status)] = await self._in_steps(step)
        counts["batches"] = 0
        if self.config.batches_seconds > 0:
            before = now - self.config.batches_seconds
            step = functools.partial(self.store.prune_batches, before, rows)
            counts["batches"] = await self._in_steps(step)
        counts["files"] = await self._prune_files(now)
        if any(counts.values()):
            pages = self.config.reclaim_pages
            reclaim = functools.partial(self.store.reclaim_space, pages)
            counts["pages_reclaimed"] = await self._in_steps(reclaim, pages)
            log.info("pruned", extra=counts)
        return counts

    async def _in_steps(self, step: Callable[[], Awaitable[int]], full: int = 0) -> int:
        """Run `step` (one transaction; how many it did) until it does less than a full
        batch, pausing between; the total."""
        full = full or self.config.batch_rows
        total = 0
        while True:
            began = time.monotonic()
            done = await step()
            total += done
            if done < full:
                return total
            await asyncio.sleep(self.config.pause_after(time.monotonic() - began))

    async def _prune_files(self, now: float) -> int:
        unused = self._unused_before(now)
        total = 0
        while True:
            ids = await self.store.prunable_files(now, unused, self.config.batch_rows)
            for file_id in ids:  # one transaction each: a file may be many parts
                began = time.monotonic()
                total += await self.store.prune_file(file_id, now, unused)
                await asyncio.sleep(self.config.pause_after(time.monotonic() - began))
            if len(ids) < self.config.batch_rows:
                return total

    async def run(self, interval: float) -> None:
        """Prune forever, every `interval` seconds (a background task of the server)."""
        while True:
            await asyncio.sleep(interval)
            await one_pass("pruner", self.prune, log)
