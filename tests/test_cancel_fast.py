"""Cancel within a second: a real server and a real echo node whose heartbeats are 20 s
apart, so that only the node's cancel watch (`/internal/queue/watch`) can stop a job in
time. A job cancelled mid-generation must free its model (concurrency 1) fast enough for
the job queued behind it to start within 1.5 s of the cancel, whether the job was
pushing pieces or not; and Ctrl+C on `openbeepboop-client submit --stream` cancels."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Proc,
    Procs,
    cancel_job,
    child_env,
    echo_model,
    get_job,
    log_events,
    new_server,
    node_id_of,
    start_node,
    submit_chat,
    wait_jobs,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]

LONG = " ".join(f"w{i}" for i in range(400))  # 400 words at 50 ms: 20 s of streaming
DROPPED_WITHIN = 1.5  # seconds from the cancel to the next job's start


class Rig:
    def __init__(self, server: ServerProcess, node: Proc) -> None:
        self.server, self.node = server, node


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    base = tmp_path_factory.mktemp("cancel")
    server = new_server(base / "data")
    procs = Procs()
    models = [
        echo_model(name="slow", token_delay_ms=50, concurrency=1),
        echo_model(name="whole", delay_ms=30_000, concurrency=1),  # silent for 30 s
    ]
    # heartbeats every 20 s (a third of the 60 s lease): they cannot be what stops a job
    config = write_config(base / "node.toml", server, models, heartbeat_seconds=30)
    try:
        node = start_node(procs, config)
        node_id_of(node)
        yield Rig(server, node)
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


def started_after_cancel(rig: Rig, model: str, content: str, *, stream: bool) -> float:
    """Run a job of `model`, cancel it mid-way with another queued behind it; return the
    seconds from the cancel's answer to the next job's start. Both end cancelled."""
    running = submit_chat(rig.server, content, model=model, stream=stream)
    wait_jobs(rig.server, [running], "in_progress", timeout=10)
    behind = submit_chat(rig.server, "next", model=model)
    time.sleep(0.3)  # the generation is well under way (pieces pushed, for "slow")
    assert get_job(rig.server, behind)["status"] == "queued"
    assert cancel_job(rig.server, running)["status"] == "cancelled"
    cancelled_at = time.monotonic()
    wait_jobs(rig.server, [behind], {"in_progress", "completed"}, timeout=5)
    elapsed = time.monotonic() - cancelled_at
    assert log_events(rig.node, "job cancelled", running)
    cancel_job(rig.server, behind)
    done = get_job(rig.server, running)
    assert done["status"] == "cancelled" and done["result"] is None
    return elapsed


def test_a_generating_job_stops_within_a_second_of_its_cancel(rig: Rig) -> None:
    elapsed = started_after_cancel(rig, "slow", LONG, stream=True)
    assert elapsed < DROPPED_WITHIN, elapsed


def test_a_job_that_pushes_nothing_stops_as_fast(rig: Rig) -> None:
    elapsed = started_after_cancel(rig, "whole", "silent until the end", stream=False)
    assert elapsed < DROPPED_WITHIN, elapsed


# -- Ctrl+C on the client ----------------------------------------------------------------


def client(rig: Rig, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    env = child_env(
        OPENBEEPBOOP_BASE_URL=rig.server.url,
        OPENBEEPBOOP_API_KEY=rig.server.keys["client_key"],
    )
    out, err = tmp_path / "client.out", tmp_path / "client.err"
    argv = [sys.executable, "-m", "openbeepboop.cli.client", "submit", *args]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env), out, err


def interrupted(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def job_id_in(err: Path) -> str:
    text = err.read_text()
    return text.split("queued ", 1)[1].split()[0].rstrip(";")


def test_ctrl_c_on_a_streaming_submit_cancels_the_job(rig: Rig, tmp_path: Path) -> None:
    proc, out, err = client(rig, tmp_path, LONG, "--model", "slow", "--stream")
    wait_until(lambda: "w3" in out.read_text(), 15, "the first tokens")
    job_id = job_id_in(err)
    assert interrupted(proc) == 130
    said = err.read_text()
    assert f"cancelled {job_id}" in said and "Traceback" not in said, said
    assert get_job(rig.server, job_id)["status"] == "cancelled"
    wait_until(lambda: log_events(rig.node, "job cancelled", job_id), 1.5, "the node to stop")


def test_ctrl_c_while_waiting_leaves_the_job_running(rig: Rig, tmp_path: Path) -> None:
    proc, _, err = client(rig, tmp_path, LONG, "--model", "slow", "--wait")
    wait_until(lambda: "queued " in err.read_text(), 15, "the job to be queued")
    job_id = job_id_in(err)
    wait_jobs(rig.server, [job_id], "in_progress", timeout=10)
    assert interrupted(proc) == 130
    said = err.read_text()
    assert f"{job_id} keeps running; cancel it with openbeepboop-client cancel {job_id}" in said
    assert "Traceback" not in said, said
    assert get_job(rig.server, job_id)["status"] == "in_progress"
    cancel_job(rig.server, job_id)
