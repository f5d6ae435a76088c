"""Outbound: domain objects as the JSON the HTTP API answers with (what goes out;
inbound.py is what comes in)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from openbeepboop.server.core.aliases import alias_of, public_metadata
from openbeepboop.server.models import ApiKey, Batch, Job, Node, Share, StoredFile, Template


class JSONResponse(Response):
    """A JSON response rendered with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def job_json(
    job: Job, queue_position: int | None = None, estimated_start_at: float | None = None
) -> dict[str, Any]:
    """The job object clients see (`object: "job"`); a queued job's position and
    estimated start (core/eta.py) when the caller worked them out."""
    return {
        "id": job.id,
        "object": "job",
        "status": job.status.value,
        "model": job.model,  # for an alias's job: the member it runs on (or ran on)
        "alias": alias_of(job.metadata),
        "endpoint": job.endpoint,
        "created_at": _ts(job.created_at),
        "started_at": _ts(job.started_at),
        "completed_at": _ts(job.finished_at),
        "expires_at": _ts(job.expires_at),
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "queue_position": queue_position,
        "estimated_start_at": None if estimated_start_at is None else round(estimated_start_at, 2),
        "custom_id": job.custom_id,
        "metadata": public_metadata(job.metadata),
        "node": job.pin_node,
        "node_labels": job.pin_labels,
        "node_id": job.node_id,
        "cached": job.cached,
        "result": job.result,
        "error": job.error,
    }


def leased_job_json(job: Job) -> dict[str, Any]:
    """A job as the node protocol hands it out."""
    return {
        "id": job.id,
        "lease_id": job.lease_id,
        "lease_expires_at": job.lease_expires_at,
        # the lease's length, so that a node with a skewed clock still heartbeats in time
        "lease_seconds": round((job.lease_expires_at or 0) - (job.started_at or 0), 3),
        "attempt": job.attempts,
        "model": job.model,
        "endpoint": job.endpoint,
        "request": job.request,
    }


def node_json(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "object": "node",
        "name": node.name,
        "labels": node.labels,
        "models": node.models,
        "capacity": node.capacity,
        "hardware": node.hardware,
        "version": node.version,
        "registered_at": _ts(node.registered_at),
        "last_seen": _ts(node.last_seen),
        "stats": node.stats,
    }


def key_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "object": "api_key",
        "role": key.role.value,
        "prefix": key.prefix,
        "name": key.name,
        "created_at": _ts(key.created_at),
        "revoked_at": _ts(key.revoked_at),
        "group": key.group,
    }


def share_json(share: Share) -> dict[str, Any]:
    """A share's weight and quotas (docs/scheduling.md)."""
    return {
        "object": "share",
        "name": share.name,
        "weight": share.weight,
        "jobs_per_hour": share.jobs_per_hour,
        "tokens_per_hour": share.tokens_per_hour,
        "updated_at": _ts(share.updated_at),
    }


def file_json(file: StoredFile) -> dict[str, Any]:
    """OpenAI's file object."""
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": _ts(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": _ts(file.expires_at),
    }


def batch_json(batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object."""
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": batch.request_counts or {"total": 0, "completed": 0, "failed": 0},
        "metadata": batch.metadata,
        "usage": batch.usage,
    }


def template_json(template: Template) -> dict[str, Any]:
    """An assistant template."""
    return {
        "id": template.name,
        "object": "assistant_template",
        "name": template.name,
        "description": template.description,
        "streams": template.streams,
        "created_at": int(template.created_at),
        "updated_at": int(template.updated_at),
    }


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list shape with cursor fields."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
