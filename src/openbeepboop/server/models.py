"""Domain nouns of the queue: jobs, their statuses, leases, nodes and keys.

Plain dataclasses: the store returns them, the service reasons about them, and the
HTTP layer serialises them. Nothing here knows about HTTP or SQL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]
# A piece of a running job's stream: text of choice 0, OpenAI chunk choices for the rest
# (server/core/choices.py), or {"progress": {...}} of a model the job waits for
Piece = str | list[JSON] | JSON


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


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# What a batch's lines may target: the job endpoints, and the Responses API (whose lines
# run as chat-completion jobs, core/responses.py)
BATCH_ENDPOINTS = (*ENDPOINTS, "/v1/responses")


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
    batch_id: str | None = None
    pin_node: str | None = None  # only a node of this name or id may run it
    pin_labels: dict[str, str] | None = None  # only a node carrying all these labels
    cache_key: str | None = None  # its answer is kept in the response cache (core/cache.py)
    cached_result: JSON | None = None  # answered from the cache: stored completed

    def queued(self, job_id: str, seq: int, now: float) -> Job:
        """The job as the store has just inserted it (completed, when `cached_result`)."""
        done = self.cached_result is not None
        return Job(
            id=job_id,
            seq=int(seq),
            owner=self.owner,
            endpoint=self.endpoint,
            model=self.model,
            request=self.request,
            status=JobStatus.COMPLETED if done else JobStatus.QUEUED,
            priority=self.priority,
            max_attempts=self.max_attempts,
            attempts=0,
            created_at=now,
            started_at=now if done else None,
            finished_at=now if done else None,
            result=self.cached_result,
            cache_key=self.cache_key,
            cached=done,
            metadata=self.metadata,
            custom_id=self.custom_id,
            request_hash=self.request_hash,
            idempotency_key=self.idempotency_key,
            expires_at=self.expires_at,
            batch_id=self.batch_id,
            pin_node=self.pin_node,
            pin_labels=self.pin_labels,
        )


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
    batch_id: str | None = None
    pin_node: str | None = None  # as submitted (NewJob)
    pin_labels: dict[str, str] | None = None
    cache_key: str | None = None  # as submitted (NewJob)
    cached: bool = False  # answered from the response cache, no node ran it


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """The job a submit produced, whether it was an idempotent replay, and (when asked
    for) how many queued jobs of its model run before it."""

    job: Job
    created: bool
    position: int | None = None


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


@dataclass(frozen=True, slots=True)
class LeaseResume:
    """What a server starting after an outage did to the leases (Store.resume_leases):
    `watched_at`, when servers last watched them (None: never recorded); `extended`, the
    jobs whose leases now run to the grace's end. `down` is False when another server
    was watching them all along (nothing was extended)."""

    down: bool
    watched_at: float | None = None
    extended: list[str] = field(default_factory=list)


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
    labels: dict[str, str] = field(default_factory=dict)  # from its config, e.g. gpu=a100

    def model_names(self) -> list[str]:
        return [str(m["name"]) for m in self.models if "name" in m]

    def may_run(self, pin_node: str | None, pin_labels: dict[str, str] | None) -> bool:
        """Whether a job pinned so may run here: `pin_node` is this node's name or id,
        and this node carries every label of `pin_labels` (None: no such pin)."""
        if pin_node is not None and pin_node not in (self.id, self.name):
            return False
        return all(self.labels.get(k) == v for k, v in (pin_labels or {}).items())


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
    group: str | None = None  # the share its jobs count in (fair share); None: the key's own

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def share(self) -> str:
        """The share its jobs are scheduled and counted in: its group, or itself."""
        return self.group or self.id


@dataclass(frozen=True, slots=True)
class Share:
    """What an admin set for a share (a group's name or a key's id): its weight in the
    fair-share turn, and optional quotas per hour (None: no quota)."""

    name: str
    weight: float = 1.0
    jobs_per_hour: int | None = None
    tokens_per_hour: int | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class CacheSummary:
    """What the response cache holds: entries, their bytes, and the hits counted into
    the store so far (each server adds its own at each reaper pass)."""

    entries: int
    bytes: int
    hits: int


@dataclass(frozen=True, slots=True)
class SwarmRevocation:
    """A swarm key revoked on some member (`origin`, its server id): every member learns
    it, and the key stops working there too (core/swarm_keys.py)."""

    key_id: str
    revoked_at: float
    origin: str


@dataclass(frozen=True, slots=True)
class WebSession:
    """A browser's login (the web interface): only the hash of its cookie is kept, with
    the hash of the key it logged in with and the token its forms must carry (CSRF)."""

    id_hash: str
    key_hash: str
    csrf: str
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a listing returns."""

    owner: str | None = None
    status: JobStatus | None = None
    model: str | None = None
    limit: int = 20
    after_seq: int | None = None  # older than this job (seq), newest first
    batch_id: str | None = None
    created_after: float | None = None  # created at or after (epoch seconds)
    created_before: float | None = None  # created strictly before


@dataclass(frozen=True, slots=True)
class StoredFile:
    """An uploaded (or generated) file: the record; its bytes are stored in parts."""

    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: float
    lines: int = 0
    seq: int = 0  # set by the store; orders listings
    expires_at: float | None = None  # pruned after this (None: kept until deleted)


class BatchStatus(enum.StrEnum):
    """OpenAI's batch statuses."""

    VALIDATING = "validating"  # accepted; its lines are being queued as jobs
    FAILED = "failed"  # the input could not be run (final)
    IN_PROGRESS = "in_progress"  # every line is a job; waiting for them
    FINALIZING = "finalizing"  # every job is final; output files are being written
    COMPLETED = "completed"  # (final)
    EXPIRED = "expired"  # the completion window ended first (final)
    CANCELLING = "cancelling"  # cancel asked; running jobs finish
    CANCELLED = "cancelled"  # (final)

    @property
    def is_final(self) -> bool:
        return self in (
            BatchStatus.FAILED,
            BatchStatus.COMPLETED,
            BatchStatus.EXPIRED,
            BatchStatus.CANCELLED,
        )


@dataclass(slots=True)
class Batch:
    """A batch as stored. `version` increases on every save (optimistic concurrency);
    `lease_until` keeps two servers from driving the same batch at once."""

    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: float
    expires_at: float
    metadata: JSON | None = None
    errors: list[JSON] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: JSON | None = None  # {total, completed, failed} once final
    usage: JSON | None = None
    lines_queued: int = 0  # progress of `validating`: input lines already jobs
    # the moments of each status, epoch seconds
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    lease_until: float = 0.0
    version: int = 0
    seq: int = 0  # set by the store; orders listings


@dataclass(frozen=True, slots=True)
class Template:
    """A named assistant template: one or more streams (provider, settings, messages)
    tried in order; messages may hold `{"insert": "history"}` and `{query}`."""

    owner: str
    name: str
    streams: list[JSON]
    created_at: float
    updated_at: float
    description: str = ""


@dataclass(frozen=True, slots=True)
class RecentRuns:
    """The jobs of one model that nodes ran to the end (completed or failed, not answered
    by the response cache) in a recent window: how many, their time in progress summed,
    the earliest start and the latest finish among them (core/eta.py measures a model's
    pace from it)."""

    model: str
    count: int
    busy_seconds: float
    first_started: float
    last_finished: float
