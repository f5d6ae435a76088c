"""What a verb's rows mean, the same for every store: the outcome of a heartbeat, of a
reaper pass, of a refused result, of an idempotent replay."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from openbeepboop.server.errors import IdempotencyMismatch
from openbeepboop.server.models import (
    HeartbeatOutcome,
    Job,
    JobStatus,
    NewJob,
    ReapOutcome,
    ResultOutcome,
)
from openbeepboop.server.store.rows import Row


def replayed(existing: Job, submitted: NewJob) -> Job:
    """The job an idempotent replay returns; IdempotencyMismatch when the key was used
    for another request."""
    if existing.request_hash != submitted.request_hash:
        raise IdempotencyMismatch(
            f"Idempotency-Key {submitted.idempotency_key!r} was already used for job "
            f"{existing.id} with a different request body",
            param="idempotency_key",
        )
    return existing


def heartbeat(
    leases: Sequence[str], live: set[str], cancelled: dict[str, str], expires: float
) -> HeartbeatOutcome:
    """`leases` as the node sent them: `live` ones were extended to `expires`, the rest
    are lost; `cancelled` maps a lease to its job, cancelled meanwhile."""
    return HeartbeatOutcome(
        extended=[lease for lease in leases if lease in live],
        lost=[lease for lease in leases if lease not in live],
        cancelled=[cancelled[lease] for lease in leases if lease in cancelled],
        lease_expires_at=expires,
    )


def refusal(job_id: str, status: str | None) -> ResultOutcome:
    """Why a result was refused, given the job's status (None: no such job)."""
    if status is None:
        reason = "not_found"
    elif status == JobStatus.CANCELLED.value:
        reason = "cancelled"
    else:
        reason = "lease_lost"
    return ResultOutcome(job_id, accepted=False, reason=reason)


def reaped(leases: Iterable[Row], expired: Iterable[str]) -> ReapOutcome:
    """A reaper pass: (job id, new status) of each expired lease, and the queued jobs
    that expired."""
    outcome = ReapOutcome()
    lists = {"queued": outcome.requeued, "failed": outcome.failed, "expired": outcome.expired}
    for job_id, status in leases:
        lists[status].append(job_id)
    outcome.expired.extend(expired)
    return outcome
