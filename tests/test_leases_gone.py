"""No job is leased to a node that is gone, and leases survive a stop of the server.

Real servers (SQLite and PostgreSQL), real echo nodes, real signals:

- a node killed (`kill -9`) or stopped (SIGTERM) while its long-poll is open: the next
  job goes to another node at once, on its first attempt (before, it sat leased to the
  dead connection until `lease_seconds` ran out, and ran on attempt 2);
- a node draining after SIGTERM closes its long-poll first: new jobs go elsewhere;
- the server stopped for longer than `lease_seconds` while a node runs a slow job: the
  node's result is accepted when the server is back, and the job ran once.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, cli, free_port
from tests.nodes import (
    SERVER_LOG_WARNING,
    Proc,
    Procs,
    answer,
    echo_model,
    log_events,
    node_id_of,
    start_node,
    submit_chat,
    wait_jobs,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]

LEASE_SECONDS = "20"
PROMPTLY = 5.0  # well under the lease: the job did not wait for a lease to run out


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.close()


@contextlib.contextmanager
def running_server(
    store: str, request: pytest.FixtureRequest, data_dir: Path, **env: str
) -> Iterator[ServerProcess]:
    """A real server on `store` (a fresh PostgreSQL database, or DIR's SQLite file)."""
    with contextlib.ExitStack() as stack:
        full_env = {"OPENBEEPBOOP_RATE_LIMIT": "", **env}
        if store == "postgres":
            from tests.pg import temp_database_sync

            admin = request.getfixturevalue("postgres")
            full_env["OPENBEEPBOOP_DATABASE_URL"] = stack.enter_context(temp_database_sync(admin))
        keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json", env=full_env)
        server = ServerProcess(data_dir, free_port(), keys, full_env)
        server.start()
        try:
            yield server
        finally:
            server.kill(signal.SIGTERM)


def start_echo_node(
    procs: Procs, server: ServerProcess, tmp_path: Path, name: str, **model: object
) -> tuple[Proc, str]:
    """An echo node holding a 30 s long-poll open (as by default), once registered."""
    config = write_config(
        tmp_path / name / "node.toml",
        server,
        [echo_model(**model)],  # type: ignore[arg-type]
        name=name,
        poll_seconds=30,
    )
    node = start_node(procs, config, tag=name)
    return node, node_id_of(node)


def completed_promptly(server: ServerProcess, job_id: str) -> dict[str, object]:
    start = time.monotonic()
    (job,) = wait_jobs(server, [job_id], "completed", timeout=30)
    took = time.monotonic() - start
    assert took < PROMPTLY, f"the job took {took:.1f} s (a lease to a gone node ran out?)"
    return job


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_a_gone_node_is_leased_nothing(
    store: str, how: int, request: pytest.FixtureRequest, procs: Procs, tmp_path: Path
) -> None:
    with running_server(
        store, request, tmp_path / "server", OPENBEEPBOOP_LEASE_SECONDS=LEASE_SECONDS
    ) as server:
        node_a, a_id = start_echo_node(procs, server, tmp_path, "node-a")
        time.sleep(1.5)  # its long-poll is open on the server
        node_a.send(how)
        code = node_a.wait(timeout=20)
        assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL), node_a.stderr()
        # submitted while no node is there: a claim for the dead connection would be
        # made now (before node B could race for it)
        first = submit_chat(server, "while nobody is there")
        time.sleep(0.5)
        _, b_id = start_echo_node(procs, server, tmp_path, "node-b")
        second = submit_chat(server, "for whoever is there")

        for job_id, text in ((first, "while nobody is there"), (second, "for whoever is there")):
            job = completed_promptly(server, job_id)
            assert (job["attempts"], job["node_id"], answer(job)) == (1, b_id, text)
        assert a_id != b_id and not log_events(node_a, "job started")


def test_a_draining_node_closes_its_long_poll_first(
    store: str, request: pytest.FixtureRequest, procs: Procs, tmp_path: Path
) -> None:
    """SIGTERM: the node finishes its running job (it drains), but its free slot's
    long-poll is closed at once, so a job submitted meanwhile goes to another node."""
    with running_server(
        store, request, tmp_path / "server", OPENBEEPBOOP_LEASE_SECONDS=LEASE_SECONDS
    ) as server:
        node_a, _ = start_echo_node(procs, server, tmp_path, "node-a", delay_ms=4000, concurrency=2)
        busy = submit_chat(server, "a slow one")
        wait_jobs(server, [busy], "in_progress", timeout=10)
        time.sleep(0.5)  # its second slot long-polls again
        node_a.send(signal.SIGTERM)
        wait_until(lambda: log_events(node_a, "stopping: draining running jobs"), 10, "a drain")
        _, b_id = start_echo_node(procs, server, tmp_path, "node-b")

        job_id = submit_chat(server, "not for a node that is leaving")
        job = completed_promptly(server, job_id)
        assert (job["attempts"], job["node_id"]) == (1, b_id)
        assert node_a.wait(timeout=20) == 0, node_a.stderr()
        (slow,) = wait_jobs(server, [busy], "completed", timeout=10)
        assert (slow["attempts"], answer(slow)) == (1, "a slow one")


def test_a_job_runs_once_across_a_server_outage_longer_than_its_lease(
    store: str, request: pytest.FixtureRequest, procs: Procs, tmp_path: Path
) -> None:
    """The node keeps working while the server is down for twice `lease_seconds`; when
    the server is back, the lease is still the node's: its result is accepted and the
    job ran once."""
    with running_server(
        store,
        request,
        tmp_path / "server",
        OPENBEEPBOOP_LEASE_SECONDS="2",
        OPENBEEPBOOP_REAPER_INTERVAL_SECONDS="0.2",
    ) as server:
        node, node_id = start_echo_node(procs, server, tmp_path, "node", delay_ms=7000)
        job_id = submit_chat(server, "through the outage")
        wait_jobs(server, [job_id], "in_progress", timeout=10)

        server.kill(signal.SIGKILL)
        wait_until(lambda: log_events(node, "heartbeat failed"), 10, "a heartbeat to fail")
        time.sleep(4.5)  # down for more than twice the lease
        server.start()

        (job,) = wait_jobs(server, [job_id], "completed", timeout=30)
        assert (job["attempts"], job["node_id"], answer(job)) == (1, node_id, "through the outage")
        assert len(log_events(node, "job started")) == 1
        assert not log_events(node, "job lost")
        log = (server.log or Path()).read_text()
        assert "leases resumed after an outage: 1 extended by a grace of 2 s" in log
