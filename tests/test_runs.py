"""The batch runner (`client.run_batched`, `openbeepboop.client.runs`) against a real
server and a real echo node: a run killed with SIGKILL at half and resumed answers every
request once; early abort after `max_failures`; heartbeat lines on schedule; results in
input order or as completed; one AsyncClient across `asyncio.run()` calls."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openbeepboop.client import APIConnectionError, AsyncClient, Client
from openbeepboop.client.runs import (
    RunAbortedError,
    find_run,
    list_runs,
    outstanding_jobs,
    resume_run,
    run_results,
)
from tests.conftest import ServerProcess, free_port
from tests.nodes import echo_model, new_server, with_node

pytestmark = pytest.mark.slow

SLOW_MS = 150


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with one echo node: `echo` (instant, 64 at once) and `slow`."""
    tmp = tmp_path_factory.mktemp("runs")
    server = new_server(tmp / "server")
    models = [
        echo_model(0, concurrency=64),
        echo_model(SLOW_MS, name="slow", concurrency=4),
    ]
    try:
        with with_node(server, tmp / "node", models):
            yield server
    finally:
        server.kill(signal.SIGTERM)


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "runs"
    monkeypatch.setenv("OPENBEEPBOOP_STATE_DIR", str(directory))
    for name in ("MAX_OUTSTANDING", "BATCH_NUM_WORKERS", "RPM", "TIMEOUT_S", "MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    return directory


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, server.keys["client_key"]) as client:
        yield client


def job_count(server: ServerProcess) -> int:
    headers = {"Authorization": f"Bearer {server.keys['client_key']}"}
    r = httpx.get(server.url + "/v1/stats", headers=headers, timeout=10)
    r.raise_for_status()
    return sum(r.json()["jobs"].values())


def state_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


KILLED = """
import sys
from openbeepboop.client import Client

url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client(url, key) as client:
    client.run_batched([f"question {i}" for i in range(n)], model="echo", name="half",
                       max_outstanding=200, heartbeat_s=0.5)
"""


def test_a_run_killed_at_half_resumes_and_answers_each_request_once(
    server: ServerProcess, client: Client, runs_dir: Path
) -> None:
    total = 2000
    before = job_count(server)
    argv = [sys.executable, "-c", KILLED, server.url, server.keys["client_key"], str(total)]
    proc = subprocess.Popen(argv, env=os.environ.copy(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        done = 0
        while done < total // 2:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run did not get to half"
            paths = list(runs_dir.glob("run_*.jsonl"))
            done = paths[0].read_bytes().count(b'\n{"done"') if paths else 0
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    (path,) = runs_dir.glob("run_*.jsonl")
    killed = find_run("half")
    assert killed.status == "incomplete" and total // 2 <= killed.done < total

    outcome = client.run_batched(
        [f"question {i}" for i in range(total)], model="echo", name="half", heartbeat_s=0.5
    )

    assert outcome.run.id == killed.id and outcome.run.status == "finished"
    assert [r.text for r in outcome] == [f"question {i}" for i in range(total)]
    assert outcome.completed == total and [r.index for r in outcome] == list(range(total))
    assert job_count(server) - before == total  # each request became exactly one job
    lines = state_lines(path)
    assert sum(1 for line in lines if line.get("object") == "run") == 1
    done_lines = Counter(line["done"] for line in lines if "done" in line)
    assert set(done_lines) == set(range(total)) and set(done_lines.values()) == {1}
    jobs = {line["job"] for line in lines if "done" in line}
    assert len(jobs) == total
    assert [x["custom_id"] for x in run_results(outcome.run)][:2] == ["request-0", "request-1"]
    assert list_runs()[0].id == killed.id and outstanding_jobs(outcome.run) == []


def test_early_abort_after_max_failures_cancels_what_is_out(client: Client, runs_dir: Path) -> None:
    # the echo node fails every one of these jobs: it refuses a `dimensions` beyond its maximum
    bad = {"url": "/v1/embeddings", "body": {"model": "echo", "input": "x", "dimensions": 10**6}}
    requests = [{"custom_id": f"bad-{i}", **bad} for i in range(300)]
    with pytest.raises(RunAbortedError) as aborted:
        client.run_batched(requests, max_failures=5, max_outstanding=20, num_workers=1)
    outcome = aborted.value.outcome
    assert outcome.failed >= 5 and outcome.completed == 0
    assert "jobs failed (max_failures=5)" in str(aborted.value)
    assert outcome[0].error and outcome[0].error["param"] == "dimensions"
    run = find_run(outcome.run.id)
    assert run.status == "aborted" and run.submitted <= 40 < run.total
    assert outstanding_jobs(run) == []  # every job it had out was cancelled and recorded
    statuses = {r.status for r in outcome}
    assert statuses <= {"failed", "cancelled"}


def test_heartbeat_lines_come_on_schedule(
    client: Client, runs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openbeepboop.client.runs")
    requests = [
        {"model": "slow", "messages": [{"role": "user", "content": f"{i}"}]} for i in range(24)
    ]
    began = time.time()
    client.run_batched(requests, heartbeat_s=0.2, max_outstanding=8)
    beats = [r for r in caplog.records if " in flight, " in r.getMessage()]
    assert len(beats) >= 3, [r.getMessage() for r in caplog.records]
    times = [began, *(r.created for r in beats)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.17 < sum(gaps) / len(gaps) < 0.25 and all(0.08 < g < 0.4 for g in gaps), gaps
    first = beats[0].getMessage()
    assert "/24 done, 0 failed, " in first and "/s, ETA " in first


def test_an_unreachable_server_is_one_clear_error_and_the_run_stays_resumable(
    runs_dir: Path,
) -> None:
    nowhere = Client(f"http://127.0.0.1:{free_port()}", "key", max_retries=0)
    with nowhere, pytest.raises(APIConnectionError, match="cannot reach"):
        nowhere.run_batched(["hello"], model="echo", name="nowhere")
    assert find_run("nowhere").status == "incomplete"


def test_results_in_input_order_or_as_completed(client: Client, runs_dir: Path) -> None:
    slow = [
        {"model": "slow", "messages": [{"role": "user", "content": f"slow {i}"}]} for i in range(4)
    ]
    fast = [f"fast {i}" for i in range(20)]
    requests = [*slow, *fast]

    as_completed = [r.text for r in client.iter_batched(requests, model="echo", name="a")]
    assert sorted(as_completed) == sorted([f"slow {i}" for i in range(4)] + fast)
    assert as_completed.index("fast 19") < as_completed.index("slow 0")

    ordered = client.run_batched(requests, model="echo", name="b")
    assert [r.text for r in ordered] == [f"slow {i}" for i in range(4)] + fast
    in_order = [r.text for r in client.iter_batched(requests, model="echo", name="c", ordered=True)]
    assert in_order == [r.text for r in ordered]
    unordered = client.run_batched(requests, model="echo", name="d", ordered=False)
    assert unordered[0].text.startswith("fast")


def test_a_run_waited_for_too_briefly_resumes_from_its_state_file(
    server: ServerProcess, client: Client, runs_dir: Path
) -> None:
    requests = [
        {"model": "slow", "messages": [{"role": "user", "content": f"{i}"}]} for i in range(12)
    ]
    with pytest.raises(TimeoutError):
        client.run_batched(requests, name="brief", wait_s=0.2)
    run = find_run("brief")
    assert run.status == "incomplete" and run.done < 12

    async def resume() -> Any:
        async with AsyncClient(server.url, server.keys["client_key"]) as again:
            return await resume_run(again, run)

    outcome = asyncio.run(resume())
    assert [r.text for r in outcome] == [str(i) for i in range(12)]
    assert find_run("brief").status == "finished"


def test_one_async_client_across_repeated_asyncio_run(
    server: ServerProcess, runs_dir: Path
) -> None:
    client = AsyncClient(server.url, server.keys["client_key"])
    used: list[httpx.AsyncClient] = []

    async def one_round(n: int) -> list[str | None]:
        used.append(await client.http())
        job = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"round {n}"}]
        )
        await job.get(wait=True, timeout=30)
        outcome = await client.run_batched([f"{n}-{i}" for i in range(30)], model="echo")
        return [job.result.choices[0].message.content, *(r.text for r in outcome)]

    for n in range(3):
        answers = asyncio.run(one_round(n))
        assert answers == [f"round {n}", *(f"{n}-{i}" for i in range(30))]
    assert len({id(h) for h in used}) == 3  # one HTTP client per loop...
    assert all(h.is_closed for h in used)  # ...closed with its loop


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "openbeepboop.cli.client", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_cli_file_run_from_openai_variables_with_heartbeats_on_stderr(
    server: ServerProcess, tmp_path: Path
) -> None:
    requests = tmp_path / "q.jsonl"
    requests.write_text("".join(f"prompt {i}\n" for i in range(16)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBEEPBOOP_", "OPENAI_"))}
    env |= {"OPENBEEPBOOP_STATE_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env["OPENBEEPBOOP_DATA_DIR"] = str(tmp_path / "no-saved-key")
    openai = {"OPENAI_BASE_URL": server.url + "/v1", "OPENAI_API_KEY": server.keys["client_key"]}

    out = cli(
        "submit",
        "--file",
        str(requests),
        "--heartbeat",
        "0.2",
        env={**env, **openai, "OPENAI_MODEL": "slow"},
    )
    assert out.returncode == 0, out.stderr
    beats = [line for line in out.stderr.splitlines() if " in flight, " in line]
    assert len(beats) >= 2 and "/16 done, 0 failed" in beats[0], out.stderr
    lines = [json.loads(x) for x in (tmp_path / "q.results.jsonl").read_text().splitlines()]
    assert sorted(x["response"]["body"]["model"] for x in lines) == ["slow"] * 16
    assert find_run("q.jsonl", tmp_path / "runs").status == "finished"

    # the OpenAI key is not sent to a server named by OPENBEEPBOOP_BASE_URL: refused, exit 4
    elsewhere = {**env, **openai, "OPENBEEPBOOP_BASE_URL": server.url}
    refused = cli("models", env=elsewhere)
    assert refused.returncode == 4 and "OPENBEEPBOOP_API_KEY" in refused.stderr
    assert server.keys["client_key"] not in refused.stderr


def test_leaving_the_loop_early_stops_the_run_and_the_same_call_finishes_it(
    server: ServerProcess, client: Client, runs_dir: Path
) -> None:
    requests = [
        {"model": "slow", "messages": [{"role": "user", "content": f"{i}"}]} for i in range(16)
    ]
    before = job_count(server)
    for _ in client.iter_batched(requests, name="left", max_outstanding=4, num_workers=1):
        break
    stopped = find_run("left")
    assert stopped.status == "incomplete" and stopped.submitted <= 8
    time.sleep(2 * SLOW_MS / 1000)
    assert job_count(server) - before == stopped.submitted  # nothing sent after the break
    outcome = client.run_batched(requests, name="left")
    assert [r.text for r in outcome] == [str(i) for i in range(16)]
    assert job_count(server) - before == 16


def test_an_aborted_run_resumes_and_runs_what_the_abort_cancelled(
    client: Client, runs_dir: Path
) -> None:
    bad = {"url": "/v1/embeddings", "body": {"model": "echo", "input": "x", "dimensions": 10**6}}
    good = [{"model": "slow", "messages": [{"role": "user", "content": f"g{i}"}]} for i in range(8)]
    requests = [bad, bad, bad, *good[:4], bad, *good[4:]]
    with pytest.raises(RunAbortedError) as aborted:
        client.run_batched(requests, name="mixed", max_failures=3, max_outstanding=8, num_workers=1)
    outcome = aborted.value.outcome
    # the reason counts real failures only; what the abort cancelled is not a result
    assert outcome.failed >= 3 and {r.status for r in outcome} == {"failed"}
    assert f"{outcome.failed} jobs failed (max_failures=3)" in str(aborted.value)
    run = find_run("mixed")
    withdrawn = [line for line in state_lines(run.path) if "withdrawn" in line]
    assert withdrawn and outstanding_jobs(run) == []
    assert run.done == outcome.failed  # withdrawn requests are not done

    again = client.run_batched(requests, name="mixed", max_failures=0, max_outstanding=8)
    assert again.run.id == run.id and again.run.status == "finished"
    texts = {r.index: r.text for r in again if r.ok}
    good_at = [i for i, r in enumerate(requests) if r is not bad]
    assert [texts.get(i) for i in good_at] == [f"g{i}" for i in range(8)]
    rerun = {r.job_id for r in again if r.index in {w["withdrawn"] for w in withdrawn}}
    assert rerun.isdisjoint(w["job"] for w in withdrawn)  # new jobs, under new keys


def test_rpm_submits_what_the_limiter_grants_and_a_stop_does_not_wait_for_it(
    client: Client, runs_dir: Path
) -> None:
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        client.run_batched(
            [f"r {i}" for i in range(20)], model="echo", name="rpm", rpm=10, wait_s=2
        )
    assert time.monotonic() - began < 4  # not the minute 20 tokens take
    run = find_run("rpm")
    assert run.submitted == run.done == 10  # the 10 the limiter grants at once


def test_windows_are_shared_out_and_never_exceed_max_outstanding(runs_dir: Path) -> None:
    from collections import deque

    from openbeepboop.client.run_engine import Session, _Engine
    from openbeepboop.client.run_state import RunRecord, RunWriter
    from openbeepboop.client.run_types import RunOptions

    path = runs_dir / "run_windows.jsonl"
    for most, workers, windows in [(2, 4, [1, 1]), (10, 4, [3, 3, 2, 2]), (7, 1, [7])]:
        options = RunOptions(max_outstanding=most, num_workers=workers)
        record = RunRecord(path, {"id": "run_windows"})
        session = Session(
            AsyncClient("http://127.0.0.1:9", "key"), record, options, RunWriter(path)
        )
        engine = _Engine(session, deque(), asyncio.Queue())
        session.writer.close()
        assert engine.windows == windows and len(engine.mine) == len(windows)


def test_a_state_file_naming_another_server_is_refused(client: Client, runs_dir: Path) -> None:
    requests = [
        {"model": "slow", "messages": [{"role": "user", "content": f"{i}"}]} for i in range(8)
    ]
    with pytest.raises(TimeoutError):
        client.run_batched(requests, name="planted", wait_s=0.05)
    run = find_run("planted")
    assert outstanding_jobs(run)
    elsewhere = f"http://127.0.0.1:{free_port()}"
    lines = state_lines(run.path)
    for line in lines:
        if "submitted" in line:
            line["server"] = elsewhere
    run.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ValueError, match=f"is on {elsewhere}.*--base-url {elsewhere}"):
        client.run_batched(requests, name="planted")


def test_a_cache_hit_is_not_reused_and_cache_refresh_runs_again(
    client: Client, runs_dir: Path
) -> None:
    requests = [
        {"model": "echo", "temperature": 0, "messages": [{"role": "user", "content": f"c{i}"}]}
        for i in range(3)
    ]
    first = client.run_batched(requests, name="cache-1")
    assert first.completed == 3 and not any(r.reused for r in first)
    hits = client.run_batched(requests, name="cache-2")  # a new run: new keys, cache hits
    assert all(client.jobs.get(str(r.job_id)).cached for r in hits)
    assert not any(r.reused for r in hits)  # answered by the cache now, not an earlier run
    fresh = client.run_batched(requests, name="cache-3", cache="refresh")
    assert fresh.completed == 3 and not any(client.jobs.get(str(r.job_id)).cached for r in fresh)
    with pytest.raises(ValueError, match="cache must be one of use, skip, refresh"):
        client.run_batched(requests, name="cache-4", cache="sometimes")


def test_an_abort_cancelled_done_line_of_an_older_runner_is_not_done(runs_dir: Path) -> None:
    from openbeepboop.client.run_state import load

    path = runs_dir / "run_older.jsonl"
    runs_dir.mkdir()
    aborted = {"code": "run_aborted", "message": "cancelled: the run gave up"}
    lines = [
        {"object": "run", "id": "run_older", "total": 2},
        *(
            {
                "request": i,
                "custom_id": f"q{i}",
                "url": "/v1/embeddings",
                "body": {},
                "key": f"k{i}",
            }
            for i in range(2)
        ),
        {"submitted": 0, "job": "job_a", "server": ""},
        {"submitted": 1, "job": "job_b", "server": ""},
        {"done": 0, "job": "job_a", "status": "failed", "result": None, "error": {"code": "x"}},
        {"done": 1, "job": "job_b", "status": "cancelled", "result": None, "error": aborted},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = load(path)
    assert list(record.done) == [0] and list(record.submitted) == [0]
    assert (record.key(0), record.key(1)) == ("k0", "k1-r1")
