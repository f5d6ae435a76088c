"""A run's state file: what was asked, submitted and answered, surviving interruption.

`<state_dir()>/<run id>.jsonl`, append-only JSON lines (docs/client.md, "Running a
batch"):

    {"object": "run", "version": 1, "id", "name", "created_at", "base_url", "total",
     "input", "output", "metadata", "options", "fingerprint"}
    {"request": i, "custom_id", "url", "body", "key", "knobs"}      one per request
    {"submitted": i, "job": id, "server": url}
    {"done": i, "job": id|null, "status", "result", "error"}
    {"withdrawn": i, "job": id}     cancelled as the run gave up: not done, runs again
    {"event": "cancelled"|"aborted"|"finished", "at": ts, "reason": ...}

A torn last line (the process killed mid-write) is ignored when read, and cut off before
the next append.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

VERSION = 1
EVENTS = ("cancelled", "aborted", "finished")


def state_dir() -> Path:
    """Where run state files live: `$OPENBEEPBOOP_STATE_DIR`, else `$CACHE_DIR/runs`,
    else the user state directory of "openbeepboop" plus `/runs`."""
    if os.environ.get("OPENBEEPBOOP_STATE_DIR"):
        return Path(os.environ["OPENBEEPBOOP_STATE_DIR"])
    if os.environ.get("CACHE_DIR"):
        return Path(os.environ["CACHE_DIR"]) / "runs"
    import platformdirs

    return Path(platformdirs.user_state_dir("openbeepboop", appauthor=False)) / "runs"


@dataclass(frozen=True)
class RunSummary:
    """One run as its state file tells it."""

    id: str
    name: str | None
    path: Path
    created_at: float
    base_url: str
    total: int
    submitted: int
    done: int
    failed: int
    status: str  # "finished" | "cancelled" | "aborted" | "incomplete"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """A state file read in full."""

    path: Path
    header: dict[str, Any]
    requests: dict[int, dict[str, Any]] = field(default_factory=dict)
    submitted: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    withdrawn: dict[int, int] = field(default_factory=dict)  # how often, by index

    def withdraw(self, line: dict[str, Any]) -> None:
        """A withdrawn line: its request is neither submitted nor done any more."""
        i = int(line["withdrawn"])
        if self.submitted.get(i, {}).get("job") == line.get("job"):
            del self.submitted[i]
        if self.done.get(i, {}).get("job") == line.get("job"):
            del self.done[i]
        self.withdrawn[i] = self.withdrawn.get(i, 0) + 1

    def key(self, i: int) -> str:
        """Request `i`'s idempotency key: a new one after each withdrawal (the server
        would return the cancelled job for the old one)."""
        key = str(self.requests[i]["key"])
        n = self.withdrawn.get(i, 0)
        return f"{key}-r{n}" if n else key

    @property
    def status(self) -> str:
        last = self.events[-1]["event"] if self.events else None
        return last if last in EVENTS else "incomplete"

    def summary(self) -> RunSummary:
        h = self.header
        failed = sum(d.get("status") != "completed" for d in self.done.values())
        return RunSummary(
            id=str(h["id"]),
            name=h.get("name"),
            path=self.path,
            created_at=float(h.get("created_at") or 0),
            base_url=str(h.get("base_url") or ""),
            total=int(h.get("total") or 0),
            submitted=len(self.submitted.keys() | self.done.keys()),
            done=len(self.done),
            failed=failed,
            status=self.status,
            metadata=dict(h.get("metadata") or {}),
        )


def _lines(path: Path, limit: int | None = None) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                return
            try:
                value = json.loads(line)
            except ValueError:
                continue  # a torn last line: the record it began is redone on resume
            if isinstance(value, dict):
                yield value


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of a state file, or None when it is not one."""
    try:
        first = next(_lines(path, 1), None)
    except OSError:
        return None
    return first if first and first.get("object") == "run" else None


def load(path: Path) -> RunRecord:
    """A state file in full (ValueError when it is not one)."""
    lines = _lines(path)
    header = next(lines, None)
    if not header or header.get("object") != "run":
        raise ValueError(f"{path} is not a run state file")
    record = RunRecord(path, header)
    for line in lines:
        if "request" in line:
            record.requests[int(line["request"])] = line
        elif "submitted" in line:
            record.submitted[int(line["submitted"])] = line
        elif "done" in line and _aborted(line):  # written so before withdrawn lines
            record.withdraw({"withdrawn": line["done"], "job": line.get("job")})
        elif "done" in line:
            record.done[int(line["done"])] = line
        elif "withdrawn" in line:
            record.withdraw(line)
        elif "event" in line:
            record.events.append(line)
    return record


def _aborted(done: dict[str, Any]) -> bool:
    """A done line of a job cancelled because its run gave up: not done."""
    error = done.get("error")
    return (
        done.get("status") == "cancelled"
        and isinstance(error, dict)
        and (error.get("code") == "run_aborted")
    )


def _paths(directory: Path | None) -> list[Path]:
    where = directory or state_dir()
    return sorted(where.glob("run_*.jsonl")) if where.is_dir() else []


def list_runs(directory: Path | None = None) -> list[RunSummary]:
    """Every run in the state directory, newest first."""
    runs = []
    for path in _paths(directory):
        try:
            runs.append(load(path).summary())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a state file of ours
    return sorted(runs, key=lambda r: r.created_at, reverse=True)


def find_run(ref: str, directory: Path | None = None) -> RunSummary:
    """The run with id `ref`, the one whose id starts with `ref`, or the newest one
    named `ref`; LookupError saying why not."""
    runs = list_runs(directory)
    for run in runs:
        if run.id == ref:
            return run
    prefixed = [r for r in runs if r.id.startswith(ref)]
    if len(prefixed) > 1:
        some = ", ".join(r.id for r in prefixed[:5])
        raise LookupError(f"{ref!r} is the start of {len(prefixed)} run ids ({some}); give more")
    if prefixed:
        return prefixed[0]
    named = [r for r in runs if r.name == ref]
    if named:
        return named[0]
    where = directory or state_dir()
    raise LookupError(f"no run with id or name {ref!r} in {where}")


def outstanding_jobs(run: RunSummary) -> list[str]:
    """The ids of the run's jobs that were submitted and have no result yet."""
    record = load(run.path)
    return [str(s["job"]) for i, s in sorted(record.submitted.items()) if i not in record.done]


def mark_run(run: RunSummary, event: str, reason: str | None = None) -> None:
    """Append an event line ("cancelled", "aborted" or "finished") to the run's file."""
    if event not in EVENTS:
        raise ValueError(f"event must be one of {', '.join(EVENTS)}, not {event!r}")
    with RunWriter(run.path) as writer:
        writer.write([event_line(event, reason)])


def run_results(run: RunSummary) -> Iterator[dict[str, Any]]:
    """The run's results as OpenAI batch output lines, in input order; done ones only."""
    record = load(run.path)
    for i in sorted(record.done):
        request = record.requests.get(i, {})
        yield output_line(record.done[i], str(request.get("custom_id", i)))


def output_line(done: dict[str, Any], custom_id: str) -> dict[str, Any]:
    """A done line in OpenAI's batch output format."""
    job = done.get("job")
    if done.get("status") == "completed":
        response = {"status_code": 200, "request_id": job, "body": done.get("result")}
        return {"id": job, "custom_id": custom_id, "response": response, "error": None}
    error = done.get("error") or {"code": done.get("status"), "message": "not completed"}
    return {"id": job, "custom_id": custom_id, "response": None, "error": error}


def event_line(event: str, reason: str | None = None) -> dict[str, Any]:
    return {"event": event, "at": time.time(), "reason": reason}


class RunWriter:
    """Appends lines to a state file: flushed after each write (a killed process loses
    nothing the OS was given), fsync'd on `sync()` and on close."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, lines: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        if text:
            self._file.write(text)
            self._file.flush()

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its newline (rare: read the file only then)."""
    if not path.exists():
        return
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
