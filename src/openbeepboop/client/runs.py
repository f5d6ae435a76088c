"""The batch runner: many requests as one run that survives interruption.

    outcome = client.run_batched(["What is 2+2?", ...], name="eval-v3", model="llama3")
    print(outcome.completed, outcome[0].text)

A run submits its requests as jobs in bulk, at most `max_outstanding` unfinished at once
(split among `num_workers` loops that each submit and long-poll their share), records
every step in its state file (`run_state.py`), logs a heartbeat line every `heartbeat_s`
seconds (logger `openbeepboop.client.runs`), and gives up after `max_failures` failed
jobs in one session (the jobs still out are cancelled and withdrawn, so a resume runs
them again; `RunAbortedError` carries what was done). Started again with the same name
(or run id) and the same requests, a run continues from its state file: what is done is
not asked again, submitted jobs are followed, and a request whose submit was sent but
not recorded is sent with the same idempotency key (`<run id>-<index>`), so the server
returns the job it already has. Every request is answered exactly once.
`openbeepboop-client submit --file` is a run too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from openbeepboop.client import run_state
from openbeepboop.client.batch_requests import fingerprint, prepare
from openbeepboop.client.run_engine import Session
from openbeepboop.client.run_state import (
    RunRecord,
    RunSummary,
    RunWriter,
    find_run,
    list_runs,
    load,
    mark_run,
    outstanding_jobs,
    read_header,
    run_results,
    state_dir,
)
from openbeepboop.client.run_types import (
    RunAbortedError,
    RunClient,
    RunOptions,
    RunOutcome,
    RunResult,
)

__all__ = [
    "RunAbortedError",
    "RunOptions",
    "RunOutcome",
    "RunResult",
    "RunSummary",
    "find_run",
    "iter_batched",
    "list_runs",
    "mark_run",
    "outstanding_jobs",
    "resume_run",
    "run_batched",
    "run_results",
    "state_dir",
]

log = logging.getLogger("openbeepboop.client.runs")


# -- opening a run ---------------------------------------------------------------------


def open_session(
    client: RunClient,
    requests: Iterable[Any],
    *,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    model: str | None = None,
    run_id: str | None = None,
    resume: bool = True,
    state_dir: Path | None = None,
    input: str | None = None,
    output: str | None = None,
    cache: str | None = None,
    options: RunOptions,
) -> Session:
    """The run these requests make: the same one continued when its state file is
    found (by `run_id`, or by name, server and requests with `resume`), else a new one.
    `cache` ("use", "skip" or "refresh") goes into each request's body."""
    items = prepare(requests, model or client.model)
    if cache is not None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        items = [{**item, "body": {**item["body"], "cache": cache}} for item in items]
    digest = fingerprint(items, client.base_url, output)
    directory = state_dir or run_state.state_dir()
    path = directory / f"{run_id}.jsonl" if run_id else None
    if path is None and resume:
        path = _matching(directory, name, digest)
    if path is not None and path.exists():
        record = load(path)
        if record.header.get("fingerprint") != digest:
            raise ValueError(f"run {record.header['id']} was made from other requests")
        return Session(client, record, options, RunWriter(path))
    run_id = run_id or "run_" + uuid.uuid4().hex[:12]
    header = {
        "object": "run",
        "version": 1,
        "id": run_id,
        "name": name,
        "created_at": time.time(),
        "base_url": client.base_url,
        "total": len(items),
        "input": input,
        "output": output,
        "metadata": metadata or {},
        "options": asdict(options),
        "fingerprint": digest,
    }
    record = RunRecord(directory / f"{run_id}.jsonl", header)
    for i, item in enumerate(items):
        knobs = dict(item["knobs"])
        if options.max_attempts is not None:
            knobs.setdefault("max_attempts", options.max_attempts)
        key = item.get("key") or f"{run_id}-{i}"
        record.requests[i] = {"request": i, **item, "knobs": knobs, "key": key}
    writer = RunWriter(record.path)
    writer.write([header, *record.requests.values()])
    return Session(client, record, options, writer)


def _matching(directory: Path, name: str | None, digest: str) -> Path | None:
    """The newest state file of a run with this name and fingerprint."""
    best: tuple[float, Path] | None = None
    for path in directory.glob("run_*.jsonl") if directory.is_dir() else ():
        header = read_header(path)
        if header and header.get("name") == name and header.get("fingerprint") == digest:
            created = float(header.get("created_at") or 0)
            if best is None or created > best[0]:
                best = (created, path)
    return best[1] if best else None


# -- the public entry points -----------------------------------------------------------

RUN_ARGS = (
    "name", "metadata", "model", "run_id", "resume", "state_dir", "input", "output", "cache",
)  # fmt: skip
CACHE_MODES = ("use", "skip", "refresh")


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], RunOptions]:
    run = {k: options.pop(k) for k in RUN_ARGS if k in options}
    return run, RunOptions.from_env(**options)


async def iter_batched(
    client: RunClient, requests: Iterable[Any], *, ordered: bool = False, **options: Any
) -> AsyncIterator[RunResult]:
    """The results of a run as they come (`ordered`: in input order); the arguments as
    for `run_batched`."""
    run, settings = _split(options)
    session = open_session(client, requests, options=settings, **run)
    held: dict[int, RunResult] = {}
    upto = 0
    async with aclosing(session.stream()) as stream:  # a consumer that stops stops the run
        async for result in stream:
            if not ordered:
                yield result
                continue
            held[result.index] = result
            while upto in held:
                yield held.pop(upto)
                upto += 1


async def run_batched(
    client: RunClient, requests: Iterable[Any], *, ordered: bool = True, **options: Any
) -> RunOutcome:
    """Run `requests` (chat bodies, batch lines, prompt objects or strings) as one
    resumable run and return every result. Arguments: `name`, `metadata` (kept in the
    state file), `model` (for requests without one), `run_id` (continue this run),
    `resume` (continue a run with the same name and requests; default on), `state_dir`,
    `cache` (the server's response cache for every request: "use", "skip" or
    "refresh"), and the `RunOptions` (`max_outstanding`, `num_workers`, `heartbeat_s`,
    `max_failures`, `rpm`, `timeout_s`, `max_attempts`, `wait_s`)."""
    run, settings = _split(options)
    session = open_session(client, requests, options=settings, **run)
    async with aclosing(session.stream()) as stream:
        async for _ in stream:
            pass
    return session.outcome(ordered)


async def resume_run(client: RunClient, run: RunSummary, **options: Any) -> RunOutcome:
    """Continue a run from its state file alone (the requests are in it); the options
    it was started with, unless given."""
    record = load(run.path)
    saved = {
        k: v
        for k, v in (record.header.get("options") or {}).items()
        if k in RunOptions.__dataclass_fields__ and k != "wait_s"  # wait_s: this session's
    }
    settings = RunOptions(**{**saved, **{k: v for k, v in options.items() if v is not None}})
    settings.check()
    if client.base_url != record.header.get("base_url"):
        log.warning(
            "run %s was made on %s; resuming it on %s",
            run.id,
            record.header.get("base_url"),
            client.base_url,
        )
    session = Session(client, record, settings, RunWriter(run.path))
    async with aclosing(session.stream()) as stream:
        async for _ in stream:
            pass
    return session.outcome()
