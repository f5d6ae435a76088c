"""The node's engine in process: a real NodeRunner, a real outbox in tmp_path and real
backends (echo, and scripted ones that fail or hang), against a fake server client that
answers the node protocol in memory. Fast: short heartbeats and polls, a 10 ms backoff."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tenacity import wait_fixed

from openbeepboop.node import backoff
from openbeepboop.node.backends import build_backend
from openbeepboop.node.backends.base import JSON, Backend, BackendError, Chunk, Progress
from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.config import NodeConfig
from openbeepboop.node.jobs import LeasedJob, MalformedJob, Outcome
from openbeepboop.node.runner import NodeRunner

CHAT = "/v1/chat/completions"


# -- a server in memory -----------------------------------------------------------------


class FakeServer:
    """NodeClient's calls answered in memory: a queue of jobs per model, leases, results
    accepted once each, and switches for an outage (`unreachable`), a server that forgot
    the node (`forget`), cancelled jobs and lost leases."""

    def __init__(self) -> None:
        self.queue: list[JSON] = []
        self.leases: dict[str, str] = {}  # lease_id -> job_id, current leases only
        self.results: dict[str, JSON] = {}  # job_id -> the accepted result body
        self.pieces: list[JSON] = []
        self.heartbeats: list[list[str]] = []
        self.cancelled: set[str] = set()  # job ids
        self.lost: set[str] = set()  # lease ids
        self.unreachable: set[str] = set()  # calls that fail as if the server were down
        self.registrations = 0
        self.watches = 0
        self.failed_submits = 0
        self.node_id = ""
        self.closed = False
        self._queued = asyncio.Event()
        self._leases = 0
        self._ids = itertools.count()

    # what a test does

    def add(self, content: str, model: str = "echo", **request: Any) -> str:
        job_id = f"job_{next(self._ids)}"
        body = {"model": model, "messages": [{"role": "user", "content": content}], **request}
        self.add_raw({"id": job_id, "model": model, "endpoint": CHAT, "request": body})
        return job_id

    def add_raw(self, job: Any) -> None:
        self.queue.append(job)
        self._queued.set()

    def forget(self) -> None:
        self.node_id = "forgotten"

    def lease_of(self, job_id: str) -> str:
        return next(lease for lease, job in self.leases.items() if job == job_id)

    # the node protocol

    async def register(self, name: str, models: list[JSON], capacity: int, hw: JSON) -> str:
        self._check("register", self.node_id)
        self.registrations += 1
        self.node_id = f"node_{self.registrations}"
        return self.node_id

    async def fetch(self, node_id: str, models: list[str], max_jobs: int, wait: float) -> Any:
        self._check("fetch", node_id)
        deadline = time.monotonic() + wait
        while not (jobs := self._lease(models, max_jobs)) and time.monotonic() < deadline:
            self._queued.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queued.wait(), deadline - time.monotonic())
        return jobs

    async def heartbeat(self, node_id: str, lease_ids: list[str], stats: JSON) -> JSON:
        self._check("heartbeat", node_id)
        self.heartbeats.append(lease_ids)
        jobs = {self.leases.get(lease) for lease in lease_ids}
        return {
            "extended": [lease for lease in lease_ids if lease not in self.lost],
            "lost": [lease for lease in lease_ids if lease in self.lost],
            "cancelled": sorted(j for j in self.cancelled if j in jobs),
        }

    async def watch(self, node_id: str, leases: dict[str, str], wait: float) -> list[str]:
        self._check("watch", node_id)
        self.watches += 1
        deadline = time.monotonic() + wait
        while True:
            found = [j for j in leases if j in self.cancelled]
            if found or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(0.01)

    async def events(self, node_id: str, events: list[JSON]) -> int:
        self._check("events", node_id)
        self.pieces.extend(events)
        return len(events)

    async def submit(self, node_id: str, results: list[JSON]) -> list[JSON]:
        if "submit" in self.unreachable:
            self.failed_submits += 1
        self._check("submit", node_id)
        answers = []
        for body in results:
            job_id = body["job_id"]
            current = self.leases.get(body["lease_id"]) == job_id
            if current:
                self.results[job_id] = body
                del self.leases[body["lease_id"]]
            answers.append({"job_id": job_id, "accepted": current, "reason": None})
        return answers

    async def close(self) -> None:
        self.closed = True

    def _check(self, call: str, node_id: str) -> None:
        if call in self.unreachable:
            raise ServerUnreachable(f"{call}: the fake server is down")
        if call != "register" and node_id != self.node_id:
            raise ServerRefused(404, "node_not_registered", "unknown node")

    def _lease(self, models: list[str], max_jobs: int) -> list[JSON]:
        taken = [j for j in self.queue if not isinstance(j, dict) or j.get("model") in models]
        taken = taken[:max_jobs]
        for job in taken:
            self.queue.remove(job)
        return [self._leased(job) for job in taken]

    def _leased(self, job: Any) -> Any:
        if not isinstance(job, dict) or "id" not in job:
            return job
        self._leases += 1
        lease_id = f"lease_{self._leases}"
        self.leases[lease_id] = job["id"]
        return {"lease_id": lease_id, "lease_seconds": 30.0, "attempt": 1, **job}


# -- a backend the test scripts ---------------------------------------------------------


class ScriptedBackend:
    """Each call takes the next step: an exception to raise, "hang" to wait until
    cancelled, or a text to answer with (the default once the script is done)."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.calls = 0
        self.started = asyncio.Event()
        self.state = "loading"

    async def load(self, progress: Progress) -> None:
        self.state = "ready"
        progress("ready", 1.0)

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        self.calls += 1
        self.started.set()
        step = self.steps.pop(0) if self.steps else "done"
        if isinstance(step, BaseException):
            raise step
        if step == "hang":
            await asyncio.Event().wait()
        yield Chunk(text=step)
        yield Chunk(finish_reason="stop", usage={"completion_tokens": 1})

    async def close(self) -> None:
        self.state = "loading"


def transient() -> BackendError:
    return BackendError("busy", code="overloaded", retryable=True, retry_after=0.01)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server backoff (0.5 s doubling) in 10 ms steps."""
    monkeypatch.setattr(backoff, "WAIT", wait_fixed(0.01))


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


Make = Callable[..., NodeRunner]


@pytest.fixture
def make_runner(tmp_path: Path, server: FakeServer) -> Make:
    """A runner on `server` serving `models` (default: one echo model); a backend in
    `backends` (by model name) replaces the one its config names."""

    def make(
        models: list[JSON] | None = None, backends: dict[str, Backend] | None = None, **node: Any
    ) -> NodeRunner:
        settings = {"name": "test-node", "state_dir": str(tmp_path), "heartbeat_seconds": 0.05}
        config = NodeConfig.model_validate(
            {
                "server": {"url": "http://queue.test", "api_key": "obb_node_test"},
                "node": {**settings, "poll_seconds": 0.05, "drain_seconds": 5, **node},
                "models": models or [{"name": "echo", "backend": "echo"}],
            }
        )

        def build(model: Any, models_dir: Path) -> Backend:
            return (backends or {}).get(model.name) or build_backend(model, models_dir)

        return NodeRunner(config, client=server, backends=build)

    return make


async def until(check: Callable[[], Any], timeout: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
async def serving() -> AsyncIterator[Callable[[NodeRunner], Awaitable[asyncio.Task[int]]]]:
    """Start a runner in daemon mode; it is stopped at the end of the test."""
    tasks: list[tuple[NodeRunner, asyncio.Task[int]]] = []

    async def start(runner: NodeRunner) -> asyncio.Task[int]:
        task = asyncio.create_task(runner.run(install_signals=False))
        tasks.append((runner, task))
        await until(lambda: runner.node_id or task.done())
        return task

    yield start
    for runner, task in tasks:
        if not task.done():
            runner.stop()
            runner.stop()
        await asyncio.wait_for(task, 5)


def answer(result: JSON) -> str:
    return str(result["result"]["choices"][0]["message"]["content"])


# -- jobs ---------------------------------------------------------------------------------


async def test_a_job_runs_and_its_result_is_submitted_under_its_lease(
    server: FakeServer, make_runner: Make
) -> None:
    job = server.add("hello there")
    runner = make_runner()
    assert await runner.run(batch=True, install_signals=False) == 0
    result = server.results[job]
    assert result["lease_id"] == "lease_1"
    assert answer(result) == "hello there"
    assert result["result"]["object"] == "chat.completion"
    assert runner.totals.completed == 1
    assert server.closed and server.registrations == 1


async def test_a_transient_error_is_retried_then_the_job_succeeds(
    server: FakeServer, make_runner: Make
) -> None:
    flaky = ScriptedBackend(transient(), transient(), "third time lucky")
    job = server.add("x", model="flaky")
    runner = make_runner([{"name": "flaky", "backend": "echo"}], {"flaky": flaky})
    assert await runner.run(batch=True, install_signals=False) == 0
    assert answer(server.results[job]) == "third time lucky"
    assert flaky.calls == 3


async def test_a_permanent_error_fails_the_job(server: FakeServer, make_runner: Make) -> None:
    bad = ScriptedBackend(BackendError("no such thing", code="invalid_request", retryable=False))
    job = server.add("x", model="bad")
    runner = make_runner([{"name": "bad", "backend": "echo"}], {"bad": bad})
    assert await runner.run(batch=True, install_signals=False) == 0
    error = server.results[job]["error"]
    assert error == {"message": "no such thing", "code": "invalid_request", "retryable": False}
    assert bad.calls == 1


async def test_transient_errors_fail_the_job_after_max_attempts(
    server: FakeServer, make_runner: Make
) -> None:
    flaky = ScriptedBackend(transient(), transient(), "too late")
    job = server.add("x", model="flaky")
    model = {"name": "flaky", "backend": "echo", "max_attempts": 2}
    assert await make_runner([model], {"flaky": flaky}).run(batch=True, install_signals=False) == 0
    assert server.results[job]["error"]["code"] == "overloaded"
    assert server.results[job]["error"]["retryable"] is True
    assert flaky.calls == 2


async def test_a_generation_cut_at_timeout_seconds_fails_with_timeout(
    server: FakeServer, make_runner: Make
) -> None:
    hang = ScriptedBackend("hang")
    job = server.add("x", model="slow")
    model = {"name": "slow", "backend": "echo", "timeout_seconds": 0.05, "max_attempts": 1}
    assert await make_runner([model], {"slow": hang}).run(batch=True, install_signals=False) == 0
    error = server.results[job]["error"]
    assert (error["code"], error["retryable"]) == ("timeout", True)


async def test_a_crashing_backend_fails_the_job_not_the_node(
    server: FakeServer, make_runner: Make
) -> None:
    buggy = ScriptedBackend(RuntimeError("a bug"), "fine again")
    first, second = server.add("x", model="buggy"), server.add("y", model="buggy")
    runner = make_runner([{"name": "buggy", "backend": "echo"}], {"buggy": buggy})
    assert await runner.run(batch=True, install_signals=False) == 0
    error = server.results[first]["error"]
    assert error["code"] == "backend_error" and error["retryable"] is False
    assert "RuntimeError: a bug" in error["message"]
    assert answer(server.results[second]) == "fine again"


async def test_a_streamed_job_pushes_its_text_in_order(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    await serving(make_runner([{"name": "echo", "backend": "echo", "token_delay_ms": 20}]))
    job = server.add("one two three four", stream=True)
    await until(lambda: len(server.pieces) == 4)
    assert [e["index"] for e in server.pieces] == [0, 1, 2, 3]
    assert {(e["job_id"], e["lease_id"]) for e in server.pieces} == {(job, "lease_1")}
    await until(lambda: job in server.results)
    assert "".join(e["delta"] for e in server.pieces) == answer(server.results[job])


async def test_a_malformed_job_is_failed_and_the_node_goes_on(
    server: FakeServer, make_runner: Make, caplog: pytest.LogCaptureFixture
) -> None:
    server.add_raw({"id": "job_bad", "model": "echo", "endpoint": CHAT})  # no request
    server.add_raw(["not", "a", "job"])
    good = server.add("still serving")
    assert await make_runner().run(batch=True, install_signals=False) == 0
    assert server.results["job_bad"]["error"]["code"] == "malformed_job"
    assert answer(server.results[good]) == "still serving"
    assert len([r for r in caplog.records if r.message == "malformed job"]) == 2


# -- what the server says while a job runs ------------------------------------------------


@pytest.mark.parametrize("how", ["cancelled", "lost"])
async def test_the_heartbeat_stops_a_job_the_server_no_longer_wants(
    server: FakeServer, make_runner: Make, serving: Any, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "openbeepboop.node")
    hang = ScriptedBackend("hang")
    runner = make_runner([{"name": "slow", "backend": "echo"}], {"slow": hang})
    task = await serving(runner)
    job = server.add("x", model="slow")
    await until(hang.started.is_set)
    lease = server.lease_of(job)
    await until(
        lambda: any(lease in beat for beat in server.heartbeats)
    )  # the heartbeat keeps it alive
    if how == "cancelled":
        server.cancelled.add(job)
    else:
        server.lost.add(lease)
    await until(lambda: len(runner.running) == 0)
    assert [r.message for r in caplog.records if getattr(r, "job", None) == job][-1] == f"job {how}"
    runner.stop()
    assert await asyncio.wait_for(task, 3) == 0
    assert job not in server.results  # nothing sent for it


async def test_the_cancel_watch_stops_a_job_long_before_the_next_heartbeat(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    hang = ScriptedBackend("hang")
    runner = make_runner(
        [{"name": "slow", "backend": "echo"}], {"slow": hang}, heartbeat_seconds=60
    )
    task = await serving(runner)
    job = server.add("x", model="slow")
    await until(hang.started.is_set)
    await until(lambda: server.watches >= 1)
    server.cancelled.add(job)
    started = time.monotonic()
    await until(lambda: len(runner.running) == 0, timeout=1)
    assert time.monotonic() - started < 0.5
    assert server.heartbeats == []  # the watch, not a heartbeat
    runner.stop()
    assert await asyncio.wait_for(task, 3) == 0
    assert job not in server.results


async def test_jobs_starting_in_a_burst_share_a_few_watches(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    hang = ScriptedBackend(*["hang"] * 40)
    model = {"name": "slow", "backend": "echo", "concurrency": 40}
    runner = make_runner([model], {"slow": hang}, heartbeat_seconds=60)
    await serving(runner)
    for i in range(40):
        server.add(f"job {i}", model="slow")
        await asyncio.sleep(0.005)  # one by one, over 0.2 s
    await until(lambda: len(runner.running) == 40)
    last = max(runner.running, key=lambda j: int(j.split("_")[1]))
    server.cancelled.add(last)  # the last job to start is watched too
    await until(lambda: last not in runner.running, timeout=1)
    assert server.watches <= 5
    runner.stop()


async def test_without_the_watch_on_the_server_cancels_come_with_heartbeats(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    async def no_watch(node_id: str, leases: dict[str, str], wait: float) -> list[str]:
        server.watches += 1
        raise ServerRefused(404, "not_found", "Not Found")

    server.watch = no_watch  # type: ignore[method-assign]
    hang = ScriptedBackend("hang")
    runner = make_runner([{"name": "slow", "backend": "echo"}], {"slow": hang})
    task = await serving(runner)
    job = server.add("x", model="slow")
    await until(hang.started.is_set)
    await until(lambda: not runner.cancel_watch.supported)
    server.cancelled.add(job)
    await until(lambda: len(runner.running) == 0)
    assert server.watches == 1  # asked once, then left to the heartbeat
    runner.stop()
    assert await asyncio.wait_for(task, 3) == 0


async def test_a_result_waits_in_the_outbox_while_the_server_is_away(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    runner = make_runner()
    await serving(runner)
    server.unreachable.add("submit")
    job = server.add("kept safe")
    await until(lambda: server.failed_submits >= 2)  # tried, and tried again
    assert runner.totals.completed == 1
    assert len(runner.outbox) == 1 and job not in server.results

    server.unreachable.clear()
    await until(lambda: job in server.results)
    assert answer(server.results[job]) == "kept safe"
    await until(lambda: len(runner.outbox) == 0)


async def test_a_forgotten_node_registers_again_once(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    models = [{"name": "echo", "backend": "echo"}, {"name": "other", "backend": "echo"}]
    runner = make_runner(models)
    await serving(runner)
    server.forget()  # every loop (two fetches, heartbeats) meets node_not_registered
    await until(lambda: server.registrations == 2)
    job = server.add("welcome back")
    await until(lambda: job in server.results)
    await asyncio.sleep(0.2)  # a few heartbeats and polls more
    assert server.registrations == 2
    assert runner.node_id == "node_2"


# -- stopping ------------------------------------------------------------------------------


async def test_stop_lets_running_jobs_finish_within_drain_seconds(
    server: FakeServer, make_runner: Make, serving: Any
) -> None:
    model = {"name": "echo", "backend": "echo", "delay_ms": 200}
    runner = make_runner([model])
    task = await serving(runner)
    job = server.add("finish me")
    await until(lambda: len(runner.running) == 1)
    runner.stop()
    assert await asyncio.wait_for(task, 3) == 0
    assert answer(server.results[job]) == "finish me"


@pytest.mark.parametrize("signals", [1, 2])
async def test_stop_releases_what_does_not_finish(
    server: FakeServer, make_runner: Make, serving: Any, signals: int
) -> None:
    hang = ScriptedBackend("hang")
    drain = 0.3 if signals == 1 else 30
    runner = make_runner([{"name": "slow", "backend": "echo"}], {"slow": hang}, drain_seconds=drain)
    task = await serving(runner)
    job = server.add("x", model="slow")
    await until(hang.started.is_set)
    stopped = time.monotonic()
    for _ in range(signals):
        runner.stop()
    assert await asyncio.wait_for(task, 3) == 0
    took = time.monotonic() - stopped
    assert server.results[job]["error"]["code"] == "released"
    assert server.results[job]["error"]["retryable"] is True
    assert (0.3 <= took < 2) if signals == 1 else took < 1


async def test_batch_exits_once_the_queue_is_empty(server: FakeServer, make_runner: Make) -> None:
    jobs = [server.add(f"batch {i}") for i in range(5)]
    runner = make_runner([{"name": "echo", "backend": "echo", "concurrency": 2}])
    assert await asyncio.wait_for(runner.run(batch=True, install_signals=False), 5) == 0
    assert [answer(server.results[j]) for j in jobs] == [f"batch {i}" for i in range(5)]
    again = make_runner()
    assert await asyncio.wait_for(again.run(batch=True, install_signals=False), 2) == 0


async def test_batch_gives_up_when_the_server_is_unreachable(
    server: FakeServer, make_runner: Make
) -> None:
    server.unreachable.add("register")
    assert await make_runner().run(batch=True, install_signals=False) == 2


# -- the types at the edge ---------------------------------------------------------------


def test_a_leased_job_is_parsed_once_and_checked() -> None:
    raw = {
        "id": "job_1",
        "lease_id": "lease_1",
        "lease_expires_at": 1700000000.5,
        "lease_seconds": 60,
        "attempt": 2,
        "model": "m",
        "endpoint": CHAT,
        "request": {"model": "m", "stream": True},
    }
    job = LeasedJob.parse(raw)
    assert (job.id, job.lease_id, job.attempt, job.lease_seconds) == ("job_1", "lease_1", 2, 60.0)
    assert job.streamed
    with pytest.raises(MalformedJob) as bad:
        LeasedJob.parse({**raw, "attempt": "two"})
    assert (bad.value.job_id, bad.value.lease_id) == ("job_1", "lease_1")
    with pytest.raises(MalformedJob) as missing:
        LeasedJob.parse({"model": "m"})
    assert missing.value.job_id is None


def test_jobs_and_outcomes_cross_a_process_boundary() -> None:
    """What a worker-process executor would send: both pickle whole."""
    job = LeasedJob("job_1", "lease_1", "m", CHAT, {"messages": []}, attempt=1)
    outcome = Outcome.failed("boom", "backend_error", retryable=False)
    assert pickle.loads(pickle.dumps(job)) == job
    assert pickle.loads(pickle.dumps(outcome)) == outcome
