"""`SqliteStore`: the embedded default store.

WAL mode, `synchronous=FULL`, one writer thread with group commit (sqlite_io.py), claims
as a single `UPDATE ... RETURNING`. An acknowledged submit or result survives `kill -9`.
The SQL is in sql/sqlite.sql (queries.py), the row mapping in rows.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from openbeepboop.server.models import (
    ApiKey,
    Batch,
    HeartbeatOutcome,
    Job,
    JobFilter,
    NewJob,
    Node,
    NodeResult,
    ReapOutcome,
    ResultOutcome,
    StoredFile,
    SubmitOutcome,
    Template,
)
from openbeepboop.server.store import outcomes, rows
from openbeepboop.server.store.migrations import migrate_sqlite
from openbeepboop.server.store.queries import Queries
from openbeepboop.server.store.sqlite_io import GroupCommitWriter, ReaderPool, connect


def _ids(values: Sequence[str]) -> str:
    """A JSON array, for `json_each(?)`."""
    return orjson.dumps(list(values)).decode()


class SqliteStore:
    """The `Store` contract on one SQLite file."""

    def __init__(self, path: Path, readers: int = 2, synchronous: str = "FULL") -> None:
        self.path = path
        self._q = Queries("sqlite")
        track = self._q["track_queued"]
        self._writer = GroupCommitWriter(path, synchronous, lambda c: c.executescript(track))
        self._readers = ReaderPool(path, size=readers)

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.migrate()
        self._writer.start()

    def migrate(self) -> list[int]:
        """Apply pending migrations (synchronously; used by `setup` too)."""
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

    async def _one(self, name: str, args: Sequence[Any]) -> Any:
        """The first row of a read, or None."""
        sql = self._q[name]
        return await self._readers.run(lambda conn: conn.execute(sql, args).fetchone())

    async def _all(self, sql: str, args: Sequence[Any]) -> list[Any]:
        return await self._readers.run(lambda conn: conn.execute(sql, args).fetchall())

    async def _write(self, name: str, args: Sequence[Any], durable: bool = True) -> Any:
        """One write statement; its rows (RETURNING) or, without any, its row count."""
        sql = self._q[name]

        def op(conn: sqlite3.Connection) -> Any:
            cursor = conn.execute(sql, args)
            found = cursor.fetchall()
            return found if cursor.description else cursor.rowcount

        return await self._writer.run(op, durable)

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
            position = None
            if positions:
                ahead = (nj.model, nj.priority)
                position = int(conn.execute(self._q["queued_ahead"], ahead).fetchone()[0])
            out.append(SubmitOutcome(nj.queued(job_id, seq, now), True, position))
        return out

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._one("get_job", (job_id,))
        return None if row is None else rows.job(row)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        return [rows.job(r) for r in await self._all(self._q["get_jobs"], (_ids(job_ids),))]

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        status = None if flt.status is None else flt.status.value
        sql, args = self._q.listing(
            "list_jobs",
            flt.limit,
            owner=flt.owner,
            model=flt.model,
            status=status,
            before_seq=flt.after_seq,
        )
        return [rows.job(r) for r in await self._all(sql, args)]

    async def queue_position(self, job: Job) -> int:
        row = await self._one("queue_position", (job.model, job.priority, job.seq))
        return int(row[0])

    async def fetch_jobs(
        self, node_id: str, models: Sequence[str], max_jobs: int, lease_seconds: float, now: float
    ) -> list[Job]:
        wanted = list(dict.fromkeys(models))
        if not wanted or max_jobs <= 0:
            return []
        arm = self._q["claim_candidates"]
        arms = " UNION ALL ".join(arm.replace("{model}", f"?{5 + i}") for i in range(len(wanted)))
        sql = self._q["claim_jobs"].replace("{candidates}", arms)
        args = (now, max_jobs, now + lease_seconds, node_id, *wanted)

        def op(conn: sqlite3.Connection) -> list[Job]:
            jobs = [rows.job(r) for r in conn.execute(sql, args)]
            jobs.sort(key=lambda j: (-j.priority, j.seq))
            return jobs

        return await self._writer.run(op, durable=False)  # a lost lease: the job runs again

    async def heartbeat(
        self, node_id: str, lease_ids: Sequence[str], lease_seconds: float, now: float
    ) -> HeartbeatOutcome:
        leases = list(dict.fromkeys(lease_ids))
        expires = now + lease_seconds
        extend, cancelled = self._q["extend_leases"], self._q["cancelled_leases"]

        def op(conn: sqlite3.Connection) -> HeartbeatOutcome:
            ids = _ids(leases)
            live = {r[0] for r in conn.execute(extend, (ids, expires))}
            gone = dict(conn.execute(cancelled, (ids,)).fetchall())
            return outcomes.heartbeat(leases, live, gone, expires)

        return await self._writer.run(op, durable=False)

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
        found = conn.execute(self._q["job_statuses"], (_ids([r.job_id]),)).fetchone()
        return outcomes.refusal(r.job_id, None if found is None else found[1])

    async def cancel_job(self, job_id: str, now: float) -> Job | None:
        cancel, get = self._q["cancel_job"], self._q["get_job"]

        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(cancel, (job_id, now)).fetchone()
            if row is None:
                row = conn.execute(get, (job_id,)).fetchone()
            return None if row is None else rows.job(row)

        return await self._writer.run(op)

    async def reap(self, now: float) -> ReapOutcome:
        leases, queued = self._q["reap_leases"], self._q["reap_queued"]

        def op(conn: sqlite3.Connection) -> ReapOutcome:
            reaped = conn.execute(leases, (now,)).fetchall()
            expired = [job_id for (job_id,) in conn.execute(queued, (now,))]
            return outcomes.reaped(reaped, expired)

        return await self._writer.run(op)

    async def count_active(self, owner: str) -> int:
        return int((await self._one("count_active", (owner,)))[0])

    async def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for model, status, count in await self._all(self._q["job_counts"], ()):
            out.setdefault(model, {})[status] = count
        return out

    # -- nodes ------------------------------------------------------------------

    async def register_node(self, node: Node) -> None:
        await self._write("upsert_node", rows.node_values(node))

    async def touch_node(self, node_id: str, now: float, stats: dict[str, object] | None) -> bool:
        if stats is None:
            return bool(await self._write("touch_node", (now, node_id), durable=False))
        args = (now, node_id, rows.json_text(stats))
        return bool(await self._write("touch_node_stats", args, durable=False))

    async def get_node(self, node_id: str) -> Node | None:
        row = await self._one("get_node", (node_id,))
        return None if row is None else rows.node(row)

    async def list_nodes(self, seen_since: float) -> list[Node]:
        return [rows.node(r) for r in await self._all(self._q["list_nodes"], (seen_since,))]

    # -- keys -------------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        await self._write("insert_key", rows.api_key_values(key))

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = await self._one("get_key_by_hash", (key_hash,))
        return None if row is None else rows.api_key(row)

    async def list_keys(self) -> list[ApiKey]:
        return [rows.api_key(r) for r in await self._all(self._q["list_keys"], ())]

    async def revoke_key(self, key_id: str, now: float) -> ApiKey | None:
        revoke, get = self._q["revoke_key"], self._q["get_key"]

        def op(conn: sqlite3.Connection) -> ApiKey | None:
            conn.execute(revoke, (key_id, now))
            row = conn.execute(get, (key_id,)).fetchone()
            return None if row is None else rows.api_key(row)

        return await self._writer.run(op)

    # -- files ------------------------------------------------------------------

    async def put_file_part(self, file_id: str, index: int, data: bytes) -> None:
        await self._write("put_file_part", (file_id, index, data))

    async def create_file(self, file: StoredFile) -> StoredFile:
        [(seq,)] = await self._write("insert_file", rows.file_values(file))
        return replace(file, seq=int(seq))

    async def get_file(self, file_id: str) -> StoredFile | None:
        row = await self._one("get_file", (file_id,))
        return None if row is None else rows.stored_file(row)

    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, before_seq: int | None
    ) -> list[StoredFile]:
        sql, args = self._q.listing(
            "list_files", limit, owner=owner, purpose=purpose, before_seq=before_seq
        )
        return [rows.stored_file(r) for r in await self._all(sql, args)]

    async def read_file_part(self, file_id: str, index: int) -> bytes | None:
        row = await self._one("read_file_part", (file_id, index))
        return None if row is None else bytes(row[0])

    async def delete_file(self, file_id: str) -> bool:
        parts, record = self._q["delete_file_parts"], self._q["delete_file"]

        def op(conn: sqlite3.Connection) -> bool:
            conn.execute(parts, (file_id,))
            return conn.execute(record, (file_id,)).rowcount > 0

        return await self._writer.run(op)

    # -- batches ----------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> Batch:
        [(seq,)] = await self._write("insert_batch", rows.batch_values(batch))
        return replace(batch, seq=int(seq))

    async def get_batch(self, batch_id: str) -> Batch | None:
        row = await self._one("get_batch", (batch_id,))
        return None if row is None else rows.batch(row)

    async def list_batches(
        self, owner: str | None, limit: int, before_seq: int | None
    ) -> list[Batch]:
        sql, args = self._q.listing("list_batches", limit, owner=owner, before_seq=before_seq)
        return [rows.batch(r) for r in await self._all(sql, args)]

    async def open_batches(self) -> list[Batch]:
        return [rows.batch(r) for r in await self._all(self._q["open_batches"], ())]

    async def save_batch(self, batch: Batch) -> Batch | None:
        saved = replace(batch, version=batch.version + 1)
        args = (batch.id, batch.version, *rows.batch_values(saved)[1:])
        return saved if await self._write("save_batch", args) else None

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        found = await self._all(self._q["batch_counts"], (batch_id,))
        return {status: int(n) for status, n in found}

    async def batch_jobs(self, batch_id: str, after_seq: int, limit: int) -> list[Job]:
        found = await self._all(self._q["batch_jobs"], (batch_id, after_seq, limit))
        return [rows.job(r) for r in found]

    async def cancel_batch_jobs(self, batch_id: str, now: float) -> list[str]:
        return [r[0] for r in await self._write("cancel_batch_jobs", (batch_id, now))]

    # -- assistant templates ----------------------------------------------------

    async def put_template(self, template: Template) -> Template:
        [row] = await self._write("put_template", rows.template_values(template))
        return rows.template(row)

    async def get_template(self, owner: str, name: str) -> Template | None:
        row = await self._one("get_template", (owner, name))
        return None if row is None else rows.template(row)

    async def list_templates(self, owner: str | None) -> list[Template]:
        sql, args = self._q.listing("list_templates", owner=owner)
        return [rows.template(r) for r in await self._all(sql, args)]

    async def delete_template(self, owner: str, name: str) -> bool:
        return bool(await self._write("delete_template", (owner, name)))
