"""What the node works on: a `LeasedJob` parsed once from the server's fetch answer, the
`Outcome` of running it, and the table of jobs running now.

Everything inside the node uses these types; the wire's dicts stay at the edges (the
fetch answer in, the outbox payload out)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from openbeepboop.node.backends.base import JSON


class MalformedJob(ValueError):
    """A job in a fetch answer that lacks a field or has one of the wrong type.
    `job_id` and `lease_id` are set when they could be read, so the job can be failed."""

    def __init__(self, why: str, job_id: str | None, lease_id: str | None) -> None:
        super().__init__(why)
        self.job_id = job_id
        self.lease_id = lease_id


@dataclass(frozen=True, slots=True)
class LeasedJob:
    """A job the server leased to this node (docs/node-protocol.md, `fetch`)."""

    id: str
    lease_id: str
    model: str
    endpoint: str
    request: JSON  # the client's OpenAI request, as sent
    attempt: int | None = None  # this job's fetches so far, this one included
    lease_seconds: float | None = None  # how long the lease lasts without a heartbeat
    lease_expires_at: float | None = None  # server clock

    @classmethod
    def parse(cls, raw: Any) -> LeasedJob:
        """Read one job of a fetch answer; MalformedJob says what is wrong with it."""
        if not isinstance(raw, dict):
            raise MalformedJob(f"a job is a {type(raw).__name__}, not an object", None, None)
        try:
            return cls(
                _text(raw, "id"),
                _text(raw, "lease_id"),
                _text(raw, "model"),
                _text(raw, "endpoint"),
                _object(raw, "request"),
                _number(raw, "attempt", int),
                _number(raw, "lease_seconds", float),
                _number(raw, "lease_expires_at", float),
            )
        except KeyError as exc:
            raise _malformed(raw, f"no {exc.args[0]}") from exc
        except (TypeError, ValueError) as exc:
            raise _malformed(raw, str(exc)) from exc

    @property
    def streamed(self) -> bool:
        """The client reads this job's text as it is made (`"stream": true`)."""
        return bool(self.request.get("stream"))


def _malformed(raw: JSON, why: str) -> MalformedJob:
    job_id, lease_id = raw.get("id"), raw.get("lease_id")
    if isinstance(job_id, str) and isinstance(lease_id, str):
        return MalformedJob(why, job_id, lease_id)
    return MalformedJob(why, None, None)


def _text(raw: JSON, key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} must be a non-empty string")
    return value


def _object(raw: JSON, key: str) -> JSON:
    value = raw[key]
    if not isinstance(value, dict):
        raise TypeError(f"{key} must be an object")
    return value


def _number(raw: JSON, key: str, kind: type[int] | type[float]) -> Any:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number")
    return kind(value)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended: `payload` is what the server receives for the job,
    `{"result": <OpenAI response>}` or `{"error": {"message", "code", "retryable"}}` (and
    `"param"` when one request parameter is to blame).
    Plain data, so that a worker process can send it back whole."""

    payload: JSON

    @classmethod
    def done(cls, response: JSON) -> Outcome:
        """A finished generation."""
        return cls({"result": response})

    @classmethod
    def failed(cls, message: str, code: str, retryable: bool, param: str | None = None) -> Outcome:
        """A job that ends in error (`retryable`: the server may queue it again)."""
        error: JSON = {"message": message, "code": code, "retryable": retryable}
        if param is not None:
            error["param"] = param
        return cls({"error": error})

    @property
    def error(self) -> JSON | None:
        """The error, or None for a result."""
        error: JSON | None = self.payload.get("error")
        return error


# a job handed back unfinished (the node is stopping): queued again, no attempt used up
RELEASED = Outcome.failed("the node stopped before finishing", "released", retryable=True)


@dataclass(slots=True)
class InFlight:
    """A running job, and why it was stopped if it was."""

    job: LeasedJob
    task: asyncio.Task[None]
    stop_reason: str | None = None  # "cancelled" | "lost" | "released"


class Running:
    """The jobs this node runs now, by job id. Stopping one cancels its task and
    remembers why, so that the task can say how it ended."""

    def __init__(self) -> None:
        self._jobs: dict[str, InFlight] = {}

    def add(self, job: LeasedJob, task: asyncio.Task[None]) -> None:
        self._jobs[job.id] = InFlight(job, task)

    def remove(self, job_id: str) -> InFlight | None:
        return self._jobs.pop(job_id, None)

    def stop_reason(self, job_id: str) -> str | None:
        flight = self._jobs.get(job_id)
        return flight.stop_reason if flight is not None else None

    def stop(self, job_id: str, reason: str) -> None:
        """Cancel the job's task (once: the first reason given is kept)."""
        flight = self._jobs.get(job_id)
        if flight is not None and flight.stop_reason is None:
            flight.stop_reason = reason
            flight.task.cancel()

    def stop_all(self, reason: str) -> None:
        for job_id in list(self._jobs):
            self.stop(job_id, reason)

    def stop_leases(self, lease_ids: set[str], reason: str) -> None:
        """Stop the jobs that run under any of `lease_ids`."""
        for flight in list(self._jobs.values()):
            if flight.job.lease_id in lease_ids:
                self.stop(flight.job.id, reason)

    def leases(self) -> dict[str, str]:
        """Job id -> lease id of every running job not being stopped already."""
        return {j: f.job.lease_id for j, f in self._jobs.items() if f.stop_reason is None}

    def lease_ids(self) -> list[str]:
        return [f.job.lease_id for f in self._jobs.values()]

    def tasks(self) -> list[asyncio.Task[None]]:
        return [f.task for f in self._jobs.values()]

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)
