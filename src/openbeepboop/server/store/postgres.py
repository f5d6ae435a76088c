"""`PostgresStore`: the store for several server replicas on one PostgreSQL database.

The same contract and rows as `SqliteStore` (tests/test_store_contract.py runs on both),
over an asyncpg connection pool. Claims are `FOR UPDATE SKIP LOCKED`, so replicas never
hand out the same job and never wait for each other's claims. Migrations run at open
under an advisory lock (store/migrations.py). Wake-ups and token deltas cross replicas
through LISTEN/NOTIFY (store/pg_bridge.py, started by `bridge`).

Every write verb is one statement (which commits as it runs: the hot verbs, one round
trip) or, when it needs several, one explicit transaction. When the connection is lost
(PostgreSQL restarted, the backend terminated, the network dropped) a verb is retried
once, on a fresh connection, only when that cannot apply it twice:

- reads: always;
- writes that failed before anything could be applied (no connection could be had, the
  connection was found dead, or a transaction failed before its COMMIT was sent:
  PostgreSQL rolled it back): always;
- writes that may have been applied (the lone statement or the COMMIT was sent and not
  answered: the outcome is unknown): only the idempotent ones — heartbeat, touch_node,
  register_node, revoke_key, put_file_part, put_template, cancel_job, and submit_jobs
  when every job carries an idempotency key (a replay finds the first one). Any other
  verb answers `Unavailable` (HTTP 503): its caller retries as after any 503 (a node
  re-sends its result and learns it was recorded, a client re-submits with its
  Idempotency-Key); a claim that did commit is re-queued when its lease expires.
  Nothing is applied twice without the caller knowing.

Deadlocks and serialization failures (the transaction was rolled back) are retried once
too. A second failure answers `Unavailable` with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from asyncpg import exceptions as pgerr

from openbeepboop.server.errors import IdempotencyMismatch, InvalidRequest, Unavailable
from openbeepboop.server.models import (
    ApiKey,
    Batch,
    HeartbeatOutcome,
    Job,
    JobFilter,
    JobStatus,
    NewJob,
    Node,
    NodeResult,
    ReapOutcome,
    ResultOutcome,
    StoredFile,
    SubmitOutcome,
    Template,
)
from openbeepboop.server.settings import redact_url
from openbeepboop.server.store.base import DatabaseUnreachable
from openbeepboop.server.store.migrations import migrate_postgres

# The row shapes and JSON handling are SQLite's: the two schemas have the same columns.
from openbeepboop.server.store.sqlite import (
    ACTIVE,
    BATCH_COLUMNS,
    BATCH_FIELDS,
    FILE_COLUMNS,
    JOB_COLUMNS,
    KEY_COLUMNS,
    NODE_COLUMNS,
    OPEN_BATCHES,
    TEMPLATE_COLUMNS,
    _batch,
    _batch_values,
    _dumps,
    _file,
    _job,
    _key,
    _node,
    _template,
    _text,
    new_job_id,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    from openbeepboop.server.core.deltas import DeltaHub
    from openbeepboop.server.core.notify import Notifier
    from openbeepboop.server.store.pg_bridge import PgBridge

    Conn = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("openbeepboop.server.store.postgres")

T = TypeVar("T")
APPLICATION_NAME = "openbeepboop"
ACQUIRE_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
RETRY_DELAY = 0.2
FINAL = "('completed', 'failed', 'cancelled', 'expired')"
JOBS_Q = ", ".join(f"jobs.{c}" for c in JOB_COLUMNS.split(", "))

# The connection (or the server behind it) went away: the verb did not get an answer.
LOST = (
    OSError,
    TimeoutError,
    pgerr.PostgresConnectionError,
    pgerr.AdminShutdownError,
    pgerr.CrashShutdownError,
    pgerr.CannotConnectNowError,
    pgerr.TooManyConnectionsError,
)
# The server refused a value (e.g. a NUL character in text): the caller's input.
UNSTORABLE = (pgerr.CharacterNotInRepertoireError, pgerr.UntranslatableCharacterError)


@dataclass(slots=True)
class _Attempt:
    """How far one try of a verb got: into COMMIT, or onto a closed connection."""

    committing: bool = False
    closed: bool = False


class Kind(enum.Enum):
    """How a verb may be retried after a lost connection (see the module docstring)."""

    READ = "read"
    IDEMPOTENT = "idempotent"
    ONCE = "once"


class DatabaseMissing(DatabaseUnreachable):
    """The server answers but the database does not exist."""


def describe_failure(url: str, exc: BaseException) -> str:
    """One line: what failed to connect, and why."""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot use PostgreSQL database {redact_url(url)}: {why}"


async def connect(url: str) -> asyncpg.Connection[asyncpg.Record]:
    """One connection; DatabaseUnreachable (DatabaseMissing) with one clear line."""
    try:
        return await asyncpg.connect(url, timeout=10)
    except pgerr.InvalidCatalogNameError as exc:
        raise DatabaseMissing(describe_failure(url, exc)) from exc
    except (*LOST, pgerr.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise DatabaseUnreachable(describe_failure(url, exc)) from exc


async def prepare_database(url: str) -> tuple[bool, list[int]]:
    """Create the database when it does not exist (connecting to the server's
    `postgres` database with the same credentials), then apply migrations. Returns
    (created, migrations applied)."""
    created = False
    try:
        applied = await PostgresStore(url).migrate()
    except DatabaseMissing:
        await _create_database(url)
        created = True
        applied = await PostgresStore(url).migrate()
    return created, applied


async def _create_database(url: str) -> None:
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise DatabaseUnreachable(f"{redact_url(url)} names no database")
    conn = await connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await conn.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except pgerr.DuplicateDatabaseError:
        pass  # another setup made it meanwhile
    except pgerr.PostgresError as exc:
        raise DatabaseUnreachable(
            f"database {name!r} does not exist and cannot be created: {exc}"
        ) from exc
    finally:
        await conn.close()


class PostgresStore:
    """The `Store` contract on a PostgreSQL database shared by several servers."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.url = url
        self.pool_size = pool_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._bridge: PgBridge | None = None

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Apply pending migrations, then open the pool; DatabaseUnreachable when we
        cannot connect."""
        await self.migrate()  # on a connection of its own: the pool never holds a lock
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=min(2, self.pool_size),
                max_size=self.pool_size,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": APPLICATION_NAME},
                timeout=10,
                reset=_keep_session,
            )
        except (*LOST, pgerr.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise DatabaseUnreachable(describe_failure(self.url, exc)) from exc

    async def migrate(self) -> list[int]:
        """Connect, apply pending migrations, disconnect (used by `setup`)."""
        conn = await connect(self.url)
        try:
            return await migrate_postgres(conn)
        except LOST as exc:
            raise DatabaseUnreachable(describe_failure(self.url, exc)) from exc
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._bridge is not None:
            await self._bridge.stop()
            self._bridge = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *LOST):
                pool.terminate()

    async def bridge(self, notifier: Notifier, deltas: DeltaHub) -> None:
        """Carry wake-ups and token deltas to and from the other servers on this
        database (LISTEN/NOTIFY on one dedicated connection, with a polling fallback)."""
        from openbeepboop.server.store.pg_bridge import PgBridge

        self._bridge = PgBridge(self, notifier, deltas)
        self._bridge.start()

    # -- running verbs ----------------------------------------------------------

    async def _run(self, kind: Kind, op: Callable[[Conn], Awaitable[T]], single: bool) -> T:
        """Run `op` on a pooled connection (writes in one transaction), retrying once
        when that is safe (module docstring)."""
        for attempt in (1, 2):
            tried = _Attempt()
            try:
                return await self._attempt(kind, op, tried, single)
            except UNSTORABLE as exc:
                raise InvalidRequest(f"a value cannot be stored: {exc}") from exc
            except pgerr.TransactionRollbackError as exc:  # deadlock: nothing was applied
                if attempt == 1:
                    continue
                raise Unavailable(
                    f"the database is busy: {exc}", retry_after=1, code="database_busy"
                ) from exc
            except Exception as exc:
                if not (tried.closed or isinstance(exc, LOST)):
                    raise
                await self._forget_connections()
                if attempt == 1 and (kind is not Kind.ONCE or not tried.committing):
                    log.warning("database connection lost (%s); retrying once", _why(exc))
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                unknown = " (the outcome is unknown: retry)" if tried.committing else ""
                raise Unavailable(
                    f"the database is unreachable{unknown}: {_why(exc)}",
                    retry_after=1,
                    code="database_unavailable",
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, kind: Kind, op: Callable[[Conn], Awaitable[T]], tried: _Attempt, single: bool
    ) -> T:
        if self._pool is None:
            raise Unavailable("the database is not open", retry_after=1, code="database_closed")
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            try:
                if kind is not Kind.READ:
                    # let the loop read what the server may have sent meanwhile (e.g. the
                    # FATAL of pg_terminate_backend): a write never goes out on a
                    # connection the server already ended
                    await asyncio.sleep(0)
                    if conn.is_closed():
                        raise pgerr.ConnectionDoesNotExistError("the server closed it")
                if kind is Kind.READ or single:
                    tried.committing = kind is not Kind.READ  # a lone write commits as it runs
                    return await op(conn)
                tx = conn.transaction()
                await tx.start()
                try:
                    value = await op(conn)
                except BaseException:
                    with contextlib.suppress(*LOST, asyncpg.InterfaceError):
                        await tx.rollback()
                    raise
                tried.committing = True
                await tx.commit()
                return value
            except asyncpg.InterfaceError:
                tried.closed = conn.is_closed()
                raise
            except asyncpg.InternalClientError:
                # the server ended the session while the connection sat idle (e.g.
                # pg_terminate_backend) and its protocol state is stuck: nothing could
                # be sent; drop it
                conn.terminate()
                tried.closed, tried.committing = True, False
                raise

    async def _forget_connections(self) -> None:
        """After a lost connection, replace the idle ones too (they likely died with it)."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.expire_connections()

    def _read(self, op: Callable[[Conn], Awaitable[T]]) -> Awaitable[T]:
        return self._run(Kind.READ, op, single=True)

    def _write(
        self, op: Callable[[Conn], Awaitable[T]], kind: Kind = Kind.ONCE, single: bool = True
    ) -> Awaitable[T]:
        """`single`: `op` makes one write statement (any reads after it need not be
        atomic with it), run without BEGIN/COMMIT; else `op` runs in a transaction."""
        return self._run(kind, op, single)

    # -- jobs -------------------------------------------------------------------

    async def submit_jobs(
        self, jobs: Sequence[NewJob], now: float, durable: bool = True
    ) -> list[SubmitOutcome]:
        # `durable` is not used: every commit here waits for its WAL flush (the server's
        # `synchronous_commit`), which the single-statement writes would need a
        # transaction to relax
        if not jobs:
            return []
        ids = [new_job_id() for _ in jobs]
        columns = [
            ids,
            [j.owner for j in jobs],
            [j.endpoint for j in jobs],
            [j.model for j in jobs],
            [_text(j.request) for j in jobs],
            [j.request_hash for j in jobs],
            [j.priority for j in jobs],
            [j.max_attempts for j in jobs],
            [_dumps(j.metadata) for j in jobs],
            [j.custom_id for j in jobs],
            [j.idempotency_key for j in jobs],
            [j.expires_at for j in jobs],
            [j.batch_id for j in jobs],
        ]
        keyed = all(j.idempotency_key is not None for j in jobs)

        async def op(conn: Conn) -> list[SubmitOutcome]:
            rows = await conn.fetch(_INSERT_JOBS, *columns, now)
            seqs = {r["id"]: r["seq"] for r in rows}
            replays = [j for i, j in zip(ids, jobs, strict=True) if i not in seqs]
            existing = await _existing(conn, replays) if replays else {}
            out = []
            for job_id, nj in zip(ids, jobs, strict=True):
                if job_id in seqs:
                    out.append(SubmitOutcome(nj.queued(job_id, seqs[job_id], now), created=True))
                    continue
                old = existing[(nj.owner, str(nj.idempotency_key))]
                if old.request_hash != nj.request_hash:
                    raise IdempotencyMismatch(
                        f"Idempotency-Key {nj.idempotency_key!r} was already used for job "
                        f"{old.id} with a different request body",
                        param="idempotency_key",
                    )
                out.append(SubmitOutcome(old, created=False))
            return out

        # Replays are looked up and checked after the INSERT: with several jobs that needs
        # a transaction (all or none); one job, or jobs without keys, need not.
        single = len(jobs) == 1 or all(j.idempotency_key is None for j in jobs)
        return await self._write(op, Kind.IDEMPOTENT if keyed else Kind.ONCE, single=single)

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._read(
            lambda c: c.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
        )
        return None if row is None else _job(tuple(row))

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        ids = list(dict.fromkeys(job_ids))
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1::text[])"
        return [_job(tuple(r)) for r in await self._read(lambda c: c.fetch(sql, ids))]

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        where, args = _where(
            owner=flt.owner,
            model=flt.model,
            status=None if flt.status is None else flt.status.value,
            before_seq=flt.after_seq,
        )
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY seq DESC LIMIT ${len(args) + 1}"
        )
        return [_job(tuple(r)) for r in await self._read(lambda c: c.fetch(sql, *args, flt.limit))]

    async def queue_position(self, job: Job) -> int:
        sql = (
            "SELECT count(*) FROM jobs WHERE status = 'queued' AND model = $1 "
            "AND (priority > $2 OR (priority = $2 AND seq < $3))"
        )
        args = (job.model, job.priority, job.seq)
        return int(await self._read(lambda c: c.fetchval(sql, *args)))

    async def fetch_jobs(
        self, node_id: str, models: Sequence[str], max_jobs: int, lease_seconds: float, now: float
    ) -> list[Job]:
        wanted = list(dict.fromkeys(models))
        if not wanted or max_jobs <= 0:
            return []
        args = (wanted, float(now), max_jobs, float(now + lease_seconds), node_id)

        async def op(conn: Conn) -> list[Job]:
            jobs = [_job(tuple(r)) for r in await conn.fetch(_CLAIM, *args)]
            jobs.sort(key=lambda j: (-j.priority, j.seq))
            return jobs

        return await self._write(op)

    async def heartbeat(
        self, node_id: str, lease_ids: Sequence[str], lease_seconds: float, now: float
    ) -> HeartbeatOutcome:
        leases = list(dict.fromkeys(lease_ids))
        expires = float(now + lease_seconds)

        async def op(conn: Conn) -> HeartbeatOutcome:
            live = await conn.fetch(
                "UPDATE jobs SET lease_expires_at = $2 "
                "WHERE lease_id = ANY($1::text[]) AND status = 'in_progress' RETURNING lease_id",
                leases,
                expires,
            )
            gone = await conn.fetch(
                "SELECT lease_id, id FROM jobs "
                "WHERE lease_id = ANY($1::text[]) AND status = 'cancelled'",
                leases,
            )
            known = {r["lease_id"] for r in live}
            cancelled = {r["lease_id"]: r["id"] for r in gone}
            return HeartbeatOutcome(
                extended=[lease for lease in leases if lease in known],
                lost=[lease for lease in leases if lease not in known],
                cancelled=[cancelled[lease] for lease in leases if lease in cancelled],
                lease_expires_at=expires,
            )

        return await self._write(op, Kind.IDEMPOTENT)

    async def submit_results(
        self, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        if not results:
            return []
        ids = [r.job_id for r in results]
        if all(r.result is not None for r in results) and len(set(ids)) == len(ids):

            async def bulk(conn: Conn) -> list[ResultOutcome]:
                return await _complete_all(conn, results, float(now))

            return await self._write(bulk)

        async def op(conn: Conn) -> list[ResultOutcome]:
            return [await _record(conn, r, float(now)) for r in results]

        return await self._write(op, single=False)

    async def cancel_job(self, job_id: str, now: float) -> Job | None:
        async def op(conn: Conn) -> Job | None:
            row = await conn.fetchrow(
                f"UPDATE jobs SET status = 'cancelled', finished_at = $2 "
                f"WHERE id = $1 AND status IN {ACTIVE} RETURNING {JOB_COLUMNS}",
                job_id,
                float(now),
            )
            if row is None:
                row = await conn.fetchrow(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1", job_id)
            return None if row is None else _job(tuple(row))

        return await self._write(op, Kind.IDEMPOTENT)

    async def reap(self, now: float) -> ReapOutcome:
        async def op(conn: Conn) -> ReapOutcome:
            outcome = ReapOutcome()
            for r in await conn.fetch(_REAP_LEASES, float(now)):
                {"queued": outcome.requeued, "failed": outcome.failed, "expired": outcome.expired}[
                    r["status"]
                ].append(r["id"])
            outcome.expired.extend(r["id"] for r in await conn.fetch(_REAP_QUEUED, float(now)))
            return outcome

        return await self._write(op, single=False)

    async def count_active(self, owner: str) -> int:
        sql = f"SELECT count(*) FROM jobs WHERE owner = $1 AND status IN {ACTIVE}"
        return int(await self._read(lambda c: c.fetchval(sql, owner)))

    async def stats(self) -> dict[str, dict[str, int]]:
        rows = await self._read(
            lambda c: c.fetch(
                "SELECT model, status, count(*) AS n FROM jobs GROUP BY model, status"
            )
        )
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["model"], {})[r["status"]] = int(r["n"])
        return out

    # -- for the bridge's polling fallback ----------------------------------------

    async def models_with_queued_jobs(self, models: Sequence[str]) -> list[str]:
        """Which of `models` have at least one queued job (an index probe each)."""
        sql = (
            "SELECT m FROM unnest($1::text[]) AS t(m) WHERE EXISTS "
            "(SELECT 1 FROM jobs WHERE status = 'queued' AND model = t.m)"
        )
        return [r["m"] for r in await self._read(lambda c: c.fetch(sql, list(models)))]

    async def final_job_ids(self, job_ids: Sequence[str]) -> list[str]:
        """Which of `job_ids` are in a final state."""
        sql = f"SELECT id FROM jobs WHERE id = ANY($1::text[]) AND status IN {FINAL}"
        return [r["id"] for r in await self._read(lambda c: c.fetch(sql, list(job_ids)))]

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
            float(node.registered_at),
            float(node.last_seen),
            _text(node.stats),
        )
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in NODE_COLUMNS.split(", ")[1:])
        sql = (
            f"INSERT INTO nodes ({NODE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}"
        )
        await self._write(lambda c: c.execute(sql, *values), Kind.IDEMPOTENT)

    async def touch_node(self, node_id: str, now: float, stats: dict[str, object] | None) -> bool:
        if stats is None:
            sql, args = "UPDATE nodes SET last_seen = $1 WHERE id = $2", [float(now), node_id]
        else:
            sql = "UPDATE nodes SET last_seen = $1, stats = $3 WHERE id = $2"
            args = [float(now), node_id, _text(stats)]
        status = await self._write(lambda c: c.execute(sql, *args), Kind.IDEMPOTENT)
        return _rowcount(status) > 0

    async def get_node(self, node_id: str) -> Node | None:
        sql = f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1"
        row = await self._read(lambda c: c.fetchrow(sql, node_id))
        return None if row is None else _node(tuple(row))

    async def list_nodes(self, seen_since: float) -> list[Node]:
        sql = f"SELECT {NODE_COLUMNS} FROM nodes WHERE last_seen >= $1 ORDER BY registered_at"
        return [
            _node(tuple(r)) for r in await self._read(lambda c: c.fetch(sql, float(seen_since)))
        ]

    # -- keys -------------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        values = (
            key.id,
            key.role.value,
            key.key_hash,
            key.prefix,
            key.name,
            float(key.created_at),
            None if key.revoked_at is None else float(key.revoked_at),
        )
        sql = f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        await self._write(lambda c: c.execute(sql, *values))

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
        row = await self._read(lambda c: c.fetchrow(sql, key_hash))
        return None if row is None else _key(tuple(row))

    async def list_keys(self) -> list[ApiKey]:
        sql = f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
        return [_key(tuple(r)) for r in await self._read(lambda c: c.fetch(sql))]

    async def revoke_key(self, key_id: str, now: float) -> ApiKey | None:
        async def op(conn: Conn) -> ApiKey | None:
            await conn.execute(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                key_id,
                float(now),
            )
            row = await conn.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
            return None if row is None else _key(tuple(row))

        return await self._write(op, Kind.IDEMPOTENT)

    # -- files ------------------------------------------------------------------

    async def put_file_part(self, file_id: str, index: int, data: bytes) -> None:
        sql = (
            "INSERT INTO file_parts (file_id, idx, data) VALUES ($1, $2, $3) "
            "ON CONFLICT (file_id, idx) DO UPDATE SET data = EXCLUDED.data"
        )
        await self._write(lambda c: c.execute(sql, file_id, index, bytes(data)), Kind.IDEMPOTENT)

    async def create_file(self, file: StoredFile) -> StoredFile:
        sql = (
            "INSERT INTO files (id, owner, purpose, filename, bytes, created_at, lines) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq"
        )
        args = (
            file.id,
            file.owner,
            file.purpose,
            file.filename,
            file.bytes,
            float(file.created_at),
            file.lines,
        )
        seq = await self._write(lambda c: c.fetchval(sql, *args))
        return replace(file, seq=int(seq))

    async def get_file(self, file_id: str) -> StoredFile | None:
        sql = f"SELECT {FILE_COLUMNS} FROM files WHERE id = $1"
        row = await self._read(lambda c: c.fetchrow(sql, file_id))
        return None if row is None else _file(tuple(row))

    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, before_seq: int | None
    ) -> list[StoredFile]:
        where, args = _where(owner=owner, purpose=purpose, before_seq=before_seq)
        sql = (
            f"SELECT {FILE_COLUMNS} FROM files WHERE {where} "
            f"ORDER BY seq DESC LIMIT ${len(args) + 1}"
        )
        return [_file(tuple(r)) for r in await self._read(lambda c: c.fetch(sql, *args, limit))]

    async def read_file_part(self, file_id: str, index: int) -> bytes | None:
        sql = "SELECT data FROM file_parts WHERE file_id = $1 AND idx = $2"
        data = await self._read(lambda c: c.fetchval(sql, file_id, index))
        return None if data is None else bytes(data)

    async def delete_file(self, file_id: str) -> bool:
        async def op(conn: Conn) -> bool:
            await conn.execute("DELETE FROM file_parts WHERE file_id = $1", file_id)
            return _rowcount(await conn.execute("DELETE FROM files WHERE id = $1", file_id)) > 0

        return await self._write(op, single=False)

    # -- batches ----------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> Batch:
        marks = ", ".join(f"${i}" for i in range(1, len(BATCH_FIELDS) + 1))
        sql = f"INSERT INTO batches ({', '.join(BATCH_FIELDS)}) VALUES ({marks}) RETURNING seq"
        args = _pg_batch_values(batch)
        seq = await self._write(lambda c: c.fetchval(sql, *args))
        return replace(batch, seq=int(seq))

    async def get_batch(self, batch_id: str) -> Batch | None:
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1"
        row = await self._read(lambda c: c.fetchrow(sql, batch_id))
        return None if row is None else _batch(tuple(row))

    async def list_batches(
        self, owner: str | None, limit: int, before_seq: int | None
    ) -> list[Batch]:
        where, args = _where(owner=owner, before_seq=before_seq)
        sql = (
            f"SELECT {BATCH_COLUMNS} FROM batches WHERE {where} "
            f"ORDER BY seq DESC LIMIT ${len(args) + 1}"
        )
        return [_batch(tuple(r)) for r in await self._read(lambda c: c.fetch(sql, *args, limit))]

    async def open_batches(self) -> list[Batch]:
        sql = f"SELECT {BATCH_COLUMNS} FROM batches WHERE status IN {OPEN_BATCHES} ORDER BY seq"
        return [_batch(tuple(r)) for r in await self._read(lambda c: c.fetch(sql))]

    async def save_batch(self, batch: Batch) -> Batch | None:
        saved = replace(batch, version=batch.version + 1)
        columns = [name for name in BATCH_FIELDS if name != "id"]
        values = dict(zip(BATCH_FIELDS, _pg_batch_values(saved), strict=True))
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=1))
        n = len(columns)
        sql = f"UPDATE batches SET {sets} WHERE id = ${n + 1} AND version = ${n + 2}"
        args = [*(values[name] for name in columns), batch.id, batch.version]
        status = await self._write(lambda c: c.execute(sql, *args))
        return saved if _rowcount(status) else None

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        sql = "SELECT status, count(*) AS n FROM jobs WHERE batch_id = $1 GROUP BY status"
        rows = await self._read(lambda c: c.fetch(sql, batch_id))
        return {r["status"]: int(r["n"]) for r in rows}

    async def batch_jobs(self, batch_id: str, after_seq: int, limit: int) -> list[Job]:
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        )
        rows = await self._read(lambda c: c.fetch(sql, batch_id, after_seq, limit))
        return [_job(tuple(r)) for r in rows]

    async def cancel_batch_jobs(self, batch_id: str, now: float) -> list[str]:
        sql = (
            "UPDATE jobs SET status = 'cancelled', finished_at = $2 "
            "WHERE batch_id = $1 AND status = 'queued' RETURNING id"
        )
        rows = await self._write(lambda c: c.fetch(sql, batch_id, float(now)))
        return [r["id"] for r in rows]

    # -- assistant templates ----------------------------------------------------

    async def put_template(self, template: Template) -> Template:
        sql = (
            f"INSERT INTO templates ({TEMPLATE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (owner, name) DO UPDATE SET description = EXCLUDED.description, "
            "streams = EXCLUDED.streams, updated_at = EXCLUDED.updated_at "
            f"RETURNING {TEMPLATE_COLUMNS}"
        )
        args = (
            template.owner,
            template.name,
            template.description,
            _text(template.streams),
            float(template.created_at),
            float(template.updated_at),
        )
        row = await self._write(lambda c: c.fetchrow(sql, *args), Kind.IDEMPOTENT)
        assert row is not None
        return _template(tuple(row))

    async def get_template(self, owner: str, name: str) -> Template | None:
        sql = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE owner = $1 AND name = $2"
        row = await self._read(lambda c: c.fetchrow(sql, owner, name))
        return None if row is None else _template(tuple(row))

    async def list_templates(self, owner: str | None) -> list[Template]:
        where, args = _where(owner=owner)
        sql = f"SELECT {TEMPLATE_COLUMNS} FROM templates WHERE {where} ORDER BY name, owner"
        return [_template(tuple(r)) for r in await self._read(lambda c: c.fetch(sql, *args))]

    async def delete_template(self, owner: str, name: str) -> bool:
        sql = "DELETE FROM templates WHERE owner = $1 AND name = $2"
        return _rowcount(await self._write(lambda c: c.execute(sql, owner, name))) > 0


# -- SQL and helpers ------------------------------------------------------------------

_INSERT_JOBS = """
INSERT INTO jobs (id, owner, endpoint, model, request, request_hash, status, priority,
                  max_attempts, metadata, custom_id, idempotency_key, created_at, expires_at,
                  batch_id)
SELECT t.id, t.owner, t.endpoint, t.model, t.request, t.request_hash, 'queued', t.priority,
       t.max_attempts, t.metadata, t.custom_id, t.idempotency_key, $14, t.expires_at, t.batch_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[],
            $12::float8[], $13::text[])
     WITH ORDINALITY AS t(id, owner, endpoint, model, request, request_hash, priority,
                          max_attempts, metadata, custom_id, idempotency_key, expires_at,
                          batch_id, ord)
ORDER BY t.ord
ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, seq
"""

# Up to $3 candidates per model, each model's best first, locked or skipped; the best $3
# of them are leased. Rows another claimer holds are skipped, never waited for.
_CLAIM = f"""
WITH picked AS (
    SELECT c.seq FROM unnest($1::text[]) AS m(name)
    CROSS JOIN LATERAL (
        SELECT seq, priority FROM jobs
        WHERE status = 'queued' AND model = m.name AND (expires_at IS NULL OR expires_at > $2)
        ORDER BY priority DESC, seq
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.seq
    LIMIT $3
)
UPDATE jobs SET status = 'in_progress', lease_id = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = $4, attempts = attempts + 1, node_id = $5, started_at = $2
WHERE seq IN (SELECT seq FROM picked)
RETURNING {JOB_COLUMNS}
"""

_EXPIRED_NOW = "(expires_at IS NOT NULL AND expires_at <= $1)"
_REAP_LEASES = f"""
UPDATE jobs SET
    status = CASE WHEN {_EXPIRED_NOW} THEN 'expired'
                  WHEN attempts >= max_attempts THEN 'failed'
                  ELSE 'queued' END,
    error = CASE WHEN attempts >= max_attempts AND NOT {_EXPIRED_NOW}
                 THEN json_build_object(
                     'code', 'attempts_exhausted',
                     'message', 'the lease expired on attempt ' || attempts || ' of '
                                || max_attempts || ' without a result',
                     'last_error', error::json)::text
                 ELSE error END,
    finished_at = CASE WHEN {_EXPIRED_NOW} OR attempts >= max_attempts THEN $1 ELSE NULL END,
    lease_id = NULL, lease_expires_at = NULL, node_id = NULL
WHERE seq IN (SELECT seq FROM jobs WHERE status = 'in_progress' AND lease_expires_at <= $1
              FOR UPDATE SKIP LOCKED)
RETURNING id, status
"""
_REAP_QUEUED = """
UPDATE jobs SET status = 'expired', finished_at = $1
WHERE seq IN (SELECT seq FROM jobs WHERE status = 'queued' AND expires_at <= $1
              FOR UPDATE SKIP LOCKED)
RETURNING id
"""

_FENCE = "WHERE id = $1 AND lease_id = $2 AND status = 'in_progress'"
_COMPLETE = (
    "UPDATE jobs SET status = 'completed', result = $3, error = NULL, finished_at = $4 "
    f"{_FENCE} RETURNING {JOB_COLUMNS}"
)
_RELEASE = (
    "UPDATE jobs SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_id = NULL, "
    f"lease_expires_at = NULL, node_id = NULL {_FENCE} RETURNING {JOB_COLUMNS}"
)
_FINAL_IF = "(NOT $5::boolean OR attempts >= max_attempts)"
_FAIL = (
    f"UPDATE jobs SET error = $3, "
    f"status = CASE WHEN {_FINAL_IF} THEN 'failed' ELSE 'queued' END, "
    f"finished_at = CASE WHEN {_FINAL_IF} THEN $4::float8 ELSE NULL END, "
    f"lease_id = CASE WHEN {_FINAL_IF} THEN lease_id ELSE NULL END, "
    f"node_id = CASE WHEN {_FINAL_IF} THEN node_id ELSE NULL END, lease_expires_at = NULL "
    f"{_FENCE} RETURNING {JOB_COLUMNS}"
)
_COMPLETE_ALL = f"""
UPDATE jobs SET status = 'completed', result = r.result, error = NULL, finished_at = $4
FROM unnest($1::text[], $2::text[], $3::text[]) AS r(id, lease, result)
WHERE jobs.id = r.id AND jobs.lease_id = r.lease AND jobs.status = 'in_progress'
RETURNING {JOBS_Q}
"""


async def _record(conn: Conn, r: NodeResult, now: float) -> ResultOutcome:
    """Apply one node result under fencing: only the current lease may change the job."""
    if r.result is not None:
        row = await conn.fetchrow(_COMPLETE, r.job_id, r.lease_id, _dumps(r.result), now)
    elif r.released:
        row = await conn.fetchrow(_RELEASE, r.job_id, r.lease_id)
    else:
        error = _dumps(r.error or {})
        row = await conn.fetchrow(_FAIL, r.job_id, r.lease_id, error, now, r.retryable)
    if row is not None:
        return ResultOutcome(r.job_id, accepted=True, job=_job(tuple(row)))
    return (await _refusals(conn, [r.job_id]))[r.job_id]


async def _complete_all(
    conn: Conn, results: Sequence[NodeResult], now: float
) -> list[ResultOutcome]:
    """Many results (no errors, distinct jobs) in one statement."""
    rows = await conn.fetch(
        _COMPLETE_ALL,
        [r.job_id for r in results],
        [r.lease_id for r in results],
        [_dumps(r.result) for r in results],
        now,
    )
    done = {row["id"]: _job(tuple(row)) for row in rows}
    missing = [r.job_id for r in results if r.job_id not in done]
    refused = await _refusals(conn, missing) if missing else {}
    return [
        ResultOutcome(r.job_id, accepted=True, job=done[r.job_id])
        if r.job_id in done
        else refused[r.job_id]
        for r in results
    ]


async def _refusals(conn: Conn, job_ids: list[str]) -> dict[str, ResultOutcome]:
    """Why results for these jobs were refused: unknown job, cancelled, or lease lost."""
    rows = await conn.fetch("SELECT id, status FROM jobs WHERE id = ANY($1::text[])", job_ids)
    status = {r["id"]: r["status"] for r in rows}
    out = {}
    for job_id in job_ids:
        if job_id not in status:
            reason = "not_found"
        elif status[job_id] == JobStatus.CANCELLED.value:
            reason = "cancelled"
        else:
            reason = "lease_lost"
        out[job_id] = ResultOutcome(job_id, accepted=False, reason=reason)
    return out


async def _existing(conn: Conn, jobs: Sequence[NewJob]) -> dict[tuple[str, str], Job]:
    """The stored jobs with the (owner, idempotency_key) of `jobs`."""
    rows = await conn.fetch(
        f"SELECT {JOBS_Q} FROM jobs JOIN unnest($1::text[], $2::text[]) AS k(owner, key) "
        "ON jobs.owner = k.owner AND jobs.idempotency_key = k.key",
        [j.owner for j in jobs],
        [j.idempotency_key for j in jobs],
    )
    found = [_job(tuple(r)) for r in rows]
    return {(j.owner, str(j.idempotency_key)): j for j in found}


def _pg_batch_values(batch: Batch) -> list[Any]:
    """SQLite's column values, with times as floats (asyncpg is strict about types)."""
    out: list[Any] = []
    for name, value in zip(BATCH_FIELDS, _batch_values(batch), strict=True):
        if (name.endswith("_at") or name == "lease_until") and isinstance(value, int):
            value = float(value)
        out.append(value)
    return out


def _where(**filters: Any) -> tuple[str, list[Any]]:
    """`a = $1 AND b = $2 AND seq < $3` for the filters that are not None."""
    where = ["TRUE"]
    args: list[Any] = []
    for name, value in filters.items():
        if value is None:
            continue
        args.append(value)
        where.append(f"seq < ${len(args)}" if name == "before_seq" else f"{name} = ${len(args)}")
    return " AND ".join(where), args


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset between two users of a connection. asyncpg's default (UNLISTEN,
    RESET ALL, advisory unlock: a round trip per verb) has nothing to undo here: the
    verbs set no session state, and an open transaction is rolled back by the pool."""


def _rowcount(status: str) -> int:
    """The row count of a command tag such as `UPDATE 3`."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
