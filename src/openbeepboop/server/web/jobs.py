"""The Jobs pages: `/jobs`, a filterable table paged by cursor (the filters live in the
query string), and `/jobs/{id}`, one job with its request, answer, timings and live
events, with cancel and re-run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import Request
from starlette.responses import RedirectResponse, Response

from openbeepboop.server.core.events import result_text
from openbeepboop.server.errors import NotFound
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import ApiKey, Job, JobFilter, JobStatus, Role
from openbeepboop.server.web.pages import (
    AnyViewer,
    Viewer,
    checked_form,
    page_router,
    render,
    secure_headers,
)

router = page_router()

RANGES = {
    "1h": ("last hour", 3_600.0),
    "24h": ("last day", 86_400.0),
    "7d": ("last week", 604_800.0),
}
PAGE_SIZES = (20, 50, 100, 200)
FIELDS = ("status", "model", "key", "batch", "range", "from", "to", "limit")


@dataclass
class JobQuery:
    """The list's filters as given in the query string, and what was wrong with them."""

    values: dict[str, str]
    flt: JobFilter
    problems: list[str] = field(default_factory=list)

    def url(self, **change: str) -> str:
        """`/jobs` with these filters (and `change`), empty ones left out."""
        params = {k: v for k, v in {**self.values, **change}.items() if v}
        return "/jobs" + ("?" + urlencode(params) if params else "")


def parse_time(text: str, name: str, problems: list[str]) -> float | None:
    """An ISO date-time (`2026-12-02T18:00`, UTC unless it says otherwise) in epoch
    seconds; a problem noted for anything else."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        problems.append(f"'{name}' must be a date and time like 2026-12-02T18:00 (UTC)")
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def job_query(params: dict[str, str], seen: Viewer, now: float) -> JobQuery:
    """The filters of the query string `params` as a JobFilter (the cursor aside)."""
    values = {k: params.get(k, "").strip() for k in (*FIELDS, "after")}
    problems: list[str] = []
    after, before = created_range(values, now, problems)
    flt = JobFilter(
        owner=(values["key"] or None) if seen.admin else seen.owner,
        status=status_of(values["status"], problems),
        model=values["model"] or None,
        limit=page_size(values["limit"], problems) + 1,
        batch_id=values["batch"] or None,
        created_after=after,
        created_before=before,
    )
    return JobQuery(values, flt, problems)


def status_of(text: str, problems: list[str]) -> JobStatus | None:
    if not text:
        return None
    try:
        return JobStatus(text)
    except ValueError:
        names = ", ".join(s.value for s in JobStatus)
        problems.append(f"unknown status {text!r}: one of {names}")
        return None


def page_size(text: str, problems: list[str]) -> int:
    if not text:
        return 50
    if text.isdigit() and 1 <= int(text) <= 200:
        return int(text)
    problems.append("'limit' must be a number from 1 to 200")
    return 50


def created_range(
    values: dict[str, str], now: float, problems: list[str]
) -> tuple[float | None, float | None]:
    """(created at or after, created before) from `range`, `from` and `to`."""
    after = None
    if values["range"] in RANGES:
        after = now - RANGES[values["range"]][1]
    elif values["range"]:
        problems.append(f"unknown time range {values['range']!r}: 1h, 24h or 7d")
    start = parse_time(values["from"], "from", problems)
    end = parse_time(values["to"], "to", problems)
    if start is not None and end is not None and start >= end:
        problems.append("'from' must come before 'to'")
    if start is not None:
        after = start if after is None else max(after, start)
    return after, end


@router.get("/jobs")
async def jobs_page(request: Request, seen: AnyViewer) -> Response:
    state = app_state(request)
    query = job_query(dict(request.query_params), seen, time.time())
    jobs: list[Job] = []
    if not query.problems and query.values["after"]:
        try:
            cursor = await state.queue.get(seen.key, query.values["after"])
            query.flt = replace(query.flt, after_seq=cursor.seq)
        except NotFound:
            query.problems.append(f"unknown cursor {query.values['after']!r}: start over")
    if not query.problems:
        jobs = await state.queue.list_jobs(seen.key, query.flt)
    size = query.flt.limit - 1
    shown = jobs[:size]
    keys = await state.keyring.list_keys() if seen.admin else [seen.key]
    keys = [k for k in keys if k.role is not Role.NODE]  # node keys own no jobs
    context = {
        "title": "Jobs",
        "jobs": shown,
        "query": query,
        "q": query.values,
        "statuses": [s.value for s in JobStatus],
        "ranges": RANGES,
        "page_sizes": sorted({*PAGE_SIZES, size}),
        "keys": keys,
        "key_names": {k.id: key_label(k) for k in keys},
        "older": query.url(after=shown[-1].id) if len(jobs) > size else "",
        "first": query.url(after="") if query.values["after"] else "",
    }
    # a bad filter is a 400 page; an htmx swap gets it as 200, or htmx would not show it
    bad = query.problems and not request.headers.get("hx-request")
    return render(request, "jobs.html", context, seen, 400 if bad else 200)


def key_label(key: ApiKey) -> str:
    """A key as a person knows it: its name, else its prefix."""
    label = key.name or f"{key.prefix}…"
    return label + (" (revoked)" if not key.active else "")


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str, seen: AnyViewer) -> Response:
    state = app_state(request)
    job = await state.queue.get(seen.key, job_id)
    node = await state.queue.store.get_node(job.node_id) if job.node_id else None
    owner = None
    if seen.admin:
        owner = next((k for k in await state.keyring.list_keys() if k.id == job.owner), None)
    text, finish, usage = result_text(job) if job.result else ("", "", {})
    position = await state.queue.queue_position(job)
    eta = await state.queue.estimated_start(job, position)
    context = {
        "title": f"Job {job.id}",
        "job": job,
        "node": node,
        "owner": key_label(owner) if owner else job.owner,
        "answer": text,
        "finish": finish,
        "usage": usage,
        "timings": timings(job),
        "request_json": pretty(job.request),
        "result_json": pretty(job.result) if job.result is not None else "",
        "error": job.error or {},
        "position": position,
        "starts_in": None if eta is None else duration(eta - time.time()),
    }
    return render(request, "job.html", context, seen)


def pretty(value: Any) -> str:
    """JSON indented for reading."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def timings(job: Job) -> list[tuple[str, float | None, str]]:
    """(step, epoch seconds, how long it took) for queued, started and finished: the
    wait in the queue, then the run (and the total)."""
    created, started, finished = job.created_at, job.started_at, job.finished_at
    waited = f"waited {duration(started - created)}" if started is not None else ""
    ran = ""
    if finished is not None:
        total = duration(finished - created)
        ran = f"ran {duration(finished - started)}, " if started is not None else ""
        ran += f"total {total}"
    return [("Queued", created, ""), ("Started", started, waited), ("Finished", finished, ran)]


def duration(seconds: float) -> str:
    """'850 ms', '12.3 s', '4 min 05 s', '2 h 03 min'."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str, seen: AnyViewer) -> Response:
    await checked_form(request, seen)
    await app_state(request).queue.cancel(seen.key, job_id)
    return secure_headers(RedirectResponse(f"/jobs/{job_id}", status_code=303))


@router.post("/jobs/{job_id}/rerun")
async def rerun_job(request: Request, job_id: str, seen: AnyViewer) -> Response:
    await checked_form(request, seen)
    job = await app_state(request).queue.rerun(seen.key, job_id)
    return secure_headers(RedirectResponse(f"/jobs/{job.id}", status_code=303))
