"""The Batches pages: `/batches`, each batch with its progress, times, files and cancel,
and `/batches/{id}`, one batch in full. While a batch is open its part of the page is
fetched again every few seconds (htmx polling: one batch read and one count of its jobs
per poll)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey, Batch, BatchStatus, StoredFile
from openbeepboop.server.web.jobs import key_label
from openbeepboop.server.web.login import safe_next
from openbeepboop.server.web.pages import AnyViewer, Viewer, checked_form, render, secure_headers

router = APIRouter(include_in_schema=False)

PAGE = 20
POLL_SECONDS = 3  # how often an open batch's part of the page is fetched again
CANCELLABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


@dataclass(frozen=True, slots=True)
class Progress:
    """A batch's counts as the page shows them."""

    total: int
    completed: int
    failed: int
    queued: int  # input lines already jobs (while validating)

    @property
    def done(self) -> int:
        return self.completed + self.failed


def progress(batch: Batch) -> Progress:
    counts = batch.request_counts or {}
    total = int(counts.get("total", 0))
    queued = total if batch.status is not BatchStatus.VALIDATING else batch.lines_queued
    return Progress(total, int(counts.get("completed", 0)), int(counts.get("failed", 0)), queued)


def finished_at(batch: Batch) -> float | None:
    """When a final batch ended."""
    ends = (batch.completed_at, batch.failed_at, batch.expired_at, batch.cancelled_at)
    return next((t for t in ends if t is not None), None)


def view(batch: Batch) -> dict[str, Any]:
    """What a template needs of one batch."""
    return {
        "batch": batch,
        "progress": progress(batch),
        "finished_at": finished_at(batch),
        "cancellable": batch.status in CANCELLABLE,
        "open": not batch.status.is_final,
    }


async def key_names(request: Request, seen: Viewer) -> dict[str, str]:
    """Key id → label, for an admin's owner column (empty for a client)."""
    if not seen.admin:
        return {}
    keys: list[ApiKey] = await app_state(request).keyring.list_keys()
    return {k.id: key_label(k) for k in keys}


@router.get("/batches")
async def batches_page(request: Request, seen: AnyViewer) -> Response:
    after = request.query_params.get("after", "").strip() or None
    problem = ""
    found: list[Batch] = []
    try:
        found = await app_state(request).batches.list_batches(seen.key, PAGE + 1, after)
    except NotFound:
        problem = f"unknown cursor {after!r}: start over"
    shown = found[:PAGE]
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    context = {
        "title": "Batches",
        "batches": [view(b) for b in shown],
        "problem": problem,
        "live": any(not b.status.is_final for b in shown),
        "here": here,
        "poll": POLL_SECONDS,
        "older": f"/batches?after={shown[-1].id}" if len(found) > PAGE else "",
        "first": "/batches" if after else "",
        "key_names": await key_names(request, seen),
    }
    status = 400 if problem and not request.headers.get("hx-request") else 200
    return render(request, "batches.html", context, seen, status)


async def _file(request: Request, seen: Viewer, file_id: str | None) -> StoredFile | None:
    if file_id is None:
        return None
    try:
        return await app_state(request).files.get(seen.key, file_id)
    except NotFound:  # pruned or deleted since
        return None


@router.get("/batches/{batch_id}")
async def batch_page(request: Request, batch_id: str, seen: AnyViewer) -> Response:
    batch = await app_state(request).batches.get(seen.key, batch_id)
    files = [
        (label, file_id, await _file(request, seen, file_id))
        for label, file_id in (
            ("Input", batch.input_file_id),
            ("Output", batch.output_file_id),
            ("Errors", batch.error_file_id),
        )
        if file_id is not None
    ]
    context = {
        "title": f"Batch {batch.id}",
        **view(batch),
        "files": files,
        "poll": POLL_SECONDS,
        "key_names": await key_names(request, seen),
    }
    return render(request, "batch.html", context, seen)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str, seen: AnyViewer) -> Response:
    form = await checked_form(request, seen)
    await app_state(request).batches.cancel(seen.key, batch_id)
    back = safe_next(form.get("next") or f"/batches/{batch_id}")
    return secure_headers(RedirectResponse(back, status_code=303))
