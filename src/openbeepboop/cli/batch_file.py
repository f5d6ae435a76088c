"""`openbeepboop-client submit --file`: a JSONL file of requests in, results JSONL out.

Each input line is one of:
- an OpenAI batch line: `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions",
  "body": {...}}`;
- an OpenAI chat body: `{"model"?: "...", "messages": [...]}`;
- a prompt object: `{"prompt": "...", "custom_id"?: "...", "model"?: "..."}`;
- a JSON string, or plain text: the prompt itself.

The file is one run of the batch runner (`openbeepboop.client.runs`, named after the file,
with a state file like any run). Results are appended as they finish, in OpenAI's batch
output format (`{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`). Re-running the same command skips lines whose result is already in the
output, takes results the run's state file holds, and finds again jobs that were
submitted but not yet recorded (idempotency keys are derived from the file's content and
each line's custom_id), so nothing runs twice; that holds for the same content run from
elsewhere too, and the run says so. `--fresh` runs such lines again: its keys also
derive from the output's path, so a fresh run resumes as well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from openbeepboop.client import Client
from openbeepboop.client.batch_requests import parse_request, unique


def parse_line(text: str, number: int, model: str) -> dict[str, Any]:
    """One input line as {"custom_id", "url", "body", "knobs"}; click.UsageError names
    the line."""
    try:
        value: Any = json.loads(text)
    except ValueError as exc:
        if text.lstrip().startswith("{"):  # meant as JSON: not a prompt to send as is
            raise click.UsageError(f"line {number}: not valid JSON: {exc}") from exc
        value = text
    try:
        return parse_request(value, f"line-{number}", model)
    except ValueError as exc:
        raise click.UsageError(f"line {number}: {exc}") from None


def _read(path: Path, model: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            items.append(parse_line(line, number, model))
    try:
        unique(items)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
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


def run_file(
    client: Client,
    path: Path,
    output: Path | None,
    *,
    model: str,
    timeout: float | None,
    fresh: bool = False,
    cache: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run the file (what is not in the output yet), write results; returns a summary.
    `fresh`: new idempotency keys and (unless `cache` says otherwise) the response
    cache refreshed, so every line really runs again. `options`: the batch runner's
    (`max_outstanding`, `rpm`, ...)."""
    if fresh and cache is None:
        cache = "refresh"
    output = output or path.with_suffix(".results.jsonl")
    items = _read(path, model)
    _drop_torn_tail(output)
    done = _done_ids(output)
    todo = {i["custom_id"] for i in items if i["custom_id"] not in done}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if fresh:  # new keys, still stable for this output: a fresh run resumes too
        where = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:8]
        digest = f"{digest}-{where}"
    requests = [
        {
            "custom_id": i["custom_id"],
            "url": i["url"],
            "body": i["body"],
            "idempotency_key": f"file-{digest}-{i['custom_id']}",
            **i["knobs"],
        }
        for i in items
    ]
    counts = {"completed": 0, "failed": 0}
    reused = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    console = Console(stderr=True)
    with Progress(*columns, console=console) as progress, output.open("a") as out:
        task = progress.add_task(f"{path.name}", total=len(todo))
        results = client.iter_batched(
            requests,
            name=path.name,
            input=str(path.resolve()),
            output=str(output.resolve()),
            wait_s=timeout,
            cache=cache,
            **options,
        )
        for result in results:
            if result.custom_id not in todo:
                continue
            todo.discard(result.custom_id)
            out.write(json.dumps(result.output_line(), ensure_ascii=False) + "\n")
            out.flush()
            counts["completed" if result.ok else "failed"] += 1
            reused += result.reused
            progress.advance(task)
    submitted = counts["completed"] + counts["failed"]
    if reused and not fresh:
        click.echo(
            f"note: {reused} of {submitted} requests were submitted by an earlier run of this "
            "file's content; their jobs are reused, not run again (--fresh runs them again)",
            err=True,
        )
    click.echo(
        f"{counts['completed']} completed, {counts['failed']} failed, "
        f"{len(done)} already done; results in {output}",
        err=True,
    )
    return {
        **counts,
        "skipped": len(done),
        "submitted": submitted,
        "reused": reused,
        "output": str(output),
    }
