"""Domain nouns of the queue: jobs, their statuses, leases, nodes and keys.

Plain dataclasses: the store returns them, the service reasons about them, and the
HTTP layer serialises them. Nothing here knows about HTTP or SQL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


class JobStatus(enum.StrEnum):
    """Where a job is in its life. The words are OpenAI's (background mode, batches)."""

    QUEUED = "queued"  # waiting for a node to fetch it
    IN_PROGRESS = "in_progress"  # leased to a node that is running it
    COMPLETED = "completed"  # a result was recorded (final)
    FAILED = "failed"  # a permanent error or attempts exhausted; error kept (final)
    CANCELLED = "cancelled"  # cancelled by its owner (final)
    EXPIRED = "expired"  # expires_at passed before it could finish (final)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)


class Role(enum.StrEnum):
    """What an API key may do."""

    ADMIN = "admin"  # everything, including other owners' jobs
    CLIENT = "client"  # submit, read and cancel its own jobs
    NODE = "node"  # the node protocol only


ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as submitted, before the store gives it an id."""

    owner: str
    endpoint: str
    model: str
    request: JSON
    request_hash: str
    priority: int = 0
    max_attempts: int = 3
    metadata: JSON | None = None
    custom_id: str | None = None
    idempotency_key: str | None = None
    expires_at: float | None = None


@dataclass(slots=True)
class Job:
    """A job as stored."""

    id: str
    seq: int
    owner: str
    endpoint: str
    model: str
    request: JSON
    status: JobStatus
    priority: int
    max_attempts: int
    attempts: int
    created_at: float
    metadata: JSON | None = None
    custom_id: str | None = None
    request_hash: str = ""
    idempotency_key: str | None = None
    expires_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lease_id: str | None = None
    lease_expires_at: float | None = None
    node_id: str | None = None
    result: JSON | None = None
    error: JSON | None = None


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """The job a submit produced, and whether it was an idempotent replay."""

    job: Job
    created: bool


@dataclass(frozen=True, slots=True)
class NodeResult:
    """What a node reports for one leased job: a result or an error."""

    job_id: str
    lease_id: str
    result: JSON | None = None
    error: JSON | None = None
    retryable: bool = False
    released: bool = False  # handed back unfinished (drain): does not use up an attempt


@dataclass(frozen=True, slots=True)
class ResultOutcome:
    """Whether the store accepted one reported result, and the job it changed."""

    job_id: str
    accepted: bool
    reason: str | None = None
    job: Job | None = None


@dataclass(frozen=True, slots=True)
class HeartbeatOutcome:
    """Which leases a heartbeat extended, which are gone, which jobs were cancelled."""

    extended: list[str]
    lost: list[str]
    cancelled: list[str]
    lease_expires_at: float


@dataclass(frozen=True, slots=True)
class ReapOutcome:
    """What one pass of the reaper changed."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.requeued) + len(self.failed) + len(self.expired)


@dataclass(slots=True)
class Node:
    """A machine that pulls jobs."""

    id: str
    name: str
    owner: str
    models: list[JSON]
    capacity: int
    hardware: JSON
    version: str
    registered_at: float
    last_seen: float
    stats: JSON = field(default_factory=dict)

    def model_names(self) -> list[str]:
        return [str(m["name"]) for m in self.models if "name" in m]


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key: only its hash is kept."""

    id: str
    role: Role
    key_hash: str
    prefix: str
    name: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a listing returns."""

    owner: str | None = None
    status: JobStatus | None = None
    model: str | None = None
    limit: int = 20
    after_seq: int | None = None
