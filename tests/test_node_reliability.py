"""Node reliability with real processes and real signals (echo backend): a node killed
mid-job, the server away while results wait, a node restarted with results in its
outbox, SIGTERM drain, batch vs run, cancellation, and logs without prompts."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Proc,
    Procs,
    answer,
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

ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that leave it running: each gives its node models of
    its own, so that no test's node takes (or waits on) another test's jobs."""
    server = new_server(tmp_path_factory.mktemp("reliability") / "server")
    yield server
    server.kill(signal.SIGTERM)


def completed_count(node: Proc) -> int:
    return len(log_events(node, "job completed"))


def assert_no_prompt(node: Proc, *texts: str) -> None:
    logs = node.stdout() + node.stderr()
    for text in texts:
        assert text not in logs, f"prompt text {text!r} in the node's logs"


def outbox_rows(state_dir: Path) -> int:
    files = sorted(state_dir.glob("outbox-*.db"))
    assert files, f"no outbox in {state_dir}"
    total = 0
    for f in files:
        with sqlite3.connect(f) as db:
            total += int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
    return total


# -- a node dies mid-job ---------------------------------------------------------------


def test_job_of_a_killed_node_is_finished_by_another(
    server_process: ServerFactory, procs: Procs, tmp_path: Path
) -> None:
    server = server_process(
        OPENBEEPBOOP_LEASE_SECONDS="2", OPENBEEPBOOP_REAPER_INTERVAL_SECONDS="0.2"
    )
    nodes: dict[str, Proc] = {}
    for name in ("node-a", "node-b"):
        config = write_config(tmp_path / name / "node.toml", server, [echo_model(3000)], name=name)
        node = start_node(procs, config)
        nodes[node_id_of(node)] = node

    job = submit_chat(server, "survive a crash")
    first = wait_jobs(server, [job], "in_progress", timeout=15)[0]["node_id"]
    victim = nodes[first]
    (survivor_id,) = set(nodes) - {first}
    survivor = nodes[survivor_id]
    wait_until(lambda: log_events(victim, "job started", job), 5, "the job to start")
    victim.stop(signal.SIGKILL)
    assert log_events(victim, "job completed") == []  # it died mid-job

    (done,) = wait_jobs(server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert answer(done) == "survive a crash"
    assert done["attempts"] == 2
    assert done["node_id"] == survivor_id
    assert len(log_events(survivor, "job completed", job)) == 1
    assert "attempt=2" in log_events(survivor, "job completed", job)[0]
    # one result: nothing else arrives later to overwrite it
    time.sleep(0.5)
    assert get_job(server, job)["result"] == done["result"]


def test_a_node_that_lost_its_lease_drops_the_job(
    server_process: ServerFactory, procs: Procs, tmp_path: Path
) -> None:
    """SIGSTOP the node past its lease: the job is leased again; once resumed, the node
    hears at its next heartbeat that the lease is lost and drops the old attempt."""
    server = server_process(
        OPENBEEPBOOP_LEASE_SECONDS="2", OPENBEEPBOOP_REAPER_INTERVAL_SECONDS="0.2"
    )
    config = write_config(tmp_path / "node.toml", server, [echo_model(6000)])
    node = start_node(procs, config)
    node_id_of(node)
    job = submit_chat(server, "a frozen node")
    wait_jobs(server, [job], "in_progress", timeout=15)
    wait_until(lambda: log_events(node, "job started", job), 5, "the job to start")

    node.send(signal.SIGSTOP)
    try:
        wait_jobs(server, [job], "queued", timeout=15)
    finally:
        node.send(signal.SIGCONT)
    wait_until(lambda: log_events(node, "job lost", job), 5, "the node to drop the job")

    (done,) = wait_jobs(server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    (completed,) = log_events(node, "job completed", job)
    assert "attempt=2" in completed
    assert "attempt=1" in log_events(node, "job lost", job)[0]


# -- the server goes away ---------------------------------------------------------------


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_results_finished_while_the_server_is_down_arrive(
    server_process: ServerFactory, procs: Procs, tmp_path: Path, how: int
) -> None:
    server = server_process()
    config = write_config(tmp_path / "node.toml", server, [echo_model(3000, concurrency=3)])
    node = start_node(procs, config)
    node_id_of(node)
    ids = [submit_chat(server, f"outage job {i}") for i in range(3)]
    wait_jobs(server, ids, "in_progress", timeout=15)

    server.kill(how)
    wait_until(lambda: completed_count(node) == 3, 15, "the jobs to finish on the node")
    wait_until(
        lambda: log_events(node, "result upload failed; will retry"), 15, "an upload to fail"
    )
    server.start()

    done = wait_jobs(server, ids, "completed", timeout=40)
    assert [answer(j) for j in done] == [f"outage job {i}" for i in range(3)]
    assert all(j["attempts"] == 1 for j in done)
    # and it fetches again: a job submitted now is served
    later = submit_chat(server, "outage job after")
    (done_later,) = wait_jobs(server, [later], "completed", timeout=30)
    assert answer(done_later) == "outage job after"
    assert node.alive()
    assert_no_prompt(node, "outage job")


def test_a_node_started_before_its_server_waits_for_it(
    server_process: ServerFactory, procs: Procs, tmp_path: Path
) -> None:
    server = server_process()
    server.kill(signal.SIGKILL)
    config = write_config(tmp_path / "node.toml", server, [echo_model(0)])
    node = start_node(procs, config)
    wait_until(lambda: log_events(node, "server unreachable; retrying"), 15, "a retry")
    server.start()
    node_id_of(node, timeout=30)
    job = submit_chat(server, "served once the server is up")
    (done,) = wait_jobs(server, [job], "completed", timeout=15)
    assert answer(done) == "served once the server is up"


def test_batch_gives_up_when_the_server_is_unreachable(
    server_process: ServerFactory, procs: Procs, tmp_path: Path
) -> None:
    server = server_process()
    server.kill(signal.SIGKILL)
    config = write_config(tmp_path / "node.toml", server, [echo_model(0)])
    node = start_node(procs, config, mode="batch")
    assert node.wait(timeout=45) == 2
    assert log_events(node, "server unreachable")


def test_results_in_the_outbox_survive_a_node_restart(
    server_process: ServerFactory, procs: Procs, tmp_path: Path
) -> None:
    server = server_process()
    # no node name: the default one (hostname-pid) changes with every start
    config = write_config(tmp_path / "node.toml", server, [echo_model(1500, concurrency=2)])
    state_dir = tmp_path / "node-state"
    first = start_node(procs, config, tag="first")
    node_id_of(first)
    ids = [submit_chat(server, f"restart job {i}") for i in range(2)]
    wait_jobs(server, ids, "in_progress", timeout=15)

    server.kill(signal.SIGKILL)
    wait_until(lambda: completed_count(first) == 2, 15, "the jobs to finish on the node")
    first.send(signal.SIGTERM)
    wait_until(lambda: log_events(first, "stopping: draining running jobs"), 10, "stopping")
    first.send(signal.SIGTERM)  # the second signal: do not wait for the server
    assert first.wait(timeout=20) == 0
    assert log_events(first, "results not yet acknowledged; sent on next start")
    assert outbox_rows(state_dir) == 2

    server.start()
    assert all(j["status"] == "in_progress" for j in (get_job(server, i) for i in ids))
    second = start_node(procs, config, tag="second")
    done = wait_jobs(server, ids, "completed", timeout=30)
    assert [answer(j) for j in done] == ["restart job 0", "restart job 1"]
    wait_until(lambda: outbox_rows(state_dir) == 0, 10, "the outbox to empty")
    assert second.alive()
    assert_no_prompt(first, "restart job")
    assert_no_prompt(second, "restart job")


# -- stopping ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drain", "delay_ms", "signals", "outcome"),
    [
        (10, 2000, 1, "completed"),  # drain_seconds lets the jobs finish
        (0.5, 30000, 1, "queued"),  # too long: released when the drain time is up
        (30, 30000, 2, "queued"),  # a second signal releases at once
    ],
    ids=["finish", "release", "second-signal"],
)
def test_sigterm_drains_or_releases(
    shared_server: ServerProcess,
    procs: Procs,
    tmp_path: Path,
    drain: float,
    delay_ms: float,
    signals: int,
    outcome: str,
) -> None:
    server = shared_server
    name = f"drain-{outcome}-{signals}"
    model = echo_model(delay_ms, concurrency=2, name=name)
    config = write_config(tmp_path / "node.toml", server, [model], drain_seconds=drain)
    node = start_node(procs, config)
    node_id_of(node)
    ids = [submit_chat(server, f"drain job {i}", model=name) for i in range(2)]
    wait_jobs(server, ids, "in_progress", timeout=15)
    wait_until(lambda: len(log_events(node, "job started")) == 2, 5, "the jobs to start")

    stopped_at = time.monotonic()
    node.send(signal.SIGTERM)
    if signals == 2:
        wait_until(lambda: log_events(node, "stopping: draining running jobs"), 10, "stopping")
        node.send(signal.SIGTERM)
    assert node.wait(timeout=30) == 0, node.stderr()
    took = time.monotonic() - stopped_at

    jobs = wait_jobs(server, ids, outcome, timeout=10)
    if outcome == "completed":
        assert [answer(j) for j in jobs] == ["drain job 0", "drain job 1"]
        assert completed_count(node) == 2
    else:
        assert all(j["attempts"] == 0 for j in jobs), jobs  # a release uses up no attempt
        assert all(j["node_id"] is None for j in jobs)
        assert len(log_events(node, "job released")) == 2
        assert took < 10, f"the node took {took:.1f} s to stop"
    assert_no_prompt(node, "drain job")


# -- batch and run -----------------------------------------------------------------------


def setup_node(
    tmp_path: Path, server: ServerProcess, config: Path, delay_ms: int, model: str = "echo"
) -> None:
    """`openbeepboop-node setup`, as a user runs it."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openbeepboop.cli.node",
            "setup",
            "--non-interactive",
            "--config",
            str(config),
            "--server",
            server.url,
            "--api-key",
            server.keys["node_key"],
            "--backend",
            "echo",
            "--model-name",
            model,
            "--concurrency",
            "2",
            "--delay-ms",
            str(delay_ms),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f'"{model}"' in out.stdout


def test_setup_writes_an_openai_backend_model_and_requires_its_base_url(tmp_path: Path) -> None:
    from openbeepboop.node.backends.openai_compat import OpenAIModel
    from openbeepboop.node.config import load_node_config

    def setup(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "openbeepboop.cli.node", "setup", "--non-interactive"]
        common = ["--server", "http://127.0.0.1:9", "--api-key", "obb_node_x", "--no-check"]
        return subprocess.run(
            [*argv, *common, *flags],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            check=False,
        )

    config = tmp_path / "node.toml"
    done = setup(
        *("--config", str(config), "--backend", "openai", "--model-name", "llama3"),
        *("--api-base", "http://127.0.0.1:11434/v1", "--upstream-model", "llama3:8b"),
        *("--provider-key-env", "OLLAMA_KEY"),
    )
    assert done.returncode == 0, done.stderr
    [model] = load_node_config(config).models
    assert isinstance(model, OpenAIModel)
    assert (model.name, model.api_base, model.model, model.api_key_env) == (
        "llama3",
        "http://127.0.0.1:11434/v1",
        "llama3:8b",
        "OLLAMA_KEY",
    )
    refused = setup("--config", str(tmp_path / "other.toml"), "--backend", "openai")
    assert refused.returncode == 2
    assert "--api-base is required for the openai backend" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "other.toml").exists()


def test_batch_exits_0_once_the_queue_is_drained(
    shared_server: ServerProcess, procs: Procs, tmp_path: Path
) -> None:
    server = shared_server
    config = tmp_path / "node.toml"
    setup_node(tmp_path, server, config, delay_ms=200, model="batch-echo")
    ids = [submit_chat(server, f"batch job {i}", model="batch-echo") for i in range(5)]
    # the outbox goes to $XDG_STATE_HOME/openbeepboop: keep it in tmp_path
    node = start_node(procs, config, mode="batch", XDG_STATE_HOME=str(tmp_path / "state"))
    assert node.wait(timeout=45) == 0, node.stderr()
    done = wait_jobs(server, ids, "completed", timeout=5)
    assert [answer(j) for j in done] == [f"batch job {i}" for i in range(5)]
    assert completed_count(node) == 5

    # nothing queued: batch exits at once
    again = start_node(
        procs, config, mode="batch", tag="again", XDG_STATE_HOME=str(tmp_path / "state")
    )
    assert again.wait(timeout=30) == 0, again.stderr()
    assert completed_count(again) == 0
    assert_no_prompt(node, "batch job")


def test_run_keeps_serving(shared_server: ServerProcess, procs: Procs, tmp_path: Path) -> None:
    server, name = shared_server, "run-echo"
    config = write_config(
        tmp_path / "node.toml", server, [echo_model(100, name=name)], poll_seconds=0.5
    )
    node = start_node(procs, config)
    node_id_of(node)
    first = submit_chat(server, "the first job", model=name)
    wait_jobs(server, [first], "completed", timeout=15)
    time.sleep(1.5)  # a few empty long-polls
    assert node.alive()
    later = submit_chat(server, "a job submitted later", model=name)
    (done,) = wait_jobs(server, [later], "completed", timeout=15)
    assert answer(done) == "a job submitted later"
    assert node.alive()


# -- cancellation -----------------------------------------------------------------------


def test_cancel_on_the_server_aborts_the_job_on_the_node(
    shared_server: ServerProcess, procs: Procs, tmp_path: Path
) -> None:
    server = shared_server
    models = [echo_model(30000, name="cancel-slow"), {"name": "cancel-fast", "backend": "echo"}]
    config = write_config(tmp_path / "node.toml", server, models, heartbeat_seconds=0.3)
    node = start_node(procs, config)
    node_id_of(node)
    job = submit_chat(server, "cancel me", model="cancel-slow")
    wait_jobs(server, [job], "in_progress", timeout=15)
    wait_until(lambda: log_events(node, "job started", job), 5, "the job to start")

    assert cancel_job(server, job)["status"] == "cancelled"
    wait_until(lambda: log_events(node, "job cancelled", job), 3, "the node to abort the job")
    assert get_job(server, job)["status"] == "cancelled"

    # the node keeps working, and nothing it sends revives the cancelled job
    other = submit_chat(server, "after the cancel", model="cancel-fast")
    (done,) = wait_jobs(server, [other], "completed", timeout=15)
    assert answer(done) == "after the cancel"
    cancelled = get_job(server, job)
    assert cancelled["status"] == "cancelled" and cancelled["result"] is None
    assert log_events(node, "job completed", job) == []
    assert node.alive()


# -- logs ---------------------------------------------------------------------------------


def test_logs_carry_no_prompt_text_by_default(
    shared_server: ServerProcess, procs: Procs, tmp_path: Path
) -> None:
    server, name = shared_server, "logs-echo"
    model = echo_model(0, token_delay_ms=5, name=name)
    config = write_config(tmp_path / "node.toml", server, [model])
    node = start_node(procs, config)
    node_id_of(node)
    secret = "PROMPT-TEXT-7c1e2a do not log me"
    ids = [
        submit_chat(server, secret, model=name),
        submit_chat(server, secret, model=name, max_tokens=2),
    ]
    wait_jobs(server, ids, "completed", timeout=15)
    node.send(signal.SIGTERM)
    assert node.wait(timeout=20) == 0
    assert len(log_events(node, "job completed")) == 2
    assert_no_prompt(node, "PROMPT-TEXT", "7c1e2a", "do not log me")
