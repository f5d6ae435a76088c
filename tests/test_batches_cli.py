"""`openbeepboop-client batches` against a real server and a real echo node: status of
server batches (made with the openai SDK) and local runs (state files), cancel one, by
name prefix and all, results to a file, and one-line errors.

Batches meant to stay in progress use a model no node serves (`idle`): their lines wait
in the queue until cancelled."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openbeepboop.client import AsyncClient, JobTimeoutError, runs
from tests.conftest import ServerProcess, free_port
from tests.nodes import (
    Procs,
    auth,
    child_env,
    echo_model,
    get_job,
    new_server,
    node_id_of,
    start_node,
    submit_chat,
    wait_jobs,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

IDLE = "idle"  # no node serves it
SLOW = "slow"  # an echo model that takes 200 ms a job, one job at a time
COLUMNS = ["KIND", "ID", "NAME", "STATUS", "TOTAL", "COMPLETED", "FAILED", "PROGRESS", "CREATED"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("batches-cli")
    server = new_server(root / "server")
    procs = Procs()
    try:
        models = [echo_model(), echo_model(delay_ms=200, name=SLOW)]
        node_id_of(start_node(procs, write_config(root / "node.toml", server, models)))
        yield server
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


@pytest.fixture
def sdk(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0
    ) as client:
        yield client


def run(
    server: ServerProcess, state: Path, *args: str, stdin: int = subprocess.DEVNULL, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {
        "OPENBEEPBOOP_BASE_URL": server.url,
        "OPENBEEPBOOP_API_KEY": server.keys["client_key"],
        "OPENBEEPBOOP_STATE_DIR": str(state),
    }
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.client", "batches", *args],
        capture_output=True,
        text=True,
        env=child_env(**(base | env)),
        stdin=stdin,
        timeout=60,
        check=False,
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stdout


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# -- server batches and local runs ------------------------------------------------------------


def make_batch(sdk: openai.OpenAI, n: int, model: str = IDLE, name: str | None = None) -> str:
    lines = [
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"say {i}"}]},
            }
        )
        for i in range(n)
    ]
    upload = sdk.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"name": name} if name else None,
    )
    return batch.id


def batch_status(sdk: openai.OpenAI, batch_id: str, wanted: set[str]) -> Any:
    return wait_until(
        lambda: (b := sdk.batches.retrieve(batch_id)).status in wanted and b,
        30,
        f"batch {batch_id} to be one of {sorted(wanted)}",
    )


def write_run(
    state: Path,
    server: ServerProcess,
    name: str,
    jobs: list[str],
    done: dict[int, dict[str, Any]] | None = None,
    total: int | None = None,
) -> str:
    """A local run's state file as the batch runner writes it: the header, a request line
    per request, `submitted` per job, `done` for the finished ones."""
    run_id = "run_" + uuid.uuid4().hex[:12]
    total = len(jobs) if total is None else total
    header = {
        "object": "run",
        "version": 1,
        "id": run_id,
        "name": name,
        "created_at": time.time(),
        "base_url": server.url,
        "total": total,
        "input": None,
        "output": None,
        "metadata": {},
        "options": {},
    }
    lines: list[dict[str, Any]] = [header]
    for i in range(total):
        body = {"model": IDLE, "messages": [{"role": "user", "content": f"say {i}"}]}
        lines.append(
            {"request": i, "custom_id": f"q-{i}", "url": "/v1/chat/completions", "body": body}
        )
    lines += [{"submitted": i, "job": job} for i, job in enumerate(jobs)]
    for i, job in (done or {}).items():
        lines.append(
            {
                "done": i,
                "job": job["id"],
                "status": job["status"],
                "result": job.get("result"),
                "error": job.get("error"),
            }
        )
    if done and len(done) == total:
        lines.append({"event": "finished", "at": time.time(), "reason": None})
    state.mkdir(parents=True, exist_ok=True)
    path = state / f"{run_id}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_id


def idle_run(state: Path, server: ServerProcess, name: str, n: int = 2) -> tuple[str, list[str]]:
    """A run whose `n` jobs wait in the queue (nobody serves their model)."""
    jobs = [submit_chat(server, f"{name} {i}", model=IDLE) for i in range(n)]
    return write_run(state, server, name, jobs), jobs


def finished_run(state: Path, server: ServerProcess, name: str) -> str:
    """A run of two echo jobs that completed."""
    jobs = [submit_chat(server, f"{name} {i}") for i in range(2)]
    answered = wait_jobs(server, jobs, "completed", 30)
    return write_run(state, server, name, jobs, dict(enumerate(answered)))


def rows_by_id(out: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in json.loads(ok(out))}


# -- status ------------------------------------------------------------------------------


def test_status_lists_server_batches_and_local_runs(
    server: ServerProcess, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    done = make_batch(sdk, 3, model="echo", name="status-done")
    waiting = make_batch(sdk, 4, name="status-waiting")
    batch_status(sdk, done, {"completed"})
    batch_status(sdk, waiting, {"in_progress"})
    idle, _ = idle_run(tmp_path, server, "status-local", n=3)
    finished = finished_run(tmp_path, server, "status-finished")

    rows = rows_by_id(run(server, tmp_path, "status", "--json"))
    assert {done, waiting, idle, finished} <= set(rows)
    assert (rows[done]["kind"], rows[done]["name"]) == ("server", "status-done")
    assert rows[done]["status"] == "completed"
    assert (rows[done]["total"], rows[done]["completed"], rows[done]["failed"]) == (3, 3, 0)
    assert rows[done]["progress"] == 1.0
    assert (rows[waiting]["status"], rows[waiting]["total"], rows[waiting]["progress"]) == (
        "in_progress",
        4,
        0.0,
    )
    assert rows[idle]["kind"] == "local" and rows[idle]["status"] == "incomplete"
    assert (rows[idle]["total"], rows[idle]["completed"], rows[idle]["name"]) == (
        3,
        0,
        "status-local",
    )
    assert (rows[finished]["status"], rows[finished]["completed"], rows[finished]["progress"]) == (
        "finished",
        2,
        1.0,
    )

    table = ok(run(server, tmp_path, "status")).splitlines()
    assert table[0].split() == COLUMNS
    line = next(row for row in table if done in row).split()
    assert line[:8] == ["server", done, "status-done", "completed", "3", "3", "0", "100%"]
    line = next(row for row in table if idle in row).split()
    assert line[:8] == ["local", idle, "status-local", "incomplete", "3", "0", "0", "0%"]
    sdk.batches.cancel(waiting)


# -- cancel ------------------------------------------------------------------------------


def test_cancel_one_server_batch_and_one_local_run(
    server: ServerProcess, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    batch = make_batch(sdk, 3, name="one")
    other = make_batch(sdk, 2, name="other")
    batch_status(sdk, batch, {"in_progress"})
    run_id, jobs = idle_run(tmp_path, server, "my-eval")

    out = ok(run(server, tmp_path, "cancel", batch))
    assert out.split()[0] == batch and out.split()[1] in ("cancelling", "cancelled")
    assert batch_status(sdk, batch, {"cancelled"}).request_counts.failed == 3

    out = ok(run(server, tmp_path, "cancel", "my-eval"))  # by its name
    assert out.strip() == f"{run_id} (my-eval) cancelled (2 job(s) stopped)"
    assert {get_job(server, j)["status"] for j in jobs} == {"cancelled"}
    state = (tmp_path / f"{run_id}.jsonl").read_text().splitlines()
    assert json.loads(state[-1])["event"] == "cancelled"
    (row,) = [
        r for r in json.loads(ok(run(server, tmp_path, "status", "--json"))) if r["id"] == run_id
    ]
    assert (row["status"], row["completed"], row["failed"]) == ("cancelled", 0, 2)
    errors = [
        json.loads(x)["error"]
        for x in ok(run(server, tmp_path, "results", run_id)).split("\n")
        if x
    ]
    assert [e["code"] for e in errors] == ["cancelled", "cancelled"]

    again = ok(run(server, tmp_path, "cancel", run_id[:10]))  # a unique prefix of its id
    assert again.strip() == f"{run_id} is already cancelled"
    assert sdk.batches.retrieve(other).status == "in_progress"  # untouched
    sdk.batches.cancel(other)


def test_cancel_by_prefix_cancels_exactly_the_matching_ones(
    server: ServerProcess, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    hit = [make_batch(sdk, 2, name="sweep-a-1"), make_batch(sdk, 2, name="sweep-a-2")]
    miss = [make_batch(sdk, 2, name="sweep-b-1"), make_batch(sdk, 2)]
    for batch in hit + miss:
        batch_status(sdk, batch, {"in_progress"})
    local_hit, hit_jobs = idle_run(tmp_path, server, "sweep-a-local")
    local_miss, miss_jobs = idle_run(tmp_path, server, "sweep-b-local")

    for empty in ("", "  "):  # not "everything": that is --all, which asks
        said_empty = one_line_error(run(server, tmp_path, "cancel", "--prefix", empty), 2)
        assert "--prefix must not be empty" in said_empty
    asks = one_line_error(run(server, tmp_path, "cancel", "--prefix", "sweep-a"), 2)
    assert "matches 3" in asks and "--yes" in asks  # several: asks, and without a terminal refuses
    assert {sdk.batches.retrieve(b).status for b in hit} == {"in_progress"}

    out = run(server, tmp_path, "cancel", "--prefix", "sweep-a", "--yes", "--json")
    said = {row["id"]: row for row in json.loads(ok(out))}
    assert set(said) == {*hit, local_hit}
    assert "3 matched" in out.stderr and "sweep-a-local" in out.stderr
    for batch in hit:
        assert batch_status(sdk, batch, {"cancelled"}).status == "cancelled"
    assert {get_job(server, j)["status"] for j in hit_jobs} == {"cancelled"}

    assert {sdk.batches.retrieve(b).status for b in miss} == {"in_progress"}
    assert {get_job(server, j)["status"] for j in miss_jobs} == {"queued"}
    rows = rows_by_id(run(server, tmp_path, "status", "--json"))
    assert (rows[local_hit]["status"], rows[local_miss]["status"]) == ("cancelled", "incomplete")

    nothing = one_line_error(run(server, tmp_path, "cancel", "--prefix", "no-such-sweep"), 5)
    assert "no-such-sweep" in nothing
    for batch in miss:
        sdk.batches.cancel(batch)


def test_cancel_all_asks_and_refuses_without_a_terminal(
    server: ServerProcess, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    batches = [make_batch(sdk, 2, name="all-1"), make_batch(sdk, 2)]
    for batch in batches:
        batch_status(sdk, batch, {"in_progress"})
    run_id, jobs = idle_run(tmp_path, server, "all-local")
    finished = finished_run(tmp_path, server, "all-finished")

    refused = one_line_error(run(server, tmp_path, "cancel", "--all"), 2)
    assert "--yes" in refused
    assert {sdk.batches.retrieve(b).status for b in batches} == {"in_progress"}
    assert {get_job(server, j)["status"] for j in jobs} == {"queued"}

    typed, terminal = pty.openpty()
    os.write(typed, b"n\n")  # typed ahead: the answer to the question
    try:
        declined = run(server, tmp_path, "cancel", "--all", stdin=terminal)
    finally:
        os.close(typed)
        os.close(terminal)
    assert declined.returncode == 1 and "cancel them all? [y/N]" in declined.stderr
    assert "all-local" in declined.stderr and "Aborted" in declined.stderr
    assert {sdk.batches.retrieve(b).status for b in batches} == {"in_progress"}

    out = run(server, tmp_path, "cancel", "--all", "--yes")
    assert {batches[0], batches[1], run_id} <= {line.split()[0] for line in ok(out).splitlines()}
    assert finished not in out.stdout  # already final: not touched
    for batch in batches:
        batch_status(sdk, batch, {"cancelled"})
    assert {get_job(server, j)["status"] for j in jobs} == {"cancelled"}
    rows = json.loads(ok(run(server, tmp_path, "status", "--json")))
    assert [
        r["id"] for r in rows if r["status"] in ("validating", "in_progress", "incomplete")
    ] == []

    nothing = run(server, tmp_path, "cancel", "--all")
    assert ok(nothing) == "" and "nothing to cancel" in nothing.stderr


# -- results and errors ------------------------------------------------------------------------


def test_results_to_a_file_and_to_stdout(
    server: ServerProcess, sdk: openai.OpenAI, tmp_path: Path
) -> None:
    batch = make_batch(sdk, 3, model="echo", name="results")
    batch_status(sdk, batch, {"completed"})
    target = tmp_path / "out.jsonl"
    out = run(server, tmp_path, "results", batch, "-o", str(target))
    assert ok(out) == "" and str(target) in out.stderr
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == ["req-0", "req-1", "req-2"]
    for line in lines:
        n = line["custom_id"].removeprefix("req-")
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"say {n}"
    by_name = run(server, tmp_path, "results", "results", "-o", "-")  # by its metadata name
    assert ok(by_name) == target.read_text()
    nowhere = str(tmp_path / "missing" / "out.jsonl")
    assert "cannot write" in one_line_error(
        run(server, tmp_path, "results", batch, "-o", nowhere), 2
    )

    finished = finished_run(tmp_path, server, "results-local")
    local = [
        json.loads(line)
        for line in ok(run(server, tmp_path, "results", "results-local")).splitlines()
    ]
    assert [line["custom_id"] for line in local] == ["q-0", "q-1"]
    assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in local] == [
        "results-local 0",
        "results-local 1",
    ]
    assert all(line["error"] is None for line in local) and finished.startswith("run_")


def test_errors_are_one_line(server: ServerProcess, sdk: openai.OpenAI, tmp_path: Path) -> None:
    for args in (("cancel", "batch_nope"), ("results", "nope"), ("resume", "run_nope")):
        assert "nope" in one_line_error(run(server, tmp_path, *args), 5)
    for name in ("twin-a", "twin-b"):
        write_run(tmp_path, server, name, [])
    ambiguous = one_line_error(run(server, tmp_path, "cancel", "run_"), 5)
    assert "'run_' is the start of 2 run ids" in ambiguous

    # a state file naming another server: the key is not sent there, --base-url is asked
    planted = write_run(tmp_path, server, "planted", ["job_planted"])
    path = tmp_path / f"{planted}.jsonl"
    elsewhere = f"http://127.0.0.1:{free_port()}"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines = [{**x, "server": elsewhere} if "submitted" in x else x for x in lines]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    refused = one_line_error(run(server, tmp_path, "cancel", planted), 2)
    assert f"names the server {elsewhere}" in refused and f"--base-url {elsewhere}" in refused

    waiting = make_batch(sdk, 2, name="errors")
    batch_status(sdk, waiting, {"in_progress"})
    assert "no results yet" in one_line_error(run(server, tmp_path, "results", waiting), 1)
    assert "cannot be resumed" in one_line_error(run(server, tmp_path, "resume", waiting), 2)
    sdk.batches.cancel(waiting)


def test_status_without_the_server_still_lists_local_runs(
    server: ServerProcess, tmp_path: Path
) -> None:
    run_id = write_run(tmp_path, server, "offline", [])
    out = run(server, tmp_path, "status", OPENBEEPBOOP_BASE_URL=f"http://127.0.0.1:{free_port()}")
    assert "cannot reach" in one_line_error(out, 3)
    assert run_id in out.stdout and "offline" in out.stdout


# -- resume ------------------------------------------------------------------------------


def test_resume_finishes_an_interrupted_run_asking_each_request_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    prompts = [f"resume {i}" for i in range(8)]
    requests = [{"prompt": p, "custom_id": f"r-{i}"} for i, p in enumerate(prompts)]

    async def interrupted() -> None:
        async with AsyncClient(server.url, server.keys["client_key"]) as client:
            with pytest.raises(JobTimeoutError):  # the run stops waiting; its jobs go on
                await runs.run_batched(
                    client,
                    requests,
                    name="resume-me",
                    model=SLOW,
                    state_dir=tmp_path,
                    max_outstanding=2,  # the rest is submitted by the resumed session
                    wait_s=0.3,
                )

    asyncio.run(interrupted())
    rows = json.loads(ok(run(server, tmp_path, "status", "--json")))
    (before,) = [row for row in rows if row["kind"] == "local"]
    assert (before["name"], before["status"], before["total"]) == ("resume-me", "incomplete", 8)
    assert before["completed"] < 4
    earlier = {
        line["custom_id"]: line["id"]
        for line in runs.run_results(runs.find_run("resume-me", tmp_path))
    }

    out = run(server, tmp_path, "resume", "resume-me", "--heartbeat", "0.2")
    assert ok(out).strip() == f"{before['id']} finished: 8 completed, 0 failed of 8"
    assert re.search(r"\d/8 done, 0 failed, \d+ in flight, [\d.]+/s, ETA", out.stderr), out.stderr
    assert "finished: 8 completed, 0 failed of 8" in out.stderr

    lines = [
        json.loads(x) for x in ok(run(server, tmp_path, "results", before["id"][:8])).splitlines()
    ]
    assert [x["custom_id"] for x in lines] == [f"r-{i}" for i in range(8)]
    answers = [x["response"]["body"]["choices"][0]["message"]["content"] for x in lines]
    assert answers == prompts
    assert len({x["id"] for x in lines}) == 8  # eight jobs, one per request
    stats = httpx.get(
        server.url + "/v1/stats", headers=auth(server.keys["client_key"]), timeout=10
    ).json()
    assert sum(stats["models"][SLOW].values()) == 8  # and no other job was made for them
    assert all(earlier[x["custom_id"]] == x["id"] for x in lines if x["custom_id"] in earlier)

    again = run(server, tmp_path, "resume", "resume-me")
    assert "nothing to resume" in again.stderr and again.returncode == 0


def test_openai_variables_and_their_key_rule(server: ServerProcess, tmp_path: Path) -> None:
    """OPENAI_BASE_URL and OPENAI_API_KEY stand in for the OPENBEEPBOOP_ ones; that key
    goes only to the server OPENAI_BASE_URL names."""
    openai_env = {
        "OPENBEEPBOOP_BASE_URL": "",
        "OPENBEEPBOOP_API_KEY": "",
        "OPENBEEPBOOP_DATA_DIR": str(tmp_path / "no-local-key"),
        "OPENAI_BASE_URL": server.url + "/v1",
        "OPENAI_API_KEY": server.keys["client_key"],
    }
    assert isinstance(json.loads(ok(run(server, tmp_path, "status", "--json", **openai_env))), list)
    elsewhere = openai_env | {"OPENBEEPBOOP_BASE_URL": server.url}
    one_line_error(run(server, tmp_path, "status", **elsewhere), 4)
