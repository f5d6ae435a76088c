"""`SqlStore`: the store's verbs, written once for every SQL dialect.

A verb here runs named queries (sql/<dialect>.sql), alone or several in one
transaction, and maps their rows (rows.py). How a query runs is the subclass's:
`SqliteStore` on its reader threads and its one writer, `PostgresStore` on its pool.
What differs in shape between the dialects is theirs too: submitting jobs (a row at a
time, or one bulk statement), the claim's statement, recording results.

A write declares what its dialect may need to know: `idempotent` (PostgreSQL may retry
it after a lost connection, pg_pool.py) and `durable` (SQLite's commit must reach the
disk before the caller hears of it, sqlite_io.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson

from openbeepboop.server.models import (
    JSON,
    ApiKey,
    Batch,
    CacheSummary,
    HeartbeatOutcome,
    Job,
    JobFilter,
    JobStatus,
    LeaseResume,
    Node,
    ReapOutcome,
    RecentRuns,
    Share,
    StoredFile,
    SwarmRevocation,
    Template,
    WebSession,
)
from openbeepboop.server.store import fair, outcomes, rows
from openbeepboop.server.store.queries import Queries
from openbeepboop.server.store.rows import Row


@dataclass(frozen=True, slots=True)
class Write:
    """What a dialect may need to know of a write (module docstring)."""

    idempotent: bool = False  # PostgreSQL may apply it again after a lost connection
    durable: bool = True  # SQLite's commit reaches the disk before the caller hears


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim (`fetch_jobs`) asks for: by which node (its id, name and labels as a
    JSON object, for pinned jobs), which models, how many, until when, at what time."""

    node_id: str
    node_name: str | None
    node_labels: str
    models: list[str]
    max_jobs: int
    expires: float
    now: float
    fair: bool = True  # within a priority, shares in weighted turn (store/fair.py)


T = TypeVar("T")
ONCE = Write()
IDEMPOTENT = Write(idempotent=True)
UNSYNCED = Write(idempotent=True, durable=False)  # lease renewals, contact: lost, they renew
# (pruning too: nobody is told of it; lost to a power cut, the next pass deletes again)
CLAIM = Write(durable=False)  # applied once; lost to a power cut, the job only runs again
COUNT = Write(durable=False)  # a request counter: lost to a power cut, a window starts over
Steps = Sequence[tuple[str, Sequence[Any]]]
TRIM_ROWS = 1000  # response cache answers deleted per statement
ALL = 2**62  # a count's cap that is no cap
POSITION_BUDGET = 20_000  # rows a fair queue_position counts at most (store/fair.py)


class SqlStore(ABC):
    """The `Store` verbs common to the SQL stores (see the module docstring)."""

    def __init__(self, dialect: str) -> None:
        self._q = Queries(dialect)

    @abstractmethod
    async def _read(self, sql: str, args: Sequence[Any]) -> Sequence[Row]:
        """The rows of a read."""

    @abstractmethod
    async def _returning(self, sql: str, args: Sequence[Any], how: Write = ONCE) -> Sequence[Row]:
        """The rows a write returns (RETURNING)."""

    @abstractmethod
    async def _change(self, sql: str, args: Sequence[Any], how: Write = ONCE) -> int:
        """How many rows a write changed."""

    @abstractmethod
    async def _transaction(self, steps: Steps, how: Write = ONCE) -> list[Sequence[Row]]:
        """Run the statements in order, all or none; the rows of each."""

    @abstractmethod
    async def _claim(self, claim: Claim) -> list[Job]:
        """Run the dialect's claim (`claim_jobs`): the jobs it leased."""

    @abstractmethod
    def _array(self, values: Sequence[str] | Sequence[float]) -> Any:
        """`values` as the dialect takes a list parameter."""

    async def _first(self, name: str, *args: Any) -> Row | None:
        found = await self._read(self._q[name], args)
        return found[0] if found else None

    async def _listing(
        self, name: str, to: Callable[[Row], T], limit: int | None = None, **filters: Any
    ) -> list[T]:
        """A listing query, its `{where}` made of the filters given (Queries.listing)."""
        sql, args = self._q.listing(name, limit, **filters)
        return [to(r) for r in await self._read(sql, args)]

    # -- jobs -------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._first("get_job", job_id)
        return None if row is None else rows.job(row)

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        ids = self._array(list(dict.fromkeys(job_ids)))
        return [rows.job(r) for r in await self._read(self._q["get_jobs"], (ids,))]

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        status = None if flt.status is None else flt.status.value
        return await self._listing(
            "list_jobs",
            rows.job,
            flt.limit,
            owner=flt.owner,
            model=flt.model,
            status=status,
            batch_id=flt.batch_id,
            before_seq=flt.after_seq,
            created_after=flt.created_after,
            created_before=flt.created_before,
        )

    async def queue_position(self, job: Job, fair: bool = True) -> int:
        if not fair:
            row = await self._first("queue_position", job.model, job.priority, job.seq)
            return 0 if row is None else int(row[0])
        return await self._fair_position(job)

    async def _fair_position(self, job: Job) -> int:
        """queue_position under fair share (store/fair.py): the jobs of a higher
        priority, this share's older jobs of its priority, and each other share's jobs
        of its priority whose turn comes before this one's. Reads: one per owner with
        queued jobs of the model, each costing what it counts (capped at that share's
        turns ahead), so a job behind a flood of another share is counted in a few
        rows, not the flood. At most POSITION_BUDGET rows are counted: a job deeper in a
        share's backlog is told a position of at least that many (a floor), so that
        submitting a flood one job at a time does not count it over and over."""
        m, p = job.model, job.priority
        above = await self._first("queued_above", m, p, job.seq)
        owners = [r[0] for r in await self._read(self._q["queued_owners"], (m,))]
        if job.owner not in owners:
            owners.append(job.owner)
        found = await self._read(self._q["share_groups"], (self._array(owners),))
        groups: dict[str, str] = {r[0]: r[1] for r in found}
        share_of = {o: groups.get(o) or o for o in owners}
        shares = sorted(set(share_of.values()))
        weights = {
            r[0]: float(r[1])
            for r in await self._read(self._q["share_weights"], (self._array(shares),))
        }
        turns = {
            r[0]: float(r[1])
            for r in await self._read(self._q["turns_of"], (m, self._array(shares)))
        }
        clock = turns.get(fair.CLOCK, 0.0)

        budget = [POSITION_BUDGET]  # rows left to count

        async def count(owner: str, before_seq: int, cap: int) -> int:
            cap = min(cap, budget[0])
            if cap <= 0:
                return 0
            row = await self._first("owner_queued", m, owner, p, before_seq, cap)
            found = 0 if row is None else int(row[0])
            budget[0] -= found
            return found

        mine = share_of[job.owner]
        members = [o for o in owners if share_of[o] == mine]
        own = sum([await count(o, job.seq, ALL) for o in members])
        start = max(turns.get(mine, 0.0), clock) + own / weights.get(mine, 1.0)
        ahead = own
        for share in shares:
            if share == mine:
                continue
            first, weight = max(turns.get(share, 0.0), clock), weights.get(share, 1.0)
            before, tie = fair.turns_before(first, weight, start)
            theirs = [o for o in owners if share_of[o] == share]
            ahead += await self._counted(theirs, count, ALL, before)
            if tie and await self._counted(theirs, count, job.seq, before + 1) > before:
                ahead += 1  # their job of the same turn is older: it goes first
        return (0 if above is None else int(above[0])) + ahead

    @staticmethod
    async def _counted(
        owners: Sequence[str], count: Callable[[str, int, int], Awaitable[int]], seq: int, cap: int
    ) -> int:
        """The queued jobs of these owners older than row `seq`, counted up to `cap`."""
        found = 0
        for owner in owners:
            if found >= cap:
                break
            found += await count(owner, seq, cap - found)
        return found

    async def queue_heads(self, models: Sequence[str], now: float) -> dict[str, float]:
        heads: dict[str, float] = {}
        for model in dict.fromkeys(models):
            row = await self._first("queue_head", model, float(now))
            if row is not None:
                heads[model] = float(row[0])
        return heads

    async def fetch_jobs(
        self,
        node_id: str,
        models: Sequence[str],
        max_jobs: int,
        lease_seconds: float,
        now: float,
        node_name: str | None = None,
        node_labels: Mapping[str, str] | None = None,
        fair: bool = True,
    ) -> list[Job]:
        wanted = list(dict.fromkeys(models))
        if not wanted or max_jobs <= 0:
            return []
        labels = rows.json_text(dict(node_labels or {}))
        expires = float(now + lease_seconds)
        claim = Claim(node_id, node_name, labels, wanted, max_jobs, expires, float(now), fair)
        jobs = await self._claim(claim)
        jobs.sort(key=lambda j: (-j.priority, j.seq))
        return jobs

    async def heartbeat(
        self, node_id: str, lease_ids: Sequence[str], lease_seconds: float, now: float
    ) -> HeartbeatOutcome:
        leases = list(dict.fromkeys(lease_ids))
        expires = float(now + lease_seconds)
        ids = self._array(leases)
        steps = [(self._q["extend_leases"], (ids, expires)), (self._q["cancelled_leases"], (ids,))]
        extended, cancelled = await self._transaction(steps, UNSYNCED)
        live = {r[0] for r in extended}
        return outcomes.heartbeat(leases, live, {r[0]: r[1] for r in cancelled}, expires)

    async def cancel_job(self, job_id: str, now: float) -> Job | None:
        steps = [(self._q["cancel_job"], (job_id, float(now))), (self._q["get_job"], (job_id,))]
        cancelled, found = await self._transaction(steps, IDEMPOTENT)
        row = next(iter([*cancelled, *found]), None)
        return None if row is None else rows.job(row)

    async def release_lease(self, job_id: str, lease_id: str) -> Job | None:
        # not synced: lost to a power cut, the lease only expires as it would have
        released = await self._returning(self._q["release_job"], (job_id, lease_id), UNSYNCED)
        return rows.job(released[0]) if released else None

    async def move_job(
        self, job_id: str, lease_id: str | None, model: str, request: JSON, error: JSON | None
    ) -> Job | None:
        args = (job_id, lease_id, model, rows.json_text(request), _json_or_none(error))
        moved = await self._returning(self._q["move_job"], args)
        return rows.job(moved[0]) if moved else None

    async def reap(self, now: float) -> ReapOutcome:
        args = (float(now),)
        steps = [(self._q["reap_leases"], args), (self._q["reap_queued"], args)]
        leases, queued = await self._transaction(steps)
        return outcomes.reaped(leases, [r[0] for r in queued])

    async def watch_leases(self, now: float) -> None:
        await self._change(self._q["watch_leases"], (float(now),), UNSYNCED)

    async def resume_leases(self, now: float, grace: float, down_after: float) -> LeaseResume:
        row = await self._first("leases_watched_at")
        watched_at = None if row is None else float(row[0])
        if watched_at is not None and now - watched_at <= down_after:
            await self.watch_leases(now)
            return LeaseResume(down=False, watched_at=watched_at)
        steps = [
            (self._q["resume_leases"], (watched_at, float(now + grace))),
            (self._q["watch_leases"], (float(now),)),
        ]
        extended, _ = await self._transaction(steps, IDEMPOTENT)
        return LeaseResume(down=True, watched_at=watched_at, extended=[r[0] for r in extended])

    async def count_active(self, owner: str) -> int:
        row = await self._first("count_active", owner)
        return 0 if row is None else int(row[0])

    async def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for model, status, count in await self._read(self._q["job_counts"], ()):
            out.setdefault(model, {})[status] = int(count)
        return out

    async def finished_counts(
        self, since: float, until: float, step: float
    ) -> list[tuple[int, str, str, int]]:
        args = (float(since), float(until), float(step))
        return [
            (int(i), str(model), str(status), int(n))
            for i, model, status, n in await self._read(self._q["finished_counts"], args)
        ]

    async def recent_runs(self, since: float) -> list[RecentRuns]:
        found = await self._read(self._q["recent_runs"], (float(since),))
        return [
            RecentRuns(str(model), int(n), float(busy), float(first), float(last))
            for model, n, busy, first, last in found
        ]

    # -- nodes ------------------------------------------------------------------

    async def register_node(self, node: Node, stale_before: float | None = None) -> None:
        steps: list[tuple[str, Sequence[Any]]] = []
        if stale_before is not None:
            forget = (node.owner, node.name, float(stale_before))
            steps.append((self._q["forget_stale_namesakes"], forget))
        steps.append((self._q["upsert_node"], rows.node_values(node)))
        await self._transaction(steps, IDEMPOTENT)

    async def forget_nodes(self, seen_before: float) -> int:
        return await self._change(self._q["forget_nodes"], (float(seen_before),), IDEMPOTENT)

    async def touch_node(self, node_id: str, now: float, stats: dict[str, object] | None) -> bool:
        args: tuple[Any, ...] = (float(now), node_id)
        name = "touch_node"
        if stats is not None:
            name, args = "touch_node_stats", (*args, rows.json_text(stats))
        return await self._change(self._q[name], args, UNSYNCED) > 0

    async def get_node(self, node_id: str) -> Node | None:
        row = await self._first("get_node", node_id)
        return None if row is None else rows.node(row)

    async def list_nodes(self, seen_since: float) -> list[Node]:
        return [rows.node(r) for r in await self._read(self._q["list_nodes"], (float(seen_since),))]

    # -- keys -------------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        await self._change(self._q["insert_key"], rows.api_key_values(key))

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = await self._first("get_key_by_hash", key_hash)
        return None if row is None else rows.api_key(row)

    async def list_keys(self) -> list[ApiKey]:
        return [rows.api_key(r) for r in await self._read(self._q["list_keys"], ())]

    async def revoke_key(self, key_id: str, now: float) -> ApiKey | None:
        steps = [(self._q["revoke_key"], (key_id, float(now))), (self._q["get_key"], (key_id,))]
        _, found = await self._transaction(steps, IDEMPOTENT)
        return rows.api_key(found[0]) if found else None

    async def set_key_group(self, key_id: str, group: str | None) -> ApiKey | None:
        found = await self._returning(self._q["set_key_group"], (key_id, group), IDEMPOTENT)
        return rows.api_key(found[0]) if found else None

    # -- shares -------------------------------------------------------------------

    async def put_share(self, share: Share) -> None:
        await self._change(self._q["put_share"], rows.share_values(share), IDEMPOTENT)

    async def list_shares(self) -> list[Share]:
        return [rows.share(r) for r in await self._read(self._q["list_shares"], ())]

    async def delete_share(self, name: str) -> bool:
        return await self._change(self._q["delete_share"], (name,), IDEMPOTENT) > 0

    # -- swarm revocations ----------------------------------------------------------

    async def add_revocations(self, items: Sequence[SwarmRevocation]) -> int:
        fresh = list({r.key_id: r for r in items}.values())
        if not fresh:
            return 0
        columns = (
            self._array([r.key_id for r in fresh]),
            self._array([float(r.revoked_at) for r in fresh]),
            self._array([r.origin for r in fresh]),
        )
        steps = [(self._q["add_revocations"], columns), (self._q["revoke_swarm_revoked_keys"], ())]
        added, _ = await self._transaction(steps, IDEMPOTENT)
        return len(added)

    async def list_revocations(self) -> list[SwarmRevocation]:
        return [rows.revocation(r) for r in await self._read(self._q["list_revocations"], ())]

    async def get_revocation(self, key_id: str) -> SwarmRevocation | None:
        row = await self._first("get_revocation", key_id)
        return None if row is None else rows.revocation(row)

    # -- web sessions -------------------------------------------------------------

    async def create_session(self, session: WebSession) -> None:
        await self._change(self._q["insert_session"], rows.web_session_values(session))

    async def get_session(self, id_hash: str, now: float) -> WebSession | None:
        row = await self._first("get_session", id_hash, float(now))
        return None if row is None else rows.web_session(row)

    async def delete_session(self, id_hash: str) -> bool:
        return await self._change(self._q["delete_session"], (id_hash,), IDEMPOTENT) > 0

    async def prune_sessions(self, now: float) -> int:
        return await self._change(self._q["prune_sessions"], (float(now),), IDEMPOTENT)

    # -- files ------------------------------------------------------------------

    async def put_file_part(self, file_id: str, index: int, data: bytes) -> None:
        args = (file_id, index, bytes(data))
        await self._change(self._q["put_file_part"], args, IDEMPOTENT)

    async def create_file(self, file: StoredFile) -> StoredFile:
        [row] = await self._returning(self._q["insert_file"], rows.file_values(file))
        return replace(file, seq=int(row[0]))

    async def get_file(self, file_id: str) -> StoredFile | None:
        row = await self._first("get_file", file_id)
        return None if row is None else rows.stored_file(row)

    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, before_seq: int | None
    ) -> list[StoredFile]:
        return await self._listing(
            "list_files",
            rows.stored_file,
            limit,
            owner=owner,
            purpose=purpose,
            before_seq=before_seq,
        )

    async def read_file_part(self, file_id: str, index: int) -> bytes | None:
        row = await self._first("read_file_part", file_id, index)
        return None if row is None else bytes(row[0])

    async def delete_file(self, file_id: str) -> bool:
        steps = [(self._q["delete_file_parts"], (file_id,)), (self._q["delete_file"], (file_id,))]
        _, deleted = await self._transaction(steps)
        return bool(deleted)

    # -- batches ----------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> Batch:
        [row] = await self._returning(self._q["insert_batch"], rows.batch_values(batch))
        return replace(batch, seq=int(row[0]))

    async def get_batch(self, batch_id: str) -> Batch | None:
        row = await self._first("get_batch", batch_id)
        return None if row is None else rows.batch(row)

    async def list_batches(
        self, owner: str | None, limit: int, before_seq: int | None
    ) -> list[Batch]:
        return await self._listing(
            "list_batches", rows.batch, limit, owner=owner, before_seq=before_seq
        )

    async def open_batches(self) -> list[Batch]:
        return [rows.batch(r) for r in await self._read(self._q["open_batches"], ())]

    async def save_batch(self, batch: Batch) -> Batch | None:
        saved = replace(batch, version=batch.version + 1)
        args = (batch.id, batch.version, *rows.batch_values(saved)[1:])
        return saved if await self._change(self._q["save_batch"], args) else None

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        found = await self._read(self._q["batch_counts"], (batch_id,))
        return {status: int(n) for status, n in found}

    async def batch_jobs(self, batch_id: str, after_seq: int, limit: int) -> list[Job]:
        found = await self._read(self._q["batch_jobs"], (batch_id, after_seq, limit))
        return [rows.job(r) for r in found]

    async def cancel_batch_jobs(self, batch_id: str, now: float) -> list[str]:
        cancelled = await self._returning(self._q["cancel_batch_jobs"], (batch_id, float(now)))
        return [r[0] for r in cancelled]

    # -- retention --------------------------------------------------------------

    async def delete_job(self, job_id: str) -> bool:
        steps = [(self._q["delete_job"], (job_id,))]
        deleted, _ = await self._transaction([*steps, (self._q["forget_cached_answer"], (job_id,))])
        return len(deleted) > 0

    async def prune_jobs(self, status: JobStatus, finished_before: float, limit: int) -> int:
        args = (status.value, float(finished_before), limit)
        return await self._change(self._q["prune_jobs"], args, UNSYNCED)

    async def count_prunable_jobs(self, status: JobStatus, finished_before: float) -> int:
        row = await self._first("count_prunable_jobs", status.value, float(finished_before))
        return 0 if row is None else int(row[0])

    async def prune_batches(self, finished_before: float, limit: int) -> int:
        args = (float(finished_before), limit)
        return await self._change(self._q["prune_batches"], args, UNSYNCED)

    async def count_prunable_batches(self, finished_before: float) -> int:
        row = await self._first("count_prunable_batches", float(finished_before))
        return 0 if row is None else int(row[0])

    async def prunable_files(self, now: float, unused_before: float, limit: int) -> list[str]:
        found = await self._read(
            self._q["prunable_files"], (float(now), float(unused_before), limit)
        )
        return [r[0] for r in found]

    async def prune_file(self, file_id: str, now: float, unused_before: float) -> bool:
        steps = [
            (self._q["prune_file"], (file_id, float(now), float(unused_before))),
            (self._q["prune_file_parts"], (file_id,)),
        ]
        deleted, _ = await self._transaction(steps, UNSYNCED)
        return bool(deleted)

    async def owner_file_bytes(self, owner: str) -> int:
        row = await self._first("owner_file_bytes", owner)
        return 0 if row is None else int(row[0])

    # -- assistant templates ----------------------------------------------------

    async def put_template(self, template: Template) -> Template:
        values = rows.template_values(template)
        [row] = await self._returning(self._q["put_template"], values, IDEMPOTENT)
        return rows.template(row)

    async def get_template(self, owner: str, name: str) -> Template | None:
        row = await self._first("get_template", owner, name)
        return None if row is None else rows.template(row)

    async def list_templates(self, owner: str | None) -> list[Template]:
        return await self._listing("list_templates", rows.template, owner=owner)

    async def delete_template(self, owner: str, name: str) -> bool:
        return await self._change(self._q["delete_template"], (owner, name)) > 0

    # -- rate limits --------------------------------------------------------------

    # -- response cache -----------------------------------------------------------

    async def cache_lookup(self, keys: Sequence[str], fresh_after: float) -> dict[str, JSON]:
        if not keys:
            return {}
        found = await self._read(self._q["cache_lookup"], (self._array(keys), fresh_after))
        return {r[0]: orjson.loads(r[1]) for r in found}

    async def cache_used(self, hits: Mapping[str, int], now: float) -> None:
        if hits:
            keys, counts = list(hits), [int(n) for n in hits.values()]
            args = (self._array(keys), self._array(counts), now)
            await self._change(self._q["cache_used"], args, UNSYNCED)

    async def cache_trim(self, stale_before: float, max_bytes: int) -> int:
        gone = 0
        while changed := await self._change(
            self._q["cache_expire"], (stale_before, TRIM_ROWS), UNSYNCED
        ):
            gone += changed
        total = (await self.cache_summary()).bytes
        while total > max_bytes:
            oldest = await self._read(self._q["cache_oldest_used"], (TRIM_ROWS,))
            victims: list[str] = []
            for key, size in oldest:
                if total <= max_bytes:
                    break
                victims.append(key)
                total -= int(size)
            if not victims:
                break
            gone += await self._change(self._q["cache_delete"], (self._array(victims),), UNSYNCED)
        return gone

    async def cache_summary(self) -> CacheSummary:
        row = await self._first("cache_summary")
        return CacheSummary(0, 0, 0) if row is None else CacheSummary(*map(int, row))

    async def cache_clear(self, model: str | None = None) -> int:
        return await self._change(self._q["cache_clear"], (model,))

    async def hit_counters(self, windows: Mapping[str, float]) -> dict[str, tuple[int, float]]:
        if not windows:
            return {}
        names = sorted(windows)  # one lock order for every server
        args = (self._array(names), self._array([float(windows[n]) for n in names]))
        found = await self._returning(self._q["hit_counters"], args, COUNT)
        return {str(name): (int(hits), float(start)) for name, hits, start in found}

    async def add_counters(
        self, amounts: Mapping[str, tuple[float, int]]
    ) -> dict[str, tuple[int, float]]:
        if not amounts:
            return {}
        names = sorted(amounts)  # one lock order for every server
        args = (
            self._array(names),
            self._array([float(amounts[n][0]) for n in names]),
            self._array([int(amounts[n][1]) for n in names]),
        )
        found = await self._returning(self._q["add_counters"], args, COUNT)
        return {str(name): (int(total), float(start)) for name, total, start in found}


def _json_or_none(value: JSON | None) -> str | None:
    return None if value is None else rows.json_text(value)
