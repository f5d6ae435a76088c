"""No job is leased to a node that is gone, and leases survive a stop of the server.

Real servers (SQLite and PostgreSQL), real echo nodes, real signals:

- nodes killed (`kill -9`) or stopped (SIGTERM, also while draining a running job)
  with their long-polls open: the next jobs go to another node at once, on their first
  attempt (before, each sat leased to a dead connection until `lease_seconds` ran out,
  and ran on attempt 2);
- the server stopped for longer than `lease_seconds` while a node runs a slow job: the
  node's result is accepted when the server is back, and the job ran once.

And in-process, through the fast lane and without it, the two moments a caller can be
found gone: while its long-poll waits, and as the answer with its jobs goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import JobStatus
from tests.conftest import Api, ServerProcess, cli, free_port
from tests.nodes import (
    SERVER_LOG_WARNING,
    Proc,
    Procs,
    answer,
    auth,
    echo_model,
    get_job,
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
        keys = cli(
            "setup", "--non-interactive", "--data-dir", str(data_dir), "--json", env=full_env
        )
        server = ServerProcess(data_dir, free_port(), keys, full_env)
        server.start()
        try:
            yield server
        finally:
            server.kill(signal.SIGTERM)


def server_log(server: ServerProcess) -> str:
    return (server.log or Path()).read_text(errors="replace")


def start_echo_node(
    procs: Procs, server: ServerProcess, tmp_path: Path, name: str, **model: object
) -> Proc:
    """An echo node holding a 30 s long-poll open (as by default)."""
    config = write_config(
        tmp_path / name / "node.toml",
        server,
        [echo_model(**model)],  # type: ignore[arg-type]
        name=name,
        poll_seconds=30,
    )
    return start_node(procs, config, tag=name)


def test_nodes_that_are_gone_are_leased_nothing(
    store: str, request: pytest.FixtureRequest, procs: Procs, tmp_path: Path
) -> None:
    """Three nodes leave while their long-polls are open: one is killed (`kill -9`), one
    stops on SIGTERM (it exits 0), one stops on SIGTERM while it runs a slow job (it
    drains, but closes its long-poll first). Jobs submitted then, while no other node is
    there, are claimed for none of them; node B, started next, runs them all at once, on
    their first attempt. (Before, each open long-poll took one job, which sat leased to
    nobody for `lease_seconds` and then ran on attempt 2.)"""
    with running_server(
        store, request, tmp_path / "server", OPENBEEPBOOP_LEASE_SECONDS=LEASE_SECONDS
    ) as server:
        draining = start_echo_node(
            procs, server, tmp_path, "draining", delay_ms=3000, concurrency=2
        )
        node_id_of(draining)
        slow = submit_chat(server, "a slow one")
        killed = start_echo_node(procs, server, tmp_path, "killed")
        stopped = start_echo_node(procs, server, tmp_path, "stopped")
        gone_ids = {node_id_of(n) for n in (killed, stopped, draining)}
        wait_until(lambda: log_events(draining, "job started"), 10, "the slow job to start")
        time.sleep(1.0)  # every free slot's long-poll is open on the server

        killed.send(signal.SIGKILL)
        stopped.send(signal.SIGTERM)
        draining.send(signal.SIGTERM)
        assert killed.wait(timeout=20) == -signal.SIGKILL
        assert stopped.wait(timeout=20) == 0, stopped.stderr()
        wait_until(lambda: log_events(draining, "stopping: draining running jobs"), 10, "a drain")
        texts = [f"while nobody is there {i}" for i in range(3)]
        ids = [submit_chat(server, t) for t in texts]
        time.sleep(0.5)  # a claim for a gone caller would be made by now

        node_b = start_echo_node(procs, server, tmp_path, "node-b", concurrency=3)
        b_id = node_id_of(node_b)
        registered = time.monotonic()
        done = wait_jobs(server, ids, "completed", timeout=30)
        took = time.monotonic() - registered
        assert took < PROMPTLY, f"the jobs took {took:.1f} s (a lease to a gone node ran out?)"
        assert [(j["attempts"], j["node_id"], answer(j)) for j in done] == [
            (1, b_id, t) for t in texts
        ]
        assert b_id not in gone_ids
        assert draining.wait(timeout=20) == 0, draining.stderr()
        (finished,) = wait_jobs(server, [slow], "completed", timeout=10)
        assert (finished["attempts"], answer(finished)) == (1, "a slow one")
        assert [len(log_events(n, "job started")) for n in (killed, stopped, draining)] == [0, 0, 1]


def test_a_long_poll_whose_caller_hung_up_leases_nothing(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Long-polls sent whole on sockets closed at once (a node gone the moment it asked):
    a job submitted next is claimed for none of them, and the next live fetch gets it on
    its first attempt (before, a dead long-poll took it for `lease_seconds`)."""
    with running_server(
        store, request, tmp_path / "server", OPENBEEPBOOP_LEASE_SECONDS=LEASE_SECONDS
    ) as server:
        node_auth = auth(server.keys["node_key"])
        r = httpx.post(
            server.url + "/internal/nodes/register",
            json={"name": "hangs-up", "models": [{"name": "echo"}]},
            headers=node_auth,
        )
        node_id = r.json()["node_id"]
        fetch = {"node_id": node_id, "models": ["echo"], "max_jobs": 1}
        body = orjson.dumps({**fetch, "wait": 30})
        head = (
            "POST /internal/queue/fetch HTTP/1.1\r\nHost: test\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Authorization: {node_auth['Authorization']}\r\n\r\n"
        )
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(head.encode() + body)
        time.sleep(0.5)  # the long-polls are waiting, or were never answered
        job_id = submit_chat(server, "nobody asked for this")
        time.sleep(0.5)  # a dead long-poll would have claimed it by now
        job = get_job(server, job_id)
        assert (job["status"], job["attempts"], job["node_id"]) == ("queued", 0, None)

        r = httpx.post(
            server.url + "/internal/queue/fetch", json={**fetch, "wait": 0}, headers=node_auth
        )
        assert [(j["id"], j["attempt"]) for j in r.json()["jobs"]] == [(job_id, 1)]


def test_jobs_run_once_across_a_server_outage_longer_than_their_lease(
    store: str, request: pytest.FixtureRequest, procs: Procs, tmp_path: Path
) -> None:
    """The node keeps working while the server is down for more than twice
    `lease_seconds`: one job finishes during the outage (its result waits in the outbox,
    the uploader backing off), the other is still running when the server is back. Both
    leases are still the node's: both results are accepted, each job ran once."""
    with running_server(
        store,
        request,
        tmp_path / "server",
        OPENBEEPBOOP_LEASE_SECONDS="1.5",
        OPENBEEPBOOP_REAPER_INTERVAL_SECONDS="0.2",
    ) as server:
        models = [echo_model(1500, name="echo-quick"), echo_model(7000, name="echo-slow")]
        config = write_config(tmp_path / "node" / "node.toml", server, models, poll_seconds=30)
        node = start_node(procs, config)
        node_id = node_id_of(node)
        quick = submit_chat(server, "done while the server is away", model="echo-quick")
        slow = submit_chat(server, "still running when it is back", model="echo-slow")
        wait_jobs(server, [quick, slow], "in_progress", timeout=10)

        server.kill(signal.SIGKILL)
        wait_until(lambda: log_events(node, "heartbeat failed"), 10, "a heartbeat to fail")
        wait_until(lambda: log_events(node, "job completed", quick), 10, "the quick job")
        time.sleep(3.0)  # down for more than twice the lease (and restarting takes more)
        server.start()

        done = wait_jobs(server, [quick, slow], "completed", timeout=30)
        assert [(j["attempts"], j["node_id"], answer(j)) for j in done] == [
            (1, node_id, "done while the server is away"),
            (1, node_id, "still running when it is back"),
        ]
        assert len(log_events(node, "job started")) == 2
        assert not log_events(node, "job lost")
        resumed = "leases resumed after an outage: 2 extended by a grace of 1.5 s"
        assert resumed in server_log(server)


# -- in-process: the moments a caller is found gone ----------------------------------------


async def fetch_as_asgi(api: Api, node_id: str, wait: float, left: asyncio.Event) -> Any:
    """`POST /internal/queue/fetch` straight through the app (fast lane included) from a
    caller whose connection closes when `left` is set; the answer, if one was sent."""
    body = orjson.dumps({"node_id": node_id, "models": ["echo"], "max_jobs": 1, "wait": wait})
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Any] = []

    async def receive() -> Any:
        if messages:
            return messages.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [
        (b"host", b"test"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", f"Bearer {api.node}".encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/internal/queue/fetch",
        "raw_path": b"/internal/queue/fetch",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    await api.app(scope, receive, send)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    return orjson.loads(b"".join(bodies)) if bodies else None


async def job_state(api: Api, job_id: str) -> tuple[JobStatus, int]:
    job = await app_state(api.app).queue.store.get_job(job_id)
    assert job is not None
    return job.status, job.attempts


async def test_a_long_poll_whose_caller_left_claims_nothing(api: Api) -> None:
    node_id = await api.register(["echo"])
    left = asyncio.Event()
    polling = asyncio.create_task(fetch_as_asgi(api, node_id, wait=30, left=left))
    await asyncio.sleep(0.2)  # waiting now
    left.set()
    await asyncio.wait_for(polling, 2)  # it stops waiting at once
    job = await api.submit("after the caller left")
    await asyncio.sleep(0.1)
    assert await job_state(api, job["id"]) == (JobStatus.QUEUED, 0)

    again = await fetch_as_asgi(api, node_id, wait=0, left=asyncio.Event())
    assert [(j["id"], j["attempt"]) for j in again["jobs"]] == [(job["id"], 1)]


async def test_jobs_claimed_for_a_caller_gone_at_the_answer_go_back(api: Api) -> None:
    node_id = await api.register(["echo"])
    job = await api.submit("claimed as the caller left")
    left = asyncio.Event()
    left.set()  # the connection is closed by the time the answer goes out
    answered = await fetch_as_asgi(api, node_id, wait=0, left=left)
    assert answered == {"jobs": []}
    assert await job_state(api, job["id"]) == (JobStatus.QUEUED, 0)

    again = await fetch_as_asgi(api, node_id, wait=0, left=asyncio.Event())
    assert [(j["id"], j["attempt"]) for j in again["jobs"]] == [(job["id"], 1)]


class LeavingCaller:
    """A caller that leaves while the claim made for it is in flight."""

    def __init__(self) -> None:
        self.asked = 0

    @property
    def gone(self) -> bool:
        self.asked += 1
        return self.asked > 1  # there for the check before the claim, gone after it

    def watch(self, wake: asyncio.Event) -> None:
        pass


async def test_a_claim_made_as_the_long_poll_caller_leaves_is_released(api: Api) -> None:
    node_id = await api.register(["echo"])
    queue = app_state(api.app).queue
    key = await app_state(api.app).keyring.authenticate(api.node)
    caller = LeavingCaller()
    polling = asyncio.create_task(queue.fetch(key, node_id, ["echo"], 1, 30, caller))
    await asyncio.sleep(0.2)  # waiting now
    job = await api.submit("claimed as the caller left")
    assert await asyncio.wait_for(polling, 2) == []
    assert caller.asked == 2
    assert await job_state(api, job["id"]) == (JobStatus.QUEUED, 0)
