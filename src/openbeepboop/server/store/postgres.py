"""`PostgresStore`: the store for several server replicas on one PostgreSQL database.

The same contract and rows as `SqliteStore` (tests/test_store_contract.py runs on both),
over an asyncpg pool (pg_pool.py, which also says when a verb is retried after a lost
connection: each write says how it may be applied). The verbs common to both stores are
`SqlStore`'s (sql_store.py); the SQL is in sql/postgres.sql. Claims
are `FOR UPDATE SKIP LOCKED`, so replicas never hand out the same job and never wait
for each other's claims. Migrations run at open under an advisory lock
(migrations.py). Wake-ups and token deltas cross replicas through LISTEN/NOTIFY
(pg_bridge.py, started by `bridge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from openbeepboop.server.models import (
    Job,
    NewJob,
    NodeResult,
    ReapOutcome,
    ResultOutcome,
    SubmitOutcome,
)
from openbeepboop.server.store import outcomes, rows
from openbeepboop.server.store.base import DeltaRelay, TopicRelay
from openbeepboop.server.store.pg_bridge import PgBridge
from openbeepboop.server.store.pg_pool import Kind, PgPool, migrate
from openbeepboop.server.store.rows import Row
from openbeepboop.server.store.sql_store import (
    CLAIM,
    IDEMPOTENT,
    ONCE,
    Claim,
    SqlStore,
    Steps,
    Write,
)

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]


STALE_ROWS = 1000  # jobs more or fewer than the planner saw, before an ANALYZE


class PostgresStore(SqlStore):
    """The `Store` contract on a PostgreSQL database shared by several servers."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        super().__init__("postgres")
        self.url = url
        self._db = PgPool(url, pool_size)
        self._bridge: PgBridge | None = None

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Apply pending migrations, then open the pool; DatabaseUnreachable when we
        cannot connect."""
        await self._db.open()

    async def migrate(self) -> list[int]:
        """Connect, apply pending migrations, disconnect (used by `setup`)."""
        return await migrate(self.url)

    async def close(self) -> None:
        if self._bridge is not None:
            await self._bridge.stop()
            self._bridge = None
        await self._db.close()

    async def bridge(self, notifier: TopicRelay, deltas: DeltaRelay) -> None:
        """Carry wake-ups and token deltas to and from the other servers on this
        database (LISTEN/NOTIFY on one dedicated connection, with a polling fallback)."""
        self._bridge = PgBridge(self.url, self, notifier, deltas)
        self._bridge.start()

    # -- how a query runs (SqlStore) -----------------------------------------------

    async def _read(self, sql: str, args: Sequence[Any]) -> Sequence[Row]:
        return await self._db.read(lambda c: c.fetch(sql, *args))

    async def _returning(self, sql: str, args: Sequence[Any], how: Write = ONCE) -> Sequence[Row]:
        kind = Kind.IDEMPOTENT if how.idempotent else Kind.ONCE
        return await self._db.write(lambda c: c.fetch(sql, *args), kind)

    async def _change(self, sql: str, args: Sequence[Any], how: Write = ONCE) -> int:
        kind = Kind.IDEMPOTENT if how.idempotent else Kind.ONCE
        return _rowcount(await self._db.write(lambda c: c.execute(sql, *args), kind))

    async def _transaction(self, steps: Steps, how: Write = ONCE) -> list[Sequence[Row]]:
        async def op(conn: Conn) -> list[Sequence[Row]]:
            return [await conn.fetch(sql, *args) for sql, args in steps]

        kind = Kind.IDEMPOTENT if how.idempotent else Kind.ONCE
        return await self._db.write(op, kind, single=False)

    def _array(self, values: Sequence[str] | Sequence[float]) -> list[Any]:
        return list(values)

    # -- jobs -------------------------------------------------------------------

    async def submit_jobs(
        self, jobs: Sequence[NewJob], now: float, durable: bool = True, positions: bool = False
    ) -> list[SubmitOutcome]:
        # `durable` is not used: every commit here waits for its WAL flush (the server's
        # `synchronous_commit`), which the single-statement writes would need a
        # transaction to relax
        if not jobs:
            return []
        ids = [rows.new_job_id() for _ in jobs]
        values = [rows.new_job_values(j) for j in jobs]
        columns = [ids, *(list(column) for column in zip(*values, strict=True))]
        insert, find = self._q["insert_jobs"], self._q["find_jobs_by_idempotency_keys"]
        ahead = self._q["queued_ahead"]

        async def op(conn: Conn) -> list[SubmitOutcome]:
            seqs = {r["id"]: r["seq"] for r in await conn.fetch(insert, *columns, float(now))}
            places = {}
            if positions:
                for job_id, nj in zip(ids, jobs, strict=True):
                    if job_id in seqs and nj.cached_result is None:
                        args = (nj.model, nj.priority, seqs[job_id])
                        places[job_id] = int(await conn.fetchval(ahead, *args))
            replays = [j for i, j in zip(ids, jobs, strict=True) if i not in seqs]
            existing = {}
            if replays:
                keys = [j.owner for j in replays], [j.idempotency_key for j in replays]
                found = [rows.job(r) for r in await conn.fetch(find, *keys)]
                existing = {(j.owner, j.idempotency_key): j for j in found}
            return [
                SubmitOutcome(nj.queued(job_id, seqs[job_id], now), True, places.get(job_id))
                if job_id in seqs
                else SubmitOutcome(
                    outcomes.replayed(existing[(nj.owner, nj.idempotency_key)], nj),
                    created=False,
                )
                for job_id, nj in zip(ids, jobs, strict=True)
            ]

        # Replays are looked up and checked after the INSERT: with several jobs that needs
        # a transaction (all or none); one job, or jobs without keys, need not.
        keyed = all(j.idempotency_key is not None for j in jobs)
        single = len(jobs) == 1 or all(j.idempotency_key is None for j in jobs)
        return await self._db.write(op, Kind.IDEMPOTENT if keyed else Kind.ONCE, single)

    async def _claim(self, claim: Claim) -> list[Job]:
        args = (
            claim.models,
            claim.now,
            claim.max_jobs,
            claim.expires,
            claim.node_id,
            claim.node_name,
            claim.node_labels,
        )
        sql = self._q["claim_fair" if claim.fair else "claim_jobs"]
        return [rows.job(r) for r in await self._returning(sql, args, CLAIM)]

    async def submit_results(
        self, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        if not results:
            return []
        ids = [r.job_id for r in results]
        if all(r.result is not None for r in results) and len(set(ids)) == len(ids):
            return await self._db.write(lambda c: self._complete_all(c, results, float(now)))

        async def op(conn: Conn) -> list[ResultOutcome]:
            return [await self._record(conn, r, float(now)) for r in results]

        return await self._db.write(op, single=False)

    async def _record(self, conn: Conn, r: NodeResult, now: float) -> ResultOutcome:
        """Apply one node result under fencing: only the current lease may change the job."""
        q = self._q
        if r.result is not None:
            result = rows.json_text(r.result)
            row = await conn.fetchrow(q["complete_job"], r.job_id, r.lease_id, result, now)
        elif r.released:
            row = await conn.fetchrow(q["release_job"], r.job_id, r.lease_id)
        else:
            error = rows.json_text(r.error or {})
            args = (r.job_id, r.lease_id, error, now, r.retryable)
            row = await conn.fetchrow(q["fail_job"], *args)
        if row is not None:
            return ResultOutcome(r.job_id, accepted=True, job=rows.job(row))
        return (await self._refusals(conn, [r.job_id]))[r.job_id]

    async def _complete_all(
        self, conn: Conn, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        """Many results (no errors, distinct jobs) in one statement."""
        found = await conn.fetch(
            self._q["complete_jobs"],
            [r.job_id for r in results],
            [r.lease_id for r in results],
            [rows.json_text(r.result) for r in results],
            now,
        )
        done = {row["id"]: rows.job(row) for row in found}
        missing = [r.job_id for r in results if r.job_id not in done]
        refused = await self._refusals(conn, missing) if missing else {}
        return [
            ResultOutcome(r.job_id, accepted=True, job=done[r.job_id])
            if r.job_id in done
            else refused[r.job_id]
            for r in results
        ]

    async def _refusals(self, conn: Conn, job_ids: list[str]) -> dict[str, ResultOutcome]:
        """Why results for these jobs were refused: unknown job, cancelled, lease lost."""
        found = await conn.fetch(self._q["job_statuses"], job_ids)
        status: dict[str, str] = {r[0]: r[1] for r in found}
        return {job_id: outcomes.refusal(job_id, status.get(job_id)) for job_id in job_ids}

    async def reap(self, now: float) -> ReapOutcome:
        """The reaper's pass (SqlStore), then the job counters' deltas folded
        (sql/postgres.sql: fold_job_counts), so that reading them stays a short sum."""
        outcome = await super().reap(now)
        await self._change(self._q["fold_job_counts"], (), IDEMPOTENT)
        await self._analyze_if_stale()
        return outcome

    async def _analyze_if_stale(self) -> None:
        """ANALYZE jobs when its row count moved far from what the planner last saw: a
        queue flooded within a minute of an ANALYZE (autovacuum's pace) would otherwise
        be planned as nearly empty, and the fair claim (claim_fair) might walk an
        owner's whole backlog through the wrong index. Costs a sample, not a scan."""
        found = await self._read(self._q["jobs_planned_rows"], ())
        jobs, planned = (float(found[0][0]), float(found[0][1])) if found else (0.0, 0.0)
        if abs(jobs - max(planned, 0.0)) > max(STALE_ROWS, planned / 2):
            await self._change("ANALYZE jobs", (), IDEMPOTENT)

    # -- for the bridge's polling fallback ----------------------------------------

    async def models_with_queued_jobs(self, models: Sequence[str]) -> list[str]:
        """Which of `models` have at least one queued job (an index probe each)."""
        return [r[0] for r in await self._read(self._q["models_with_queued_jobs"], [models])]

    async def final_job_ids(self, job_ids: Sequence[str]) -> list[str]:
        """Which of `job_ids` are in a final state."""
        return [r[0] for r in await self._read(self._q["final_job_ids"], [job_ids])]

    # -- retention --------------------------------------------------------------

    async def reclaim_space(self, max_pages: int) -> int:
        """Nothing to do: autovacuum marks deleted rows' space for reuse."""
        return 0


def _rowcount(status: str) -> int:
    """The row count of a command tag such as `UPDATE 3`."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
