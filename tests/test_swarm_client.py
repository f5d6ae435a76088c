"""Client discovery (issue 16): a client given one DHT address finds the servers of a
swarm, sends work to the least loaded, and fails over when one dies.

Until servers publish their own records, the swarm here is three DHT member nodes run in
this process (`Dht(RecordStorage(secret))` on loopback, on a thread with its own loop)
that publish signed records whose URLs are two REAL servers, each with a real echo node.
Server B's queue is really deeper for `echo`: five jobs pinned to a registered node that
never fetches. Both servers hold the swarm secret (without a DHT port), so a client key
made on A is a swarm key that B accepts too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from openbeepboop.client import AsyncClient, Client, StreamInterruptedError
from openbeepboop.swarm.dht import Dht
from openbeepboop.swarm.records import MemberRecord, ModelLoad
from openbeepboop.swarm.secret import SwarmSecret
from openbeepboop.swarm.storage import RecordStorage
from tests.conftest import ServerProcess, cli, free_port
from tests.nodes import Procs, auth, child_env, node_id_of, start_node, write_config
from tests.swarms import SECRET as SWARM_SECRET

T = TypeVar("T")
SECRET = SwarmSecret("a swarm secret for tests only")
LONG = " ".join(f"w{i}" for i in range(40))  # 40 words at 150 ms each on B's node
B_QUEUED = 5


class Members:
    """Three DHT member nodes on a loop in a thread of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nodes: list[Dht] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    async def _start(self) -> None:
        for i in range(3):
            dht = Dht(RecordStorage(SECRET), timeout=1.0)
            await dht.start("127.0.0.1", 0)
            if self.nodes:
                await dht.join([("127.0.0.1", self.nodes[i - 1].port)])  # a chain
            self.nodes.append(dht)

    def start(self) -> None:
        self.run(self._start())

    def publish(self, index: int, record: MemberRecord) -> None:
        signed = record.signed(SECRET)

        async def put() -> None:
            for key in signed.dht_keys():
                await self.nodes[index].put(key, "[" + signed.encode() + "]")

        self.run(put())

    async def _stop(self) -> None:
        for dht in self.nodes:
            dht.stop()
        await asyncio.sleep(0.05)  # the transports close their sockets on the next turns

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.nodes[0].port}"


@dataclass
class Swarm:
    members: Members
    a: ServerProcess
    b: ServerProcess
    node_procs: dict[str, Procs]
    key: str

    def client(self, **kwargs: Any) -> Client:
        return Client(api_key=self.key, bootstrap=self.members.bootstrap, **kwargs)

    def kill_b(self) -> None:
        self.b.kill(signal.SIGKILL)
        self.node_procs["b"].close()


def member_id(server: ServerProcess, fallback: str) -> str:
    """The server's own id where it has a `/status` that says (the record must match
    what the server answers), else `fallback`."""
    try:
        r = httpx.get(server.url + "/status", headers=auth(server.keys["client_key"]), timeout=5)
        data = r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        data = {}
    found = data.get("id") if isinstance(data, dict) else None
    return str(found) if found else fallback


def record(server: ServerProcess, mid: str, name: str, queued: int, rate: float) -> MemberRecord:
    now = time.time()
    return MemberRecord(
        id=mid,
        name=name,
        url=server.url,
        dht="",
        version="test",
        started_at=now - 60,
        ts=now,
        ttl=120,
        models={"echo": ModelLoad(queued=queued, running=0, nodes=1)},
        queued=queued,
        nodes=1,
        tokens_per_s=rate,
    )


def hold_jobs(server: ServerProcess, count: int) -> None:
    """`count` echo jobs that stay queued: pinned to a node that registers and never
    fetches."""
    r = httpx.post(
        server.url + "/internal/nodes/register",
        json={"name": "held", "models": [{"name": "echo"}]},
        headers=auth(server.keys["node_key"]),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    for i in range(count):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": f"held {i}"}]}
            | {"node": "held"},
            headers=auth(server.keys["client_key"], Prefer="respond-async"),
            timeout=10,
        )
        assert r.status_code == 202, r.text


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    root = tmp_path_factory.mktemp("swarm")
    env = {"OPENBEEPBOOP_RATE_LIMIT": "", "OPENBEEPBOOP_SWARM_SECRET": SWARM_SECRET}
    servers = {}
    for n in ("a", "b"):
        keys = cli("setup", "--non-interactive", "--data-dir", str(root / n), "--json", env=env)
        servers[n] = ServerProcess(root / n, free_port(), keys, env)
    procs = {n: Procs() for n in servers}
    members = Members()
    try:
        for name, server in servers.items():
            server.start()
            model = {"name": "echo", "backend": "echo"}
            if name == "b":
                model["token_delay_ms"] = 150
            config = write_config(root / f"node-{name}" / "node.toml", server, [model])
            node_id_of(start_node(procs[name], config, tag=f"node-{name}"))
        hold_jobs(servers["b"], B_QUEUED)
        members.start()
        a, b = servers["a"], servers["b"]
        members.publish(0, record(a, member_id(a, "member-a"), "room-a", 0, 40.0))
        members.publish(1, record(b, member_id(b, "member-b"), "room-b", B_QUEUED, 90.0))
        yield Swarm(members, a, b, procs, a.keys["client_key"])  # a swarm key: B takes it
    finally:
        members.close()
        for p in procs.values():
            p.close()
        for server in servers.values():
            server.kill(signal.SIGTERM)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.client", *args],
        capture_output=True,
        text=True,
        env=env or child_env(),
        timeout=60,
        check=False,
    )


def ask(content: str) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}]}


def test_one_bootstrap_address_finds_both_and_the_least_loaded_comes_first(swarm: Swarm) -> None:
    with swarm.client() as client:
        found = {r.url: r for r in client.swarm_members()}
        assert set(found) == {swarm.a.url, swarm.b.url}
        assert found[swarm.b.url].models["echo"].queued == B_QUEUED
        # B is faster, but its queue for the model is deeper: A first
        job = client.chat.completions.create(**ask("hello swarm"))
        assert job.base_url == swarm.a.url
        assert job.get(wait=True, timeout=20).choices[0].message.content == "hello swarm"


def test_submits_spread_by_load_and_every_result_comes_back(swarm: Swarm) -> None:
    with swarm.client() as client:
        jobs = [client.chat.completions.create(**ask(f"spread {i}")) for i in range(9)]
        where = [j.base_url for j in jobs]
        # A takes jobs until it has as many as B's queue, then both share
        assert where[:B_QUEUED] == [swarm.a.url] * B_QUEUED, where
        assert swarm.b.url in where[B_QUEUED:], where
        done = client.jobs.wait_all(jobs, timeout=30)
        assert [j.result.choices[0].message.content for j in done] == [
            f"spread {i}" for i in range(9)
        ]
        # a job is found by id on whichever server holds it
        on_b = next(j for j in jobs if j.base_url == swarm.b.url)
        assert client.jobs.get(on_b.id).base_url == swarm.b.url


def test_swarm_command_lists_both_as_json_and_as_text(swarm: Swarm) -> None:
    env = child_env(OPENBEEPBOOP_API_KEY=swarm.key)
    out = run_cli("swarm", "--json", "--bootstrap", swarm.members.bootstrap, env=env)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"room-a", "room-b"}
    assert rows["room-b"]["url"] == swarm.b.url
    assert rows["room-b"]["models"]["echo"] == {"queued": B_QUEUED, "running": 0, "nodes": 1}
    assert rows["room-b"]["tokens_per_s"] == 90.0
    assert rows["room-a"]["reachable"] and 55 <= rows["room-a"]["uptime"] < 600
    assert 0 <= rows["room-a"]["age"] < 300
    env["OPENBEEPBOOP_BOOTSTRAP"] = swarm.members.bootstrap
    text = run_cli("swarm", env=env)
    assert text.returncode == 0, text.stderr
    assert "2 member(s)" in text.stdout and swarm.b.url in text.stdout
    assert f"queued {B_QUEUED}" in text.stdout


def test_bad_bootstrap_answers_in_one_line(swarm: Swarm, tmp_path: Path) -> None:
    env = child_env(OPENBEEPBOOP_API_KEY=swarm.key)
    silent = f"127.0.0.1:{free_port()}"  # nothing listens for UDP there
    out = run_cli("submit", "hi", "--model", "echo", "--bootstrap", silent, env=env)
    assert out.returncode == 3, out.stderr
    assert out.stderr.startswith("error: no swarm member answered") and silent in out.stderr
    assert "Traceback" not in out.stderr
    bad = run_cli("swarm", "--bootstrap", "nowhere", env=env)
    assert bad.returncode == 2 and "host:port" in bad.stderr and "Traceback" not in bad.stderr
    # without the swarm extra: what to install
    shim = tmp_path / "shim" / "kademlia"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'kademlia'\")\n")
    path = os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])
    env["PYTHONPATH"] = path
    missing = run_cli("swarm", "--bootstrap", swarm.members.bootstrap, env=env)
    assert missing.returncode == 7, missing.stderr
    assert "pip install 'openbeepboop[swarm]'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_dead_server_is_passed_over_and_its_jobs_move(swarm: Swarm) -> None:
    """Runs last: it kills B. A job waited for on B is submitted again on A (recorded
    and logged), and so is one whose stream had not begun; a stream that had begun on B
    raises instead of repeating itself; new submits that name B first go to A."""

    async def scenario() -> None:
        client = AsyncClient(
            swarm.b.url,
            swarm.key,
            bootstrap=swarm.members.bootstrap,
            failover_after=1.0,
            max_retries=1,
        )
        async with client:
            streamed = await client.chat.completions.create(**ask(LONG))
            moved = await client.chat.completions.create(**ask(LONG + " moved"))
            waiting = await client.chat.completions.create(**ask(LONG + " waiting"))
            assert streamed.base_url == moved.base_url == waiting.base_url == swarm.b.url
            old_id = moved.id
            pieces = streamed.stream()
            first = await anext(pieces)
            assert first
            swarm.kill_b()
            with pytest.raises(StreamInterruptedError) as lost:
                async for _ in pieces:
                    pass
            assert lost.value.content and lost.value.job is streamed
            started = time.monotonic()
            result = await moved.get(wait=True, timeout=30)
            assert result.choices[0].message.content == LONG + " moved"
            assert moved.base_url == swarm.a.url and moved.id != old_id
            assert moved.failovers == [(swarm.b.url, old_id)]
            assert time.monotonic() - started < 15
            # a stream that had not begun when its server died follows the job elsewhere
            text = "".join([piece async for piece in waiting.stream()])
            assert text == LONG + " waiting"
            assert waiting.base_url == swarm.a.url and len(waiting.failovers) == 1

    asyncio.run(scenario())
    with Client(swarm.b.url, swarm.key, bootstrap=swarm.members.bootstrap) as client:
        job = client.chat.completions.create(**ask("after the fall"))
        assert job.base_url == swarm.a.url
        assert job.get(wait=True, timeout=20).choices[0].message.content == "after the fall"
