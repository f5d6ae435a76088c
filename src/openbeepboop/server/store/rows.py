"""Rows as domain objects, for every store: the column lists the queries select, the
mapping of a row (a tuple in that order) to a model, and JSON as stored.

Both schemas have the same tables and columns (migrations of the same number make the
same change), so one mapping serves SQLite and PostgreSQL. JSON is stored as text:
exactly what was written comes back.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, Protocol

import orjson

from openbeepboop.server.errors import InvalidRequest
from openbeepboop.server.models import (
    ApiKey,
    Batch,
    BatchStatus,
    Job,
    JobStatus,
    NewJob,
    Node,
    Role,
    Share,
    StoredFile,
    SwarmRevocation,
    Template,
    WebSession,
)

JOB_COLUMNS = (
    "seq, id, owner, endpoint, model, request, request_hash, status, priority, max_attempts, "
    "attempts, metadata, custom_id, idempotency_key, created_at, expires_at, started_at, "
    "finished_at, lease_id, lease_expires_at, node_id, result, error, batch_id, pin_node, "
    "pin_labels, cache_key, cached"
)
NODE_COLUMNS = (
    "id, name, owner, models, capacity, hardware, version, registered_at, last_seen, stats, labels"
)
KEY_COLUMNS = "id, role, key_hash, prefix, name, created_at, revoked_at, share_group"
SHARE_COLUMNS = "name, weight, jobs_per_hour, tokens_per_hour, updated_at"
SESSION_COLUMNS = "id_hash, key_hash, csrf, created_at, expires_at"
FILE_COLUMNS = "id, owner, purpose, filename, bytes, created_at, lines, seq, expires_at"
TEMPLATE_COLUMNS = "owner, name, description, streams, created_at, updated_at"
BATCH_FIELDS = tuple(field.name for field in fields(Batch) if field.name != "seq")
BATCH_COLUMNS = ", ".join([*BATCH_FIELDS, "seq"])
_BATCH_JSON = frozenset({"metadata", "errors", "request_counts", "usage"})
_BATCH_TIMES = frozenset(name for name in BATCH_FIELDS if name.endswith("_at")) | {"lease_until"}

# What a query file may name in braces, replaced by the column list (store/queries.py).
COLUMN_LISTS = {
    "job_columns": JOB_COLUMNS,
    "jobs_qualified": ", ".join(f"jobs.{c}" for c in JOB_COLUMNS.split(", ")),
    "node_columns": NODE_COLUMNS,
    "key_columns": KEY_COLUMNS,
    "share_columns": SHARE_COLUMNS,
    "session_columns": SESSION_COLUMNS,
    "file_columns": FILE_COLUMNS,
    "template_columns": TEMPLATE_COLUMNS,
    "batch_columns": BATCH_COLUMNS,
    "batch_fields": ", ".join(BATCH_FIELDS),
}


class Row(Protocol):
    """A row as a driver returns it (a tuple, an asyncpg Record): its columns in the
    order the query selected them."""

    def __getitem__(self, index: int, /) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


def new_job_id() -> str:
    """A job id: `job_` and 96 random bits."""
    return "job_" + secrets.token_hex(12)


def json_text(value: Any) -> str:
    """JSON text for the store; InvalidRequest for what it cannot hold (integers beyond
    64 bits, nesting too deep), so that a user's odd value is a 400, not a 500."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(f"a value cannot be stored: {exc}") from exc


def json_or_null(value: Any) -> str | None:
    """`json_text`, with None kept as NULL."""
    return None if value is None else json_text(value)


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def job(row: Row) -> Job:
    """A `jobs` row selected as JOB_COLUMNS."""
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
        pin_node=row[24],
        pin_labels=_loads(row[25]),
        cache_key=row[26],
        cached=bool(row[27]),
    )


def new_job_values(nj: NewJob) -> tuple[Any, ...]:
    """A new job's values for `insert_job`, after its id and before `now`."""
    return (
        nj.owner,
        nj.endpoint,
        nj.model,
        json_text(nj.request),
        nj.request_hash,
        nj.priority,
        nj.max_attempts,
        json_or_null(nj.metadata),
        nj.custom_id,
        nj.idempotency_key,
        nj.expires_at,
        nj.batch_id,
        nj.pin_node,
        json_or_null(nj.pin_labels),
        nj.cache_key,
        json_or_null(nj.cached_result),
    )


def queue_of(row: Row) -> tuple[str, int]:
    """The (model, priority) of a `jobs` row selected as JOB_COLUMNS: the queue it is in."""
    return row[4], row[8]


def node(row: Row) -> Node:
    """A `nodes` row selected as NODE_COLUMNS."""
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
        labels=orjson.loads(row[10]),
    )


def node_values(n: Node) -> tuple[Any, ...]:
    """A node as NODE_COLUMNS values."""
    return (
        n.id,
        n.name,
        n.owner,
        json_text(n.models),
        n.capacity,
        json_text(n.hardware),
        n.version,
        float(n.registered_at),
        float(n.last_seen),
        json_text(n.stats),
        json_text(n.labels),
    )


def api_key(row: Row) -> ApiKey:
    """An `api_keys` row selected as KEY_COLUMNS."""
    return ApiKey(
        id=row[0],
        role=Role(row[1]),
        key_hash=row[2],
        prefix=row[3],
        name=row[4],
        created_at=row[5],
        revoked_at=row[6],
        group=row[7],
    )


def share(row: Row) -> Share:
    """A `shares` row selected as SHARE_COLUMNS."""
    return Share(
        name=row[0],
        weight=float(row[1]),
        jobs_per_hour=None if row[2] is None else int(row[2]),
        tokens_per_hour=None if row[3] is None else int(row[3]),
        updated_at=float(row[4]),
    )


def share_values(s: Share) -> tuple[Any, ...]:
    """A share as SHARE_COLUMNS values."""
    return (s.name, float(s.weight), s.jobs_per_hour, s.tokens_per_hour, float(s.updated_at))


def web_session(row: Row) -> WebSession:
    """A `web_sessions` row selected as SESSION_COLUMNS."""
    return WebSession(
        id_hash=row[0], key_hash=row[1], csrf=row[2], created_at=row[3], expires_at=row[4]
    )


def revocation(row: Row) -> SwarmRevocation:
    """A `swarm_revocations` row (key_id, revoked_at, origin)."""
    return SwarmRevocation(key_id=row[0], revoked_at=float(row[1]), origin=row[2])


def web_session_values(session: WebSession) -> tuple[Any, ...]:
    """A session as SESSION_COLUMNS values."""
    s = session
    return (s.id_hash, s.key_hash, s.csrf, float(s.created_at), float(s.expires_at))


def api_key_values(key: ApiKey) -> tuple[Any, ...]:
    """A key as KEY_COLUMNS values."""
    revoked = None if key.revoked_at is None else float(key.revoked_at)
    return (
        key.id,
        key.role.value,
        key.key_hash,
        key.prefix,
        key.name,
        float(key.created_at),
        revoked,
        key.group,
    )


def stored_file(row: Row) -> StoredFile:
    """A `files` row selected as FILE_COLUMNS."""
    return StoredFile(*row)


def file_values(f: StoredFile) -> tuple[Any, ...]:
    """A file record's values for `insert_file` (its seq is the store's)."""
    expires = None if f.expires_at is None else float(f.expires_at)
    return (f.id, f.owner, f.purpose, f.filename, f.bytes, float(f.created_at), f.lines, expires)


def batch(row: Row) -> Batch:
    """A `batches` row selected as BATCH_COLUMNS."""
    values = dict(zip([*BATCH_FIELDS, "seq"], row, strict=True))
    for name in _BATCH_JSON:
        values[name] = _loads(values[name])
    values["status"] = BatchStatus(values["status"])
    return Batch(**values)


def batch_values(b: Batch) -> list[Any]:
    """A batch as BATCH_FIELDS values: JSON as text, times as floats."""
    out: list[Any] = []
    for name in BATCH_FIELDS:
        value = getattr(b, name)
        if name in _BATCH_JSON:
            value = json_or_null(value)
        elif name in _BATCH_TIMES and isinstance(value, int):
            value = float(value)
        out.append(value)
    return out


def template(row: Row) -> Template:
    """A `templates` row selected as TEMPLATE_COLUMNS."""
    owner, name, description, streams, created_at, updated_at = row
    return Template(owner, name, orjson.loads(streams), created_at, updated_at, description)


def template_values(t: Template) -> tuple[Any, ...]:
    """A template as TEMPLATE_COLUMNS values."""
    return (
        t.owner,
        t.name,
        t.description,
        json_text(t.streams),
        float(t.created_at),
        float(t.updated_at),
    )
