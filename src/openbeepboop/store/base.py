"""The store contract: the verbs every storage backend implements.

Each verb is one transaction. Time is passed in (`now`, epoch seconds) so that the
rules are deterministic under test. The same contract suite (tests/store_contract.py)
runs against every implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from openbeepboop.models import (
    ApiKey,
    HeartbeatOutcome,
    Job,
    JobFilter,
    NewJob,
    Node,
    NodeResult,
    ReapOutcome,
    ResultOutcome,
    SubmitOutcome,
)


class Store(Protocol):
    """Durable state of the queue."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Finish pending writes and disconnect."""

    # -- jobs -----------------------------------------------------------------

    async def submit_jobs(self, jobs: Sequence[NewJob], now: float) -> list[SubmitOutcome]:
        """Insert jobs as `queued`, all or none. A job whose (owner, idempotency_key) exists
        returns the existing job (`created=False`); the caller compares request hashes."""

    async def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None."""

    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs with these ids that exist, in no particular order."""

    async def list_jobs(self, flt: JobFilter) -> list[Job]:
        """Jobs matching `flt`, newest first, at most `flt.limit`, older than `after_seq`."""

    async def queue_position(self, job: Job) -> int:
        """How many queued jobs of the same model run before this queued job."""

    async def fetch_jobs(
        self, node_id: str, models: Sequence[str], max_jobs: int, lease_seconds: float, now: float
    ) -> list[Job]:
        """Claim up to `max_jobs` queued jobs of `models` (priority, then age) in one atomic
        step: each gets a fresh lease, `attempts` + 1, status `in_progress`."""

    async def heartbeat(
        self, node_id: str, lease_ids: Sequence[str], lease_seconds: float, now: float
    ) -> HeartbeatOutcome:
        """Extend the node's live leases; report lost leases and cancelled jobs."""

    async def submit_results(
        self, results: Sequence[NodeResult], now: float
    ) -> list[ResultOutcome]:
        """Record each result only if its lease is the job's current one (fencing); each is
        judged on its own."""

    async def cancel_job(self, job_id: str, now: float) -> Job | None:
        """Move a non-final job to `cancelled` (a final job is returned unchanged)."""

    async def reap(self, now: float) -> ReapOutcome:
        """Re-queue expired leases (or fail them when attempts are used up) and expire
        queued jobs past `expires_at`."""

    async def count_active(self, owner: str) -> int:
        """Queued plus in-progress jobs of one owner."""

    async def stats(self) -> dict[str, dict[str, int]]:
        """Job counts per model per status."""

    # -- nodes ----------------------------------------------------------------

    async def register_node(self, node: Node) -> None:
        """Insert or replace a node."""

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
