"""`SqliteStore`: the embedded default store.

WAL mode, `synchronous=FULL`, one writer thread with group commit (sqlite_io.py), claims
as a single `UPDATE ... RETURNING`. An acknowledged submit or result survives `kill -9`.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import orjson

from openbeepboop.server.errors import IdempotencyMismatch, InvalidRequest
from openbeepboop.server.models import (
    ApiKey,
    Batch,
    BatchStatus,
    HeartbeatOutcome,
    Job,
    JobFilter,
    JobStatus,
    NewJob,
    Node,
    NodeResult,
    ReapOutcome,
    ResultOutcome,
    Role,
    StoredFile,
    SubmitOutcome,
    Template,
)
from openbeepboop.server.store.migrations import migrate_sqlite
from openbeepboop.server.store.sqlite_io import GroupCommitWriter, ReaderPool, connect

JOB_COLUMNS = (
    "seq, id, owner, endpoint, model, request, request_hash, status, priority, max_attempts, "
    "attempts, metadata, custom_id, idempotency_key, created_at, expires_at, started_at, "
    "finished_at, lease_id, lease_expires_at, node_id, result, error, batch_id"
)
NODE_COLUMNS = (
    "id, name, owner, models, capacity, hardware, version, registered_at, last_seen, stats"
)
KEY_COLUMNS = "id, role, key_hash, prefix, name, created_at, revoked_at"
FILE_COLUMNS = "id, owner, purpose, filename, bytes, created_at, lines, seq"
BATCH_FIELDS = [field.name for field in fields(Batch) if field.name != "seq"]
BATCH_JSON = frozenset({"metadata", "errors", "request_counts", "usage"})
BATCH_COLUMNS = ", ".join([*BATCH_FIELDS, "seq"])
TEMPLATE_COLUMNS = "owner, name, description, streams, created_at, updated_at"
OPEN_BATCHES = "('validating', 'in_progress', 'finalizing', 'cancelling')"
ACTIVE = "('queued', 'in_progress')"


def _text(value: Any) -> str:
    """JSON text for the store; InvalidRequest for what it cannot hold (integers beyond
    64 bits, nesting too deep), so that a user's odd value is a 400, not a 500."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(f"a value cannot be stored: {exc}") from exc


def _dumps(value: Any) -> str | None:
    return None if value is None else _text(value)


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _job(row: Sequence[Any]) -> Job:
    return Job(
        seq=row[0],
        id=row[1],
        owner=row[2],
        endpoint=row[3],
        model=row[4],
        request=orjson.loads(row[5]),
        request_hash=row[6],
        status=JobStatus(row[7]),
        priority=row[8],
        max_attempts=row[9],
        attempts=row[10],
        metadata=_loads(row[11]),
        custom_id=row[12],
        idempotency_key=row[13],
        created_at=row[14],
        expires_at=row[15],
        started_at=row[16],
        finished_at=row[17],
        lease_id=row[18],
        lease_expires_at=row[19],
        node_id=row[20],
        result=_loads(row[21]),
        error=_loads(row[22]),
        batch_id=row[23],
    )


def _node(row: Sequence[Any]) -> Node:
    return Node(
        id=row[0],
        name=row[1],
        owner=row[2],
        models=orjson.loads(row[3]),
        capacity=row[4],
        hardware=orjson.loads(row[5]),
        version=row[6],
        registered_at=row[7],
        last_seen=row[8],
        stats=orjson.loads(row[9]),
    )


def _key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        id=row[0],
        role=Role(row[1]),
        key_hash=row[2],
        prefix=row[3],
        name=row[4],
        created_at=row[5],
        revoked_at=row[6],
    )


def _file(row: Sequence[Any]) -> StoredFile:
    return StoredFile(*row)


def _batch(row: Sequence[Any]) -> Batch:
    values = dict(zip([*BATCH_FIELDS, "seq"], row, strict=True))
    for name in BATCH_JSON:
        values[name] = _loads(values[name])
    values["status"] = BatchStatus(values["status"])
    return Batch(**values)


def _batch_values(batch: Batch) -> list[Any]:
    out: list[Any] = []
    for name in BATCH_FIELDS:
        value = getattr(batch, name)
        out.append(_dumps(value) if name in BATCH_JSON else value)
    return out


def _template(row: Sequence[Any]) -> Template:
    owner, name, description, streams, created_at, updated_at = row
    return Template(owner, name, orjson.loads(streams), created_at, updated_at, description)


def _marks(n: int) -> str:
    return ",".join("?" * n)


def new_job_id() -> str:
    """A job id: `job_` and 96 random bits."""
    return "job_" + secrets.token_hex(12)


class SqliteStore:
    """The `Store` contract on one SQLite file."""

    def __init__(self, path: Path, readers: int = 2, synchronous: str = "FULL") -> None:
        self.path = path
        self._writer = GroupCommitWriter(path, synchronous)
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

    # -- jobs -------------------------------------------------------------------

    async def submit_jobs(
        self, jobs: Sequence[NewJob], now: float, durable: bool = True
    ) -> list[SubmitOutcome]:
        return await self._writer.run(lambda conn: _submit_jobs(conn, jobs, now), durable)

    async def get_job(self, job_id: str) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _job(row)

        return await self._readers.run(op)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        ids = list(dict.fromkeys(job_ids))

        def op(conn: sqlite3.Connection) -> list[Job]:
            out: list[Job] = []
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({_marks(len(part))})"
                out.extend(_job(r) for r in conn.execute(sql, part))
            return out

        return await self._readers.run(op)

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        for column, value in (("owner", flt.owner), ("model", flt.model)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if flt.status is not None:
            where.append("status = ?")
            args.append(flt.status.value)
        if flt.after_seq is not None:
            where.append("seq < ?")
            args.append(flt.after_seq)
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        )

        def op(conn: sqlite3.Connection) -> list[Job]:
            return [_job(r) for r in conn.execute(sql, [*args, flt.limit])]

        return await self._readers.run(op)

    async def queue_position(self, job: Job) -> int:
        sql = (
            "SELECT count(*) FROM jobs WHERE status = 'queued' AND model = ? "
            "AND (priority > ? OR (priority = ? AND seq < ?))"
        )
        args = (job.model, job.priority, job.priority, job.seq)
        return int(await self._readers.run(lambda conn: conn.execute(sql, args).fetchone()[0]))

    async def fetch_jobs(
        self, node_id: str, models: Sequence[str], max_jobs: int, lease_seconds: float, now: float
    ) -> list[Job]:
        wanted = list(dict.fromkeys(models))
        if not wanted or max_jobs <= 0:
            return []
        arm = (
            "SELECT * FROM (SELECT seq, priority FROM jobs WHERE status = 'queued' AND model = ? "
            "AND (expires_at IS NULL OR expires_at > ?) ORDER BY priority DESC, seq LIMIT ?)"
        )
        candidates = " UNION ALL ".join([arm] * len(wanted))
        sql = (
            "UPDATE jobs SET status = 'in_progress', lease_id = lower(hex(randomblob(16))), "
            "lease_expires_at = ?, attempts = attempts + 1, node_id = ?, started_at = ? "
            f"WHERE seq IN (SELECT seq FROM ({candidates}) ORDER BY priority DESC, seq LIMIT ?) "
            f"RETURNING {JOB_COLUMNS}"
        )
        args: list[Any] = [now + lease_seconds, node_id, now]
        for model in wanted:
            args += [model, now, max_jobs]
        args.append(max_jobs)

        def op(conn: sqlite3.Connection) -> list[Job]:
            jobs = [_job(r) for r in conn.execute(sql, args)]
            jobs.sort(key=lambda j: (-j.priority, j.seq))
            return jobs

        return await self._writer.run(op, durable=False)  # a lost lease: the job runs again

    async def heartbeat(
        self, node_id: str, lease_ids: Sequence[str], lease_seconds: float, now: float
    ) -> HeartbeatOutcome:
        leases = list(dict.fromkeys(lease_ids))
        expires = now + lease_seconds

        def op(conn: sqlite3.Connection) -> HeartbeatOutcome:
            extended: list[str] = []
            cancelled: list[str] = []
            for start in range(0, len(leases), 500):
                part = leases[start : start + 500]
                sql = (
                    f"SELECT lease_id, id, status FROM jobs WHERE lease_id IN ({_marks(len(part))})"
                )
                for lease_id, job_id, status in conn.execute(sql, part).fetchall():
                    if status == JobStatus.IN_PROGRESS.value:
                        conn.execute(
                            "UPDATE jobs SET lease_expires_at = ? WHERE id = ?", (expires, job_id)
                        )
                        extended.append(lease_id)
                    elif status == JobStatus.CANCELLED.value:
                        cancelled.append(job_id)
            known = set(extended)
            lost = [lease for lease in leases if lease not in known]
            return HeartbeatOutcome(extended, lost, cancelled, expires)

        return await self._writer.run(op, durable=False)

    async def submit_results(
        self, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        return await self._writer.run(lambda conn: [_record(conn, r, now) for r in results])

    async def cancel_job(self, job_id: str, now: float) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                f"UPDATE jobs SET status = 'cancelled', finished_at = ? "
                f"WHERE id = ? AND status IN {ACTIVE} RETURNING {JOB_COLUMNS}",
                (now, job_id),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
            return None if row is None else _job(row)

        return await self._writer.run(op)

    async def reap(self, now: float) -> ReapOutcome:
        return await self._writer.run(lambda conn: _reap(conn, now))

    async def count_active(self, owner: str) -> int:
        sql = f"SELECT count(*) FROM jobs WHERE owner = ? AND status IN {ACTIVE}"
        return int(await self._readers.run(lambda conn: conn.execute(sql, (owner,)).fetchone()[0]))

    async def stats(self) -> dict[str, dict[str, int]]:
        def op(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for model, status, count in conn.execute(
                "SELECT model, status, count(*) FROM jobs GROUP BY model, status"
            ):
                out.setdefault(model, {})[status] = count
            return out

        return await self._readers.run(op)

    # -- nodes ------------------------------------------------------------------

    async def register_node(self, node: Node) -> None:
        values = (
            node.id,
            node.name,
            node.owner,
            _text(node.models),
            node.capacity,
            _text(node.hardware),
            node.version,
            node.registered_at,
            node.last_seen,
            _text(node.stats),
        )
        sql = f"INSERT OR REPLACE INTO nodes ({NODE_COLUMNS}) VALUES ({_marks(10)})"
        await self._writer.run(lambda conn: conn.execute(sql, values))

    async def touch_node(self, node_id: str, now: float, stats: dict[str, object] | None) -> bool:
        if stats is None:
            sql, args = "UPDATE nodes SET last_seen = ? WHERE id = ?", (now, node_id)
        else:
            sql = "UPDATE nodes SET last_seen = ?, stats = ? WHERE id = ?"
            args = (now, _text(stats), node_id)  # type: ignore[assignment]
        rows = self._writer.run(lambda conn: conn.execute(sql, args).rowcount, durable=False)
        return bool(await rows)

    async def get_node(self, node_id: str) -> Node | None:
        def op(conn: sqlite3.Connection) -> Node | None:
            row = conn.execute(
                f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?", (node_id,)
            ).fetchone()
            return None if row is None else _node(row)

        return await self._readers.run(op)

    async def list_nodes(self, seen_since: float) -> list[Node]:
        sql = f"SELECT {NODE_COLUMNS} FROM nodes WHERE last_seen >= ? ORDER BY registered_at"
        return await self._readers.run(
            lambda conn: [_node(r) for r in conn.execute(sql, (seen_since,))]
        )

    # -- keys -------------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        values = (
            key.id,
            key.role.value,
            key.key_hash,
            key.prefix,
            key.name,
            key.created_at,
            key.revoked_at,
        )
        sql = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({_marks(7)})"
        await self._writer.run(lambda conn: conn.execute(sql, values))

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?"

        def op(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(sql, (key_hash,)).fetchone()
            return None if row is None else _key(row)

        return await self._readers.run(op)

    async def list_keys(self) -> list[ApiKey]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        return await self._readers.run(lambda conn: [_key(r) for r in conn.execute(sql)])

    async def revoke_key(self, key_id: str, now: float) -> ApiKey | None:
        def op(conn: sqlite3.Connection) -> ApiKey | None:
            conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            found = row.fetchone()
            return None if found is None else _key(found)

        return await self._writer.run(op)

    # -- files ------------------------------------------------------------------

    async def put_file_part(self, file_id: str, index: int, data: bytes) -> None:
        sql = "INSERT OR REPLACE INTO file_parts (file_id, idx, data) VALUES (?, ?, ?)"
        await self._writer.run(lambda conn: conn.execute(sql, (file_id, index, data)))

    async def create_file(self, file: StoredFile) -> StoredFile:
        sql = (
            "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, lines) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq"
        )
        args = (
            file.id,
            file.owner,
            file.purpose,
            file.filename,
            file.bytes,
            file.created_at,
            file.lines,
        )
        seq = await self._writer.run(lambda conn: conn.execute(sql, args).fetchone()[0])
        return replace(file, seq=int(seq))

    async def get_file(self, file_id: str) -> StoredFile | None:
        sql = f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?"

        def op(conn: sqlite3.Connection) -> StoredFile | None:
            row = conn.execute(sql, (file_id,)).fetchone()
            return None if row is None else _file(row)

        return await self._readers.run(op)

    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, before_seq: int | None
    ) -> list[StoredFile]:
        where, args = _where(owner=owner, purpose=purpose, before_seq=before_seq)
        sql = f"SELECT {FILE_COLUMNS} FROM files WHERE {where} ORDER BY seq DESC LIMIT ?"
        return await self._readers.run(
            lambda conn: [_file(r) for r in conn.execute(sql, [*args, limit])]
        )

    async def read_file_part(self, file_id: str, index: int) -> bytes | None:
        sql = "SELECT data FROM file_parts WHERE file_id = ? AND idx = ?"

        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(sql, (file_id, index)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._readers.run(op)

    async def delete_file(self, file_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM file_parts WHERE file_id = ?", (file_id,))
            return conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

        return await self._writer.run(op)

    # -- batches ----------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> Batch:
        sql = (
            f"INSERT INTO batches ({', '.join(BATCH_FIELDS)}) "
            f"VALUES ({_marks(len(BATCH_FIELDS))}) RETURNING seq"
        )
        args = _batch_values(batch)
        seq = await self._writer.run(lambda conn: conn.execute(sql, args).fetchone()[0])
        return replace(batch, seq=int(seq))

    async def get_batch(self, batch_id: str) -> Batch | None:
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?"

        def op(conn: sqlite3.Connection) -> Batch | None:
            row = conn.execute(sql, (batch_id,)).fetchone()
            return None if row is None else _batch(row)

        return await self._readers.run(op)

    async def list_batches(
        self, owner: str | None, limit: int, before_seq: int | None
    ) -> list[Batch]:
        where, args = _where(owner=owner, before_seq=before_seq)
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?"
        return await self._readers.run(
            lambda conn: [_batch(r) for r in conn.execute(sql, [*args, limit])]
        )

    async def open_batches(self) -> list[Batch]:
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE status IN {OPEN_BATCHES} ORDER BY seq"
        return await self._readers.run(lambda conn: [_batch(r) for r in conn.execute(sql)])

    async def save_batch(self, batch: Batch) -> Batch | None:
        saved = replace(batch, version=batch.version + 1)
        columns = [name for name in BATCH_FIELDS if name != "id"]
        sets = ", ".join(f"{name} = ?" for name in columns)
        values = dict(zip(BATCH_FIELDS, _batch_values(saved), strict=True))
        args = [*(values[name] for name in columns), batch.id, batch.version]
        sql = f"UPDATE batches SET {sets} WHERE id = ? AND version = ?"
        changed = await self._writer.run(lambda conn: conn.execute(sql, args).rowcount)
        return saved if changed else None

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        sql = "SELECT status, count(*) FROM jobs WHERE batch_id = ? GROUP BY status"
        return await self._readers.run(
            lambda conn: {status: int(n) for status, n in conn.execute(sql, (batch_id,))}
        )

    async def batch_jobs(self, batch_id: str, after_seq: int, limit: int) -> list[Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        args = (batch_id, after_seq, limit)
        return await self._readers.run(lambda conn: [_job(r) for r in conn.execute(sql, args)])

    async def cancel_batch_jobs(self, batch_id: str, now: float) -> list[str]:
        sql = (
            "UPDATE jobs SET status = 'cancelled', finished_at = ? "
            "WHERE batch_id = ? AND status = 'queued' RETURNING id"
        )
        return await self._writer.run(
            lambda conn: [r[0] for r in conn.execute(sql, (now, batch_id))]
        )

    # -- assistant templates ----------------------------------------------------

    async def put_template(self, template: Template) -> Template:
        sql = (
            f"INSERT INTO templates ({TEMPLATE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (owner, name) DO UPDATE SET description = excluded.description, "
            f"streams = excluded.streams, updated_at = excluded.updated_at "
            f"RETURNING {TEMPLATE_COLUMNS}"
        )
        args = (
            template.owner,
            template.name,
            template.description,
            _text(template.streams),
            template.created_at,
            template.updated_at,
        )
        return await self._writer.run(lambda conn: _template(conn.execute(sql, args).fetchone()))

    async def get_template(self, owner: str, name: str) -> Template | None:
        sql = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE owner = ? AND name = ?"

        def op(conn: sqlite3.Connection) -> Template | None:
            row = conn.execute(sql, (owner, name)).fetchone()
            return None if row is None else _template(row)

        return await self._readers.run(op)

    async def list_templates(self, owner: str | None) -> list[Template]:
        where, args = _where(owner=owner)
        sql = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE {where} ORDER BY name, owner"
        return await self._readers.run(lambda conn: [_template(r) for r in conn.execute(sql, args)])

    async def delete_template(self, owner: str, name: str) -> bool:
        sql = "DELETE FROM templates WHERE owner = ? AND name = ?"
        return bool(await self._writer.run(lambda conn: conn.execute(sql, (owner, name)).rowcount))


def _where(**filters: Any) -> tuple[str, list[Any]]:
    """`a = ? AND b = ? AND seq < ?` for the filters that are not None."""
    where = ["1 = 1"]
    args: list[Any] = []
    for name, value in filters.items():
        if value is None:
            continue
        where.append("seq < ?" if name == "before_seq" else f"{name} = ?")
        args.append(value)
    return " AND ".join(where), args


# -- write operations (run on the writer thread) -----------------------------------

_INSERT_JOB = (
    "INSERT INTO jobs (id, owner, endpoint, model, request, request_hash, status, priority, "
    "max_attempts, metadata, custom_id, idempotency_key, created_at, expires_at, batch_id) "
    "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _submit_jobs(
    conn: sqlite3.Connection, jobs: Sequence[NewJob], now: float
) -> list[SubmitOutcome]:
    outcomes = []
    for nj in jobs:
        if nj.idempotency_key is not None:
            row = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
                (nj.owner, nj.idempotency_key),
            ).fetchone()
            if row is not None:
                existing = _job(row)
                if existing.request_hash != nj.request_hash:
                    raise IdempotencyMismatch(
                        f"Idempotency-Key {nj.idempotency_key!r} was already used for job "
                        f"{existing.id} with a different request body",
                        param="idempotency_key",
                    )
                outcomes.append(SubmitOutcome(existing, created=False))
                continue
        job_id = new_job_id()
        cur = conn.execute(
            _INSERT_JOB,
            (
                job_id,
                nj.owner,
                nj.endpoint,
                nj.model,
                _text(nj.request),
                nj.request_hash,
                nj.priority,
                nj.max_attempts,
                _dumps(nj.metadata),
                nj.custom_id,
                nj.idempotency_key,
                now,
                nj.expires_at,
                nj.batch_id,
            ),
        )
        job = nj.queued(job_id, int(cur.lastrowid or 0), now)
        outcomes.append(SubmitOutcome(job, created=True))
    return outcomes


def _record(conn: sqlite3.Connection, r: NodeResult, now: float) -> ResultOutcome:
    """Apply one node result under fencing: only the current lease may change the job."""
    fence = "WHERE id = :id AND lease_id = :lease AND status = 'in_progress'"
    args: dict[str, Any] = {"id": r.job_id, "lease": r.lease_id, "now": now}
    if r.result is not None:
        sql = (
            "UPDATE jobs SET status = 'completed', result = :result, error = NULL, "
            f"finished_at = :now {fence} RETURNING {JOB_COLUMNS}"
        )
        args["result"] = _dumps(r.result)
    elif r.released:
        sql = (
            "UPDATE jobs SET status = 'queued', attempts = max(attempts - 1, 0), lease_id = NULL, "
            f"lease_expires_at = NULL, node_id = NULL {fence} RETURNING {JOB_COLUMNS}"
        )
    else:
        final = "(NOT :retry OR attempts >= max_attempts)"
        sql = (
            f"UPDATE jobs SET error = :error, "
            f"status = CASE WHEN {final} THEN 'failed' ELSE 'queued' END, "
            f"finished_at = CASE WHEN {final} THEN :now ELSE NULL END, "
            f"lease_id = CASE WHEN {final} THEN lease_id ELSE NULL END, "
            f"node_id = CASE WHEN {final} THEN node_id ELSE NULL END, lease_expires_at = NULL "
            f"{fence} RETURNING {JOB_COLUMNS}"
        )
        args["error"] = _dumps(r.error or {})
        args["retry"] = r.retryable
    row = conn.execute(sql, args).fetchone()
    if row is not None:
        return ResultOutcome(r.job_id, accepted=True, job=_job(row))
    found = conn.execute("SELECT status FROM jobs WHERE id = ?", (r.job_id,)).fetchone()
    if found is None:
        return ResultOutcome(r.job_id, accepted=False, reason="not_found")
    if found[0] == JobStatus.CANCELLED.value:
        return ResultOutcome(r.job_id, accepted=False, reason="cancelled")
    return ResultOutcome(r.job_id, accepted=False, reason="lease_lost")


def _reap(conn: sqlite3.Connection, now: float) -> ReapOutcome:
    expired_now = "expires_at IS NOT NULL AND expires_at <= :now"
    rows = conn.execute(
        f"""
        UPDATE jobs SET
            status = CASE WHEN {expired_now} THEN 'expired'
                          WHEN attempts >= max_attempts THEN 'failed'
                          ELSE 'queued' END,
            error = CASE WHEN attempts >= max_attempts AND NOT ({expired_now})
                         THEN json_object('code', 'attempts_exhausted',
                              'message', 'the lease expired on attempt ' || attempts || ' of '
                                         || max_attempts || ' without a result',
                              'last_error', json(error))
                         ELSE error END,
            finished_at = CASE WHEN {expired_now} OR attempts >= max_attempts
                               THEN :now ELSE NULL END,
            lease_id = NULL, lease_expires_at = NULL, node_id = NULL
        WHERE status = 'in_progress' AND lease_expires_at <= :now
        RETURNING id, status
        """,
        {"now": now},
    ).fetchall()
    expired = conn.execute(
        "UPDATE jobs SET status = 'expired', finished_at = :now "
        "WHERE status = 'queued' AND expires_at <= :now RETURNING id",
        {"now": now},
    ).fetchall()
    outcome = ReapOutcome()
    for job_id, status in rows:
        {"queued": outcome.requeued, "failed": outcome.failed, "expired": outcome.expired}[
            status
        ].append(job_id)
    outcome.expired.extend(job_id for (job_id,) in expired)
    return outcome
