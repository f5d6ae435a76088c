"""The store contract: the verbs every storage backend implements.

Each verb is one transaction. Time is passed in (`now`, epoch seconds) so that the
rules are deterministic under test. The same contract suite (tests/test_store_contract.py)
runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

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
    NewJob,
    Node,
    NodeResult,
    Piece,
    ReapOutcome,
    RecentRuns,
    ResultOutcome,
    Share,
    StoredFile,
    SubmitOutcome,
    SwarmRevocation,
    Template,
    WebSession,
)


class Store(Protocol):
    """Durable state of the queue."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Finish pending writes and disconnect."""

    # -- jobs -----------------------------------------------------------------

    async def submit_jobs(
        self, jobs: Sequence[NewJob], now: float, durable: bool = True, positions: bool = False
    ) -> list[SubmitOutcome]:
        """Insert jobs as `queued`, all or none. A job whose (owner, idempotency_key) exists
        returns the existing job (`created=False`); the caller compares request hashes.
        `positions`: each created job's outcome also says its `queue_position` then.
        `durable=False`: nobody is told of these jobs yet (a synchronous call answers only
        with the result), so the commit need not wait for the disk; a later durable
        commit makes them durable too."""

    async def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None."""

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs with these ids that exist, in no particular order."""

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        """Jobs matching `flt`, newest first, at most `flt.limit`, older than `after_seq`."""

    async def queue_position(self, job: Job, fair: bool = True) -> int:
        """How many queued jobs of the same model run before this queued job: with
        `fair`, as the fair claim would take them (store/fair.py: a higher priority, then
        the shares' turns), else by priority, then age."""

    async def queue_heads(self, models: Sequence[str], now: float) -> dict[str, float]:
        """For each of `models`, when the job its queue serves next (priority, then age;
        pinned to no node, not expired by `now`) was queued; a model with none is left
        out. One index seek per model, however long the queue."""

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
        """Claim up to `max_jobs` queued jobs of `models` in one atomic step: highest
        priority first; within a priority, with `fair`, the shares (a key's group, or
        the key) in weighted turn (store/fair.py), else the oldest first. Each job gets
        a fresh lease, `attempts` + 1, status `in_progress`. A pinned job is claimed
        only by its node: `pin_node` equal to `node_id` or `node_name`, every
        label of `pin_labels` among `node_labels`; others skip it. Claims (and
        heartbeats) need not wait for the disk: a lease lost to a power cut only means
        the job runs again, as when a node dies."""

    async def heartbeat(
        self, node_id: str, lease_ids: Sequence[str], lease_seconds: float, now: float
    ) -> HeartbeatOutcome:
        """Extend the node's live leases; report lost leases and cancelled jobs."""

    async def submit_results(
        self, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        """Record each result only if its lease is the job's current one (fencing); each is
        judged on its own."""

    async def delete_job(self, job_id: str) -> bool:
        """Delete one final job (a stored response its owner deletes), and the answer the
        response cache keeps from it, in one transaction; False when there is no such
        job or it is not final."""

    async def cancel_job(self, job_id: str, now: float) -> Job | None:
        """Move a non-final job to `cancelled` (a final job is returned unchanged)."""

    async def release_lease(self, job_id: str, lease_id: str) -> Job | None:
        """Queue the job again, its attempt not counted, if `lease_id` is still its lease
        (a claim the node never received); None when it is not (fencing)."""

    async def move_job(
        self, job_id: str, lease_id: str | None, model: str, request: JSON, error: JSON | None
    ) -> Job | None:
        """Move a job to another model with `request` (an alias's next member,
        core/aliases.py): queued again, its attempts at 0, no cache key. From
        `in_progress` under `lease_id` (fencing; `error`, the failure that moves it, is
        kept), or, with `lease_id` None, from `queued`; None when the job is not so."""

    async def reap(self, now: float) -> ReapOutcome:
        """Re-queue expired leases (or fail them when attempts are used up) and expire
        queued jobs past `expires_at`."""

    async def watch_leases(self, now: float) -> None:
        """Record that a server watches the leases at `now` (each reaper pass); the
        latest time any server recorded is kept."""

    async def resume_leases(self, now: float, grace: float, down_after: float) -> LeaseResume:
        """At a server's start: if no server watched the leases for `down_after` seconds
        (the deployment was down), leases still live when they were last watched expire
        no sooner than `now + grace`. Records `now` as watched either way."""

    async def count_active(self, owner: str) -> int:
        """Queued plus in-progress jobs of one owner."""

    async def stats(self) -> dict[str, dict[str, int]]:
        """Job counts per model per status (counters kept as jobs change: a read of a few
        rows however many jobs are stored); a status without jobs is left out."""

    async def finished_counts(
        self, since: float, until: float, step: float
    ) -> list[tuple[int, str, str, int]]:
        """Jobs that completed or failed with `finished_at` in [since, until), counted per
        (step index, model, status): the step index is `(finished_at - since) // step`.
        Reads only the jobs of that window (an index on status and finished_at)."""

    async def recent_runs(self, since: float) -> list[RecentRuns]:
        """Per model, the jobs nodes ran that completed or failed at or after `since`,
        not answered by the response cache (core/eta.py: a model's measured pace).
        Reads only the jobs of that window (the index of `finished_counts`)."""

    # -- nodes ----------------------------------------------------------------

    async def register_node(self, node: Node, stale_before: float | None = None) -> None:
        """Insert or replace a node; with `stale_before`, first forget the nodes of the
        same owner and name last seen before it (earlier runs of this node)."""

    async def forget_nodes(self, seen_before: float) -> int:
        """Forget the nodes last seen before `seen_before`; how many went."""

    async def touch_node(self, node_id: str, now: float, stats: dict[str, object] | None) -> bool:
        """Record contact (and stats) from a node; False when unknown."""

    async def get_node(self, node_id: str) -> Node | None:
        """The node with this id, or None."""

    async def list_nodes(self, seen_since: float) -> list[Node]:
        """Nodes heard from at or after `seen_since`."""

    # -- keys -----------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        """Store a key record."""

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash (revoked or not), or None."""

    async def list_keys(self) -> list[ApiKey]:
        """All keys, oldest first."""

    async def revoke_key(self, key_id: str, now: float) -> ApiKey | None:
        """Mark a key revoked; None when unknown."""

    async def set_key_group(self, key_id: str, group: str | None) -> ApiKey | None:
        """Put a key in a share group (None: its own share); the key, None when unknown."""

    # -- shares (fair share: weights and quotas an admin set) ---------------------------

    async def put_share(self, share: Share) -> None:
        """Set a share's weight and quotas (made, or replaced whole)."""

    async def list_shares(self) -> list[Share]:
        """Every share an admin set, by name."""

    async def delete_share(self, name: str) -> bool:
        """Forget what was set for a share (weight 1, no quota again); False when unset."""

    # -- swarm revocations (keys revoked anywhere in a swarm) ------------------------

    async def add_revocations(self, items: Sequence[SwarmRevocation]) -> int:
        """Record the revocations not yet known (by key id; a known one keeps its first
        record), and revoke every key kept here that the recorded ones name, in one
        transaction; how many were new."""

    async def list_revocations(self) -> list[SwarmRevocation]:
        """Every recorded revocation, by key id."""

    async def get_revocation(self, key_id: str) -> SwarmRevocation | None:
        """The revocation of this key id, or None."""

    # -- web sessions (the web interface's logins) ----------------------------------

    async def create_session(self, session: WebSession) -> None:
        """Keep a new session."""

    async def get_session(self, id_hash: str, now: float) -> WebSession | None:
        """The session whose cookie hashes to `id_hash`, unless it expired by `now`."""

    async def delete_session(self, id_hash: str) -> bool:
        """Forget a session (logout); False if there was none."""

    async def prune_sessions(self, now: float) -> int:
        """Delete the sessions expired by `now`; how many."""

    # -- files ----------------------------------------------------------------

    async def put_file_part(self, file_id: str, index: int, data: bytes) -> None:
        """Store part `index` (0, 1, ...) of a file's bytes, replacing one already there.
        Parts are written before the file's record, so a half-written file is invisible."""

    async def create_file(self, file: StoredFile) -> StoredFile:
        """Store a file's record (its parts are in place); returns it with `seq` set."""

    async def get_file(self, file_id: str) -> StoredFile | None:
        """The file with this id, or None."""

    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, before_seq: int | None
    ) -> list[StoredFile]:
        """Files (of `owner`, of `purpose`, when given), newest first, seq < before_seq."""

    async def read_file_part(self, file_id: str, index: int) -> bytes | None:
        """Part `index` of a file's bytes, or None past the last part."""

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file's record and parts (also parts without a record); False when
        there was no record."""

    # -- batches --------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> Batch:
        """Store a new batch; returns it with `seq` set."""

    async def get_batch(self, batch_id: str) -> Batch | None:
        """The batch with this id, or None."""

    async def list_batches(
        self, owner: str | None, limit: int, before_seq: int | None
    ) -> list[Batch]:
        """Batches (of `owner`, when given), newest first, seq < before_seq."""

    async def open_batches(self) -> list[Batch]:
        """Batches not in a final status, oldest first."""

    async def save_batch(self, batch: Batch) -> Batch | None:
        """Write every field of `batch` if the stored version is still `batch.version`;
        returns the saved batch (version + 1), or None when someone saved it first."""

    async def batch_counts(self, batch_id: str) -> dict[str, int]:
        """How many of the batch's jobs are in each status."""

    async def batch_jobs(self, batch_id: str, after_seq: int, limit: int) -> list[Job]:
        """The batch's jobs in submission order, seq > after_seq, at most `limit`."""

    async def cancel_batch_jobs(self, batch_id: str, now: float) -> list[str]:
        """Cancel the batch's queued jobs (running ones finish); returns their ids."""

    # -- retention --------------------------------------------------------------

    async def prune_jobs(self, status: JobStatus, finished_before: float, limit: int) -> int:
        """Delete up to `limit` jobs of the final `status` that finished before
        `finished_before`, oldest first; never a job of a batch that is not final. Returns
        how many went."""

    async def count_prunable_jobs(self, status: JobStatus, finished_before: float) -> int:
        """How many jobs `prune_jobs` would delete, without a limit."""

    async def prune_batches(self, finished_before: float, limit: int) -> int:
        """Delete up to `limit` final batches that finished before `finished_before`
        (their files are left to `prune_file`); returns how many went."""

    async def count_prunable_batches(self, finished_before: float) -> int:
        """How many batches `prune_batches` would delete, without a limit."""

    async def prunable_files(self, now: float, unused_before: float, limit: int) -> list[str]:
        """Ids of up to `limit` files that may go at `now`: expired ones, and batch files
        without an expiry that no batch uses, made before `unused_before`. Never a file of
        a batch that is not final."""

    async def prune_file(self, file_id: str, now: float, unused_before: float) -> bool:
        """Delete one file's record and parts if it still may go (as `prunable_files`);
        False when it stays."""

    async def owner_file_bytes(self, owner: str) -> int:
        """The size of every file `owner` has, in bytes."""

    async def reclaim_space(self, max_pages: int) -> int:
        """Give space freed by deletes back to the file system, a little at a time: up
        to `max_pages` pages; returns how many (0 where the database reuses it itself)."""

    # -- assistant templates ----------------------------------------------------

    async def put_template(self, template: Template) -> Template:
        """Create or replace the owner's template of that name (created_at is kept on
        replace); returns it as stored."""

    async def get_template(self, owner: str, name: str) -> Template | None:
        """The owner's template of that name, or None."""

    async def list_templates(self, owner: str | None) -> list[Template]:
        """Templates (of `owner`, when given), by name."""

    async def delete_template(self, owner: str, name: str) -> bool:
        """Delete one template; False when there was none."""

    # -- response cache (core/cache.py) --------------------------------------------
    # A job submitted with a `cache_key` has its result kept under that key when it
    # completes (in that transaction, by the schema); a job submitted with a
    # `cached_result` is stored completed and `cached`.

    async def cache_lookup(self, keys: Sequence[str], fresh_after: float) -> dict[str, JSON]:
        """The answers kept under `keys`, made at or after `fresh_after`, by key."""

    async def cache_used(self, hits: Mapping[str, int], now: float) -> None:
        """Add hits counted since the last call to their answers, last used at `now`."""

    async def cache_trim(self, stale_before: float, max_bytes: int) -> int:
        """Delete the answers made before `stale_before`, then the least recently used
        ones until the rest hold at most `max_bytes`; how many went."""

    async def cache_summary(self) -> CacheSummary:
        """How many answers, their bytes, and their hits counted so far."""

    async def cache_clear(self, model: str | None = None) -> int:
        """Delete every answer (of `model`, when given); how many went."""

    # -- rate limits ------------------------------------------------------------

    async def hit_counters(self, windows: Mapping[str, float]) -> dict[str, tuple[int, float]]:
        """Count one hit of each fixed-window counter named in `windows`, in the window
        that starts at the time given for it, in one transaction: for each counter, the
        hits of its current window (this one included) and that window's start. A later
        window starts the count over; a hit stamped with an earlier window (another
        server's clock) counts in the current one."""

    # -- quotas (core/quotas.py) ------------------------------------------------

    async def add_counters(
        self, amounts: Mapping[str, tuple[float, int]]
    ) -> dict[str, tuple[int, float]]:
        """Add to each fixed-window counter named in `amounts` its amount (negative: take
        back; 0: only read), in the window that starts at the time given with it, in one
        transaction: for each counter, its total in its current window (never below 0)
        and that window's start. A later window starts the total over at the amount; an
        amount stamped with an earlier window than the counter's is dropped (that window
        is over: a refund must not leak into the next one)."""


class DatabaseUnreachable(Exception):
    """The database cannot be reached or refused us; the message (one line, no
    password) says which and why."""


class TopicRelay(Protocol):
    """What a shared store bridges wake-ups through (the server's `Notifier`)."""

    def forward_to(self, forward: Callable[[list[str]], None] | None) -> None:
        """Hand every topic published here to `forward` too (None: stop)."""

    def deliver(self, topics: Iterable[str]) -> None:
        """Wake this process's waiters of `topics` (published on another server)."""

    def topics(self) -> list[str]:
        """The topics someone in this process waits on."""


class DeltaRelay(Protocol):
    """What a shared store bridges token deltas through (the server's `DeltaHub`)."""

    def forward_to(self, forward: Callable[[str, int | None, Piece], None] | None) -> None:
        """Hand every piece accepted here (index None: a finish) to `forward` too."""

    def deliver(self, job_id: str, index: int | None, text: Piece) -> bool:
        """Keep a piece (or, with index None, the finish) another server accepted."""


@runtime_checkable
class SharedStore(Protocol):
    """A store that several servers share (PostgreSQL). Besides `Store`, it carries
    wake-ups and token deltas between those servers."""

    async def bridge(self, notifier: TopicRelay, deltas: DeltaRelay) -> None:
        """From now until `close`: hand other servers what `notifier` publishes and
        `deltas` accepts here, and deliver theirs here."""
