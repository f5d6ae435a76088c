"""`openbeepboop-client submit --file`: a JSONL file of requests in, results JSONL out.

Each input line is one of:
- an OpenAI batch line: `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
  "body": {...}}`;
- a prompt object: `{"prompt": "...", "custom_id"?: "...", "model"?: "..."}`;
- a JSON string, or plain text: the prompt itself.

Results are appended as they finish, in OpenAI's batch output format
(`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`).
Re-running the same command skips lines whose result is already in the output, and jobs
that were submitted but not yet written are found again (idempotency keys are derived
from the file's content and each line's custom_id), so nothing runs twice; that holds for
the same content run from elsewhere too, and the run says so. `--fresh` runs such lines
again: its keys also derive from the output's path, so a fresh run resumes as well.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from openbeepboop.client import Client, Job

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
FINAL = ("completed", "failed", "cancelled", "expired")
# a job created this much before the run began (by this machine's clock) is an earlier run's
EARLIER_S = 5.0


def parse_line(text: str, number: int, model: str) -> dict[str, Any]:
    """One input line as {"custom_id", "url", "body"}; click.UsageError names the line."""
    try:
        value: Any = json.loads(text)
    except ValueError as exc:
        if text.lstrip().startswith("{"):  # meant as JSON: not a prompt to send as is
            raise click.UsageError(f"line {number}: not valid JSON: {exc}") from exc
        value = text
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise click.UsageError(f"line {number}: expected an object, a string or plain text")
    custom_id = str(value.get("custom_id") or f"line-{number}")
    if "body" in value:
        url = value.get("url", ENDPOINTS[0])
        if url not in ENDPOINTS or not isinstance(value["body"], dict):
            raise click.UsageError(
                f"line {number}: url must be one of {', '.join(ENDPOINTS)} and body an object"
            )
        body = {"model": model, **value["body"]}
        return {"custom_id": custom_id, "url": url, "body": body}
    if not isinstance(value.get("prompt"), str):
        raise click.UsageError(f"line {number}: needs 'body' (batch line) or 'prompt'")
    body = {
        "model": value.get("model", model),
        "messages": [{"role": "user", "content": value["prompt"]}],
    }
    return {"custom_id": custom_id, "url": ENDPOINTS[0], "body": body}


def _read(path: Path, model: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            items.append(parse_line(line, number, model))
    ids = [i["custom_id"] for i in items]
    if len(ids) != len(set(ids)):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise click.UsageError(f"custom_id values must be unique; repeated: {', '.join(dupes)}")
    return items


def _drop_torn_tail(output: Path) -> None:
    """An interrupted run can leave a last line without its newline: cut it off, so that
    appended results start on a line of their own (that request is written again)."""
    data = output.read_bytes() if output.exists() else b""
    if data and not data.endswith(b"\n"):
        with output.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _done_ids(output: Path) -> set[str]:
    if not output.exists():
        return set()
    done = set()
    for line in output.read_text().splitlines():
        try:
            done.add(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from an interrupted run: that request runs again
    return done


def _output_line(job: Job, custom_id: str) -> dict[str, Any]:
    ok = job.data["status"] == "completed"
    response = {"status_code": 200, "request_id": job.id, "body": job.data["result"]}
    error = None if ok else (job.error or {"code": job.data["status"], "message": "not completed"})
    return {
        "id": job.id,
        "custom_id": custom_id,
        "response": response if ok else None,
        "error": error,
    }


def _from_earlier_run(job: Job, began: float) -> bool:
    """A job the server replayed for a key an earlier run used: already final when
    submitted, or created well before this run began."""
    created = job.data.get("created_at")
    old = isinstance(created, int | float) and created < began - EARLIER_S
    return job.data.get("status") in FINAL or old


def run_file(
    client: Client,
    path: Path,
    output: Path | None,
    *,
    model: str,
    timeout: float | None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Submit what is not done yet, wait, write results; returns a summary."""
    began = time.time()
    output = output or path.with_suffix(".results.jsonl")
    items = _read(path, model)
    _drop_torn_tail(output)
    done = _done_ids(output)
    todo = [i for i in items if i["custom_id"] not in done]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if fresh:  # new keys, still stable for this output: a fresh run resumes too
        where = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:8]
        digest = f"{digest}-{where}"
    jobs: list[Job] = []
    by_job: dict[str, str] = {}
    for url, resource in (
        (ENDPOINTS[0], client.chat.completions),
        (ENDPOINTS[1], client.completions),
        (ENDPOINTS[2], client.embeddings),
    ):
        group = [i for i in todo if i["url"] == url]
        requests = [
            {
                **i["body"],
                "custom_id": i["custom_id"],
                "idempotency_key": f"file-{digest}-{i['custom_id']}",
            }
            for i in group
        ]
        for job, item in zip(resource.create_many(requests), group, strict=True):
            jobs.append(job)
            by_job[job.id] = item["custom_id"]
    earlier = sum(_from_earlier_run(job, began) for job in jobs)
    if earlier and not fresh:
        click.echo(
            f"note: {earlier} of {len(jobs)} requests were submitted by an earlier run of this "
            "file's content; their jobs are reused, not run again (--fresh runs them again)",
            err=True,
        )
    counts = {"completed": 0, "failed": 0}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    with Progress(*columns, console=console) as progress, output.open("a") as out:
        task = progress.add_task(f"{path.name}", total=len(jobs))
        for job in client.jobs.as_completed(jobs, timeout=timeout):
            out.write(json.dumps(_output_line(job, by_job[job.id]), ensure_ascii=False) + "\n")
            out.flush()
            counts["completed" if job.data["status"] == "completed" else "failed"] += 1
            progress.advance(task)
    click.echo(
        f"{counts['completed']} completed, {counts['failed']} failed, "
        f"{len(done)} already done; results in {output}",
        err=True,
    )
    return {
        **counts,
        "skipped": len(done),
        "submitted": len(jobs),
        "reused": earlier,
        "output": str(output),
    }
