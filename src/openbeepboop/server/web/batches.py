"""The Batches pages: `/batches`, each batch with its progress, times, files and cancel,
and `/batches/{id}`, one batch in full. While a batch is open its part of the page is
fetched again every few seconds (htmx polling; the poll gets only that part). What the
store said of a batch, or of a listing, serves the polls of every viewer for
`SHARED_SECONDS`: ten tabs on one running batch count its jobs once per interval, not
ten times. Opening a page always reads afresh."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from starlette.responses import RedirectResponse, Response

from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey, Batch, BatchStatus, StoredFile
from openbeepboop.server.web.jobs import key_label
from openbeepboop.server.web.login import safe_next
from openbeepboop.server.web.pages import (
    AnyViewer,
    Viewer,
    checked_form,
    page_router,
    render,
    secure_headers,
)

router = page_router()

PAGE = 20
POLL_SECONDS = 3  # how often an open batch's part of the page is fetched again
SHARED_SECONDS = 2.0  # how long one read of a batch (or a listing) serves every viewer
CANCELLABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
T = TypeVar("T")


class Recent(Generic[T]):
    """Values kept for `seconds`, then read again (and dropped when old)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._items: dict[Any, tuple[float, T]] = {}

    def get(self, key: Any) -> T | None:
        now = time.monotonic()
        self._items = {k: v for k, v in self._items.items() if now - v[0] < self.seconds}
        found = self._items.get(key)
        return None if found is None else found[1]

    def put(self, key: Any, value: T) -> T:
        self._items[key] = (time.monotonic(), value)
        return value

    def clear(self) -> None:
        self._items.clear()


@dataclass(frozen=True, slots=True)
class Shared:
    """The app's recent reads: batches by id, listings by (owner, cursor)."""

    batches: Recent[Batch]
    listings: Recent[list[Batch]]


def shared(request: Request) -> Shared:
    """This app's Shared (made on first use)."""
    state = request.app.state
    if not hasattr(state, "web_batch_reads"):
        state.web_batch_reads = Shared(Recent(SHARED_SECONDS), Recent(SHARED_SECONDS))
    found: Shared = state.web_batch_reads
    return found


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
        found = await _listing(request, seen, after)
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
    name = "batches_table.html" if polled(request) else "batches.html"
    return render(request, name, context, seen, status)


def polled(request: Request) -> bool:
    """An htmx poll of a page's live part (not a history restore): answer only that."""
    headers = request.headers
    return bool(headers.get("hx-request")) and not headers.get("hx-history-restore-request")


async def _listing(request: Request, seen: Viewer, after: str | None) -> list[Batch]:
    key = (seen.owner, after)
    listings = shared(request).listings
    found = listings.get(key) if polled(request) else None
    if found is None:
        batches = app_state(request).batches
        found = listings.put(key, await batches.list_batches(seen.key, PAGE + 1, after))
    return found


async def _batch(request: Request, seen: Viewer, batch_id: str) -> Batch:
    """The batch (another key's is NotFound for a client, as Batches.get has it)."""
    recent = shared(request).batches
    found = recent.get(batch_id) if polled(request) else None
    if found is None:
        return recent.put(batch_id, await app_state(request).batches.get(seen.key, batch_id))
    if seen.owner not in (None, found.owner):
        raise NotFound(f"no batch with id {batch_id!r}", param="batch_id", code="batch_not_found")
    return found


async def _file(request: Request, seen: Viewer, file_id: str | None) -> StoredFile | None:
    if file_id is None:
        return None
    try:
        return await app_state(request).files.get(seen.key, file_id)
    except NotFound:  # pruned or deleted since
        return None


@router.get("/batches/{batch_id}")
async def batch_page(request: Request, batch_id: str, seen: AnyViewer) -> Response:
    batch = await _batch(request, seen, batch_id)
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
    return render(request, "batch_detail.html" if polled(request) else "batch.html", context, seen)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str, seen: AnyViewer) -> Response:
    form = await checked_form(request, seen)
    await app_state(request).batches.cancel(seen.key, batch_id)
    reads = shared(request)  # the next page shows the cancel at once
    reads.batches.clear()
    reads.listings.clear()
    back = safe_next(form.get("next") or f"/batches/{batch_id}")
    return secure_headers(RedirectResponse(back, status_code=303))
