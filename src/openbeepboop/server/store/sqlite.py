"""`SqliteStore`: the embedded default store.

WAL mode, `synchronous=FULL`, one writer thread with group commit (sqlite_io.py), claims
as a single `UPDATE ... RETURNING`. An acknowledged submit or result survives `kill -9`.
The verbs common to both stores are `SqlStore`'s (sql_store.py); the SQL is in
sql/sqlite.sql, the row mapping in rows.py.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from openbeepboop.private_paths import private_sqlite
from openbeepboop.server.models import (
    JSON,
    Job,
    JobStatus,
    NewJob,
    NodeResult,
    ResultOutcome,
    SubmitOutcome,
)
from openbeepboop.server.store import fair, outcomes, rows
from openbeepboop.server.store.migrations import migrate_sqlite
from openbeepboop.server.store.rows import Row
from openbeepboop.server.store.sql_store import CLAIM, ONCE, Claim, SqlStore, Steps, Write
from openbeepboop.server.store.sqlite_io import GroupCommitWriter, ReaderPool, connect

INCREMENTAL = 2  # PRAGMA auto_vacuum


class SqliteStore(SqlStore):
    """The `Store` contract on one SQLite file."""

    def __init__(self, path: Path, readers: int = 2, synchronous: str = "FULL") -> None:
        super().__init__("sqlite")
        self.path = path
        track = self._q["track_queued"]
        self._writer = GroupCommitWriter(path, synchronous, lambda c: c.executescript(track))
        self._readers = ReaderPool(path, size=readers)

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        self.migrate()
        self._writer.start()

    def migrate(self) -> list[int]:
        """Apply pending migrations (synchronously; used by `setup` too)."""
        private_sqlite(self.path)  # tenants' prompts and results: 0600, -wal and -shm too
        conn = connect(self.path)
        try:
            return migrate_sqlite(conn)
        finally:
            conn.close()

    async def close(self) -> None:
        self._writer.stop()
        self._readers.close()

    @property
    def commit_stats(self) -> tuple[int, int]:
        """(transactions, operations) committed by the writer so far."""
        return self._writer.batches, self._writer.ops

    @property
    def synced_commits(self) -> int:
        """Transactions committed with an fsync so far."""
        return self._writer.synced

    # -- how a query runs (SqlStore) -----------------------------------------------

    async def _read(self, sql: str, args: Sequence[Any]) -> Sequence[Row]:
        found: Sequence[Row] = await self._readers.run(lambda c: c.execute(sql, args).fetchall())
        return found

    async def _returning(self, sql: str, args: Sequence[Any], how: Write = ONCE) -> Sequence[Row]:
        found: Sequence[Row] = await self._writer.run(
            lambda c: c.execute(sql, args).fetchall(), how.durable
        )
        return found

    async def _change(self, sql: str, args: Sequence[Any], how: Write = ONCE) -> int:
        changed: int = await self._writer.run(lambda c: c.execute(sql, args).rowcount, how.durable)
        return changed

    async def _transaction(self, steps: Steps, how: Write = ONCE) -> list[Sequence[Row]]:
        def op(conn: sqlite3.Connection) -> list[Sequence[Row]]:
            return [conn.execute(sql, args).fetchall() for sql, args in steps]

        found: list[Sequence[Row]] = await self._writer.run(op, how.durable)
        return found

    def _array(self, values: Sequence[str] | Sequence[float]) -> str:
        return orjson.dumps(list(values)).decode()  # for json_each(?)

    # -- jobs -------------------------------------------------------------------

    async def submit_jobs(
        self, jobs: Sequence[NewJob], now: float, durable: bool = True, positions: bool = False
    ) -> list[SubmitOutcome]:
        return await self._writer.run(
            lambda conn: self._submit(conn, jobs, now, positions), durable
        )

    def _submit(
        self, conn: sqlite3.Connection, jobs: Sequence[NewJob], now: float, positions: bool
    ) -> list[SubmitOutcome]:
        out = []
        queued: Counter[tuple[str, int]] = Counter()
        for nj in jobs:
            if nj.idempotency_key is not None:
                found = conn.execute(
                    self._q["find_job_by_idempotency_key"], (nj.owner, nj.idempotency_key)
                ).fetchone()
                if found is not None:
                    replay = outcomes.replayed(rows.job(found), nj)
                    out.append(SubmitOutcome(replay, created=False))
                    continue
            job_id = rows.new_job_id()
            args = (job_id, *rows.new_job_values(nj), now)
            seq = conn.execute(self._q["insert_job"], args).lastrowid or 0
            if nj.cached_result is not None:  # completed at once: never queued
                out.append(SubmitOutcome(nj.queued(job_id, seq, now), True))
                continue
            position = None
            if positions:  # counted now, so that the next one counts it
                conn.execute(self._q["count_queued"], (nj.model, nj.priority, 1))
                ahead = (nj.model, nj.priority)
                position = int(conn.execute(self._q["queued_ahead"], ahead).fetchone()[0])
            else:
                queued[(nj.model, nj.priority)] += 1
            out.append(SubmitOutcome(nj.queued(job_id, seq, now), True, position))
        self._count_queued(conn, queued)
        return out

    async def _claim(self, claim: Claim) -> list[Job]:
        if claim.fair:
            return await self._writer.run(lambda conn: self._claim_fair(conn, claim), CLAIM.durable)
        models = claim.models
        arm = self._q["claim_candidates"]
        arms = " UNION ALL ".join(arm.replace("{model}", f"?{7 + i}") for i in range(len(models)))
        sql = self._q["claim_jobs"].replace("{candidates}", arms)
        args = (
            claim.now,
            claim.max_jobs,
            claim.expires,
            claim.node_id,
            claim.node_name,
            claim.node_labels,
            *models,
        )

        def op(conn: sqlite3.Connection) -> list[Job]:
            leased = conn.execute(sql, args).fetchall()
            self._count_queued(conn, Counter(map(rows.queue_of, leased)), -1)
            return [rows.job(r) for r in leased]  # here: the event loop has enough to do

        return await self._writer.run(op, CLAIM.durable)

    def _claim_fair(self, conn: sqlite3.Connection, claim: Claim) -> list[Job]:
        """The fair claim, in one transaction on the writer (the only connection that
        changes jobs): each model's first queued job of every owner (queued_heads, a
        skip scan; more of each when fewer owners than jobs asked for wait) and those
        pinned to this node, their shares' turns, the pick (store/fair.py), the leases
        and the turns moved."""
        q, c = self._q, claim
        found: list[tuple[int, int, str, str]] = []  # seq, priority, owner, model
        for model in c.models:
            heads = conn.execute(q["queued_heads"], (model, c.now, c.node_labels)).fetchall()
            each = min(c.max_jobs, c.max_jobs // max(len(heads), 1) + 1)  # enough in all
            if each <= 1:
                found += [(*r, model) for r in heads]
            for _, _, owner in heads if each > 1 else ():  # few owners: more of each
                mine = (model, owner, each, c.now, c.node_labels)
                found += [(*r, model) for r in conn.execute(q["owner_candidates"], mine)]
            pinned = (model, c.node_id, c.node_name, c.max_jobs, c.now, c.node_labels)
            found += [(*r, model) for r in conn.execute(q["node_candidates"], pinned)]
        if not found:
            return []
        owners = sorted({owner for _, _, owner, _ in found})
        groups = dict(conn.execute(q["share_groups"], (self._array(owners),)).fetchall())
        candidates = [
            fair.Candidate(seq, priority, model, groups.get(owner) or owner)
            for seq, priority, owner, model in found
        ]
        shares = sorted({x.share for x in candidates})
        weights = dict(conn.execute(q["share_weights"], (self._array(shares),)).fetchall())
        turns: dict[tuple[str, str], float] = {}
        for model in {x.model for x in candidates}:
            for share, finish in conn.execute(q["turns_of"], (model, self._array(shares))):
                turns[(model, share)] = finish
        picked = fair.pick(candidates, turns, weights, c.max_jobs)
        lease = (self._array(picked.seqs), c.now, c.expires, c.node_id)
        leased = conn.execute(q["lease_seqs"], lease).fetchall()
        conn.executemany(q["put_turn"], [(m, s, f) for (m, s), f in picked.turns.items()])
        self._count_queued(conn, Counter(map(rows.queue_of, leased)), -1)
        return [rows.job(r) for r in leased]

    def _count_queued(
        self, conn: sqlite3.Connection, counts: Counter[tuple[str, int]], sign: int = 1
    ) -> None:
        """Update the writer's counters (sql/sqlite.sql: track_queued) by job counts per
        (model, priority): once per group, not once per row."""
        for (model, priority), n in counts.items():
            conn.execute(self._q["count_queued"], (model, priority, sign * n))

    async def move_job(
        self, job_id: str, lease_id: str | None, model: str, request: JSON, error: JSON | None
    ) -> Job | None:
        error_text = None if error is None else rows.json_text(error)
        args = (job_id, lease_id, model, rows.json_text(request), error_text)

        def op(conn: sqlite3.Connection) -> Job | None:
            before = conn.execute(self._q["get_job"], (job_id,)).fetchone()
            if before is None:
                return None
            old = rows.job(before)
            # the writer's queued counters (track_queued): the new model's row must exist
            # for its trigger to count a job queued again; a queued job that only changes
            # model is counted here
            conn.execute(self._q["count_queued"], (model, old.priority, 0))
            row = conn.execute(self._q["move_job"], args).fetchone()
            if row is None:
                return None
            if old.status is JobStatus.QUEUED:
                self._count_queued(conn, Counter({(old.model, old.priority): 1}), -1)
                self._count_queued(conn, Counter({(model, old.priority): 1}))
            return rows.job(row)

        moved: Job | None = await self._writer.run(op)
        return moved

    async def submit_results(
        self, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        return await self._writer.run(lambda conn: [self._record(conn, r, now) for r in results])

    def _record(self, conn: sqlite3.Connection, r: NodeResult, now: float) -> ResultOutcome:
        """Apply one node result under fencing: only the current lease may change the job."""
        if r.result is not None:
            args: tuple[Any, ...] = (r.job_id, r.lease_id, rows.json_text(r.result), now)
            row = conn.execute(self._q["complete_job"], args).fetchone()
        elif r.released:
            row = conn.execute(self._q["release_job"], (r.job_id, r.lease_id)).fetchone()
        else:
            error = rows.json_text(r.error or {})
            args = (r.job_id, r.lease_id, error, now, r.retryable)
            row = conn.execute(self._q["fail_job"], args).fetchone()
        if row is not None:
            return ResultOutcome(r.job_id, accepted=True, job=rows.job(row))
        found = conn.execute(self._q["job_statuses"], (self._array([r.job_id]),)).fetchone()
        return outcomes.refusal(r.job_id, None if found is None else found[1])

    # -- retention --------------------------------------------------------------

    async def reclaim_space(self, max_pages: int) -> int:
        """Incremental vacuum (auto_vacuum=INCREMENTAL, set when the file is made): up to
        `max_pages` free pages are moved off the end of the file, which shrinks at the
        next checkpoint. A database made before that setting reuses its free pages."""

        def op(conn: sqlite3.Connection) -> int:
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
                return 0
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            pages = min(free, max_pages)
            for _ in range(pages):  # each step of the pragma frees one page
                conn.execute("PRAGMA incremental_vacuum(1)")
            return pages

        return await self._writer.run(op, durable=False)
