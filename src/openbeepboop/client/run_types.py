"""The batch runner's values: its options, one request's result, a run's outcome, and
the error of a run that gave up."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from openbeepboop.client.config import env_number
from openbeepboop.client.errors import OpenBeepBoopError
from openbeepboop.client.run_state import RunSummary, output_line
from openbeepboop.client.types import typed_result
from openbeepboop.client.wire import Resubmit


class RunClient(Protocol):
    """What the runner needs of a client (`AsyncClient` is one)."""

    base_url: str
    model: str | None

    async def submit(
        self, resubmit: Resubmit, exclude: Collection[str] = ()
    ) -> tuple[str, Any]: ...

    async def poll(
        self,
        ids: Sequence[str],
        wait: float = 0,
        only_final: bool = False,
        *,
        base: str | None = None,
        retry: bool = True,
    ) -> Any: ...

    async def candidates(self, model: str | None) -> list[str]: ...

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
        base: str | None = None,
        retry: bool = True,
    ) -> Any: ...


@dataclass(frozen=True)
class RunOptions:
    """How a run goes. Unset ones come from the environment (`from_env`)."""

    max_outstanding: int = 1000  # MAX_OUTSTANDING: jobs submitted and not final
    num_workers: int = 4  # BATCH_NUM_WORKERS: loops that submit and poll a share each
    heartbeat_s: float = 10.0  # seconds between progress lines
    max_failures: int = 25  # failed jobs in a session before it gives up; 0: never
    rpm: int = 0  # RPM: submits per minute; 0: no limit
    timeout_s: float = 0  # TIMEOUT_S: a job not final this long after its submit is
    #  cancelled and counts as failed; 0: no limit
    max_attempts: int | None = None  # MAX_ATTEMPTS: the job's attempts on the server
    wait_s: float | None = None  # give up waiting after this long (the run stays resumable)

    @classmethod
    def from_env(cls, **given: Any) -> RunOptions:
        """The options given (None: unset), else the environment's, else the defaults;
        a ValueError names a bad variable or argument."""
        env = {
            "max_outstanding": env_number("MAX_OUTSTANDING", cls.max_outstanding, minimum=1),
            "num_workers": env_number("BATCH_NUM_WORKERS", cls.num_workers, minimum=1),
            "rpm": env_number("RPM", cls.rpm),
            "timeout_s": env_number("TIMEOUT_S", cls.timeout_s, integer=False),
            "max_attempts": env_number("MAX_ATTEMPTS", 0, minimum=1) or None,
        }
        values = {**env, **{k: v for k, v in given.items() if v is not None}}
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        least = {"max_outstanding": 1, "num_workers": 1, "heartbeat_s": 0.01}
        least |= {"max_failures": 0, "rpm": 0, "timeout_s": 0, "max_attempts": 1}
        least |= {"wait_s": 0}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, not {value!r}")
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be at least {minimum:g}, not {value!r}")


@dataclass(frozen=True)
class RunResult:
    """One request's outcome. `body` is the raw OpenAI result, `result` the same as an
    `openai` type; `reused`: answered before this session (its state file, or a job
    the server already had for the request's idempotency key)."""

    index: int
    custom_id: str
    url: str
    job_id: str | None
    status: str  # completed | failed | cancelled | expired
    body: dict[str, Any] | None
    error: dict[str, Any] | None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def result(self) -> Any:
        return None if self.body is None else typed_result(self.url, self.body)

    @property
    def text(self) -> str | None:
        """The first choice's text (chat or completion), if any."""
        choices = (self.body or {}).get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        return text if isinstance(text, str) else None

    def output_line(self) -> dict[str, Any]:
        """This result in OpenAI's batch output format."""
        done = {"job": self.job_id, "status": self.status, "result": self.body}
        return output_line({**done, "error": self.error}, self.custom_id)


@dataclass
class RunOutcome:
    """A run's results (input order unless asked otherwise) and its summary."""

    run: RunSummary
    results: list[RunResult]

    @property
    def completed(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.completed

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> RunResult:
        return self.results[index]

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.results)


class RunAbortedError(OpenBeepBoopError):
    """The run gave up after `max_failures` failed jobs; `outcome` holds what was done
    (input order). Its state file says "aborted"; a new session resumes it."""

    def __init__(self, message: str, *, outcome: RunOutcome) -> None:
        super().__init__(message, code="run_aborted")
        self.outcome = outcome
