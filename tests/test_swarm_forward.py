"""Forwarding (docs/swarm.md): a server asked for a model that none of its own nodes
serves sends the job on to a member whose nodes do, through a `swarm=forward` node of
its own, so the job stays its job (sync, streamed, async). Three real servers in a chain
(B joins through A, C through B), an echo node serving `only-c` on C only; the client
talks to A. Then the backend's choice of member and its failover, with fake records and
small HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from openai import OpenAI

from openbeepboop.cli.forwarder import Forwarder, NotTwice, loopback_url, remote_only
from openbeepboop.node.backends.base import BackendError, Chunk
from openbeepboop.node.backends.swarm import (
    FORWARDED_HEADER,
    FORWARDED_METADATA,
    SwarmBackend,
    SwarmModel,
)
from openbeepboop.node.jobs import LeasedJob, Outcome
from openbeepboop.server.core.identity import ServerIdentity
from openbeepboop.server.core.signed_keys import derived_key, verified_id
from openbeepboop.server.core.swarm import SwarmConfig, SwarmMember
from openbeepboop.server.models import Role
from openbeepboop.server.settings import load_settings
from openbeepboop.swarm.records import MemberRecord, ModelLoad
from openbeepboop.swarm.secret import SwarmSecret
from tests.conftest import ServerProcess, free_port
from tests.nodes import (
    SERVER_LOG_WARNING,
    Procs,
    auth,
    echo_model,
    get_job,
    node_id_of,
    start_node,
    submit_chat,
    wait_jobs,
    wait_until,
    write_config,
)
from tests.swarms import SECRET, start_member

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)
WORDS = "forwarded from a to c and back again"


@dataclass
class Chain:
    a: ServerProcess
    b: ServerProcess
    c: ServerProcess


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    base = tmp_path_factory.mktemp("forward")
    servers: list[ServerProcess] = []
    procs = Procs()
    try:
        boot = ""
        for name in "abc":
            member = start_member(base / name, boot, OPENBEEPBOOP_MODEL_WAIT_SECONDS="10")
            servers.append(member.server)
            boot = member.dht
        a, b, c = servers
        only_c = echo_model(token_delay_ms=30, name="only-c")
        node_id_of(start_node(procs, write_config(base / "c-node.toml", c, [only_c]), tag="c"))
        node_id_of(start_node(procs, write_config(base / "a-node.toml", a, [echo_model()])))
        yield Chain(a, b, c)
    finally:
        procs.close()
        for server in reversed(servers):
            server.kill(signal.SIGTERM)


def _models(server: ServerProcess) -> set[str]:
    r = httpx.get(server.url + "/v1/models", headers=auth(server.keys["client_key"]), timeout=5)
    return {m["id"] for m in r.json()["data"]} if r.status_code == 200 else set()


@pytest.fixture(scope="module")
def forwarding(chain: Chain) -> Chain:
    """The chain once A lists `only-c` (its forward node for it is live)."""
    wait_until(lambda: "only-c" in _models(chain.a), 30, "A to list only-c")
    return chain


def _openai(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0)


def test_a_lists_the_model_only_c_serves_beside_its_own(forwarding: Chain) -> None:
    assert {"only-c", "echo"} <= _models(forwarding.a)
    # every member serves every model: B both through the others, C A's echo through A
    wait_until(lambda: {"only-c", "echo"} <= _models(forwarding.b), 20, "B to list both")
    wait_until(lambda: "echo" in _models(forwarding.c), 20, "C to list A's echo")
    nodes = httpx.get(
        forwarding.a.url + "/v1/nodes", headers=auth(forwarding.a.keys["admin_key"]), timeout=5
    ).json()["data"]
    forward = [n for n in nodes if n["labels"].get("swarm") == "forward"]
    assert [[m["name"] for m in n["models"]] for n in forward] == [["only-c"]]


def test_a_sync_request_to_a_is_answered_by_c(forwarding: Chain) -> None:
    reply = _openai(forwarding.a).chat.completions.with_raw_response.create(
        model="only-c", messages=[{"role": "user", "content": WORDS}], stream=False
    )
    assert reply.parse().choices[0].message.content == WORDS
    assert reply.parse().model == "only-c"
    job_id = reply.headers["x-openbeepboop-job-id"]
    assert get_job(forwarding.a, job_id)["status"] == "completed"  # A's own job


def test_a_streamed_request_to_a_streams_pieces_from_c(forwarding: Chain) -> None:
    stream = _openai(forwarding.a).chat.completions.create(
        model="only-c", messages=[{"role": "user", "content": WORDS}], stream=True
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta]
    texts = [p for p in pieces if p]
    assert "".join(texts) == WORDS
    assert len(texts) > 1  # pieces as C's node made them, not one block at the end


def test_an_async_job_on_a_completes_and_keeps_a_s_id(forwarding: Chain) -> None:
    job_id = submit_chat(forwarding.a, WORDS, model="only-c")
    [job] = wait_jobs(forwarding.a, [job_id], {"completed", "failed"}, timeout=20)
    assert job["id"] == job_id and job["status"] == "completed"
    assert job["result"]["choices"][0]["message"]["content"] == WORDS
    # the client asked A: C does not know the id (C's job under A's forward key has its own)
    r = httpx.get(
        f"{forwarding.c.url}/v1/jobs/{job_id}", headers=auth(forwarding.c.keys["client_key"])
    )
    assert r.status_code == 404


def test_the_forward_node_key_is_kept_private(forwarding: Chain) -> None:
    kept = forwarding.a.data_dir / "forward-node-key"
    assert kept.read_text().startswith("obb_node_")
    assert kept.stat().st_mode & 0o777 == 0o600


# -- the pieces, without processes -------------------------------------------------------


def _record(member_id: str, url: str, **models: int) -> MemberRecord:
    return MemberRecord(
        id=member_id,
        url=url,
        started_at=1.0,
        ts=2.0,
        ttl=30,
        models={m: ModelLoad(nodes=n) for m, n in models.items()},
    )


def test_remote_only_models_are_those_other_members_own_nodes_serve_and_ours_do_not() -> None:
    members = [
        _record("srv_b", "http://b:1", shared=1, only_b=2, gone=0),
        _record("srv_c", "http://c:1", shared=1, only_c=1),
    ]
    assert remote_only(members, own={"shared", "mine"}) == {"only_b", "only_c"}


class _FakeSwarm:
    member_id = "srv_a"
    secret = SwarmSecret(SECRET)

    def __init__(self, records: list[MemberRecord]) -> None:
        self.records = records

    def serving(self, model: str) -> list[MemberRecord]:
        return [r for r in self.records if r.models.get(model, ModelLoad()).nodes > 0]


def test_the_forwarder_targets_members_serving_the_model_in_order_never_itself(
    tmp_path: Path,
) -> None:
    swarm = _FakeSwarm(
        [
            _record("srv_c", "http://c:1", m=1),
            _record("srv_a", "http://a:1", m=1),  # a stale view of itself: never a target
            _record("srv_b", "http://b:1", m=1),
        ]
    )
    settings = load_settings(tmp_path, host="0.0.0.0", port=8123)
    forwarder = Forwarder(swarm, None, None, settings)  # type: ignore[arg-type]
    assert forwarder.targets("m") == ["http://c:1", "http://b:1"]
    assert forwarder.targets("other") == []
    assert loopback_url(settings) == "http://127.0.0.1:8123"


def test_the_least_loaded_member_is_the_first_target(tmp_path: Path) -> None:
    """With the member's own view of the swarm: queued jobs of the model first, then
    running jobs per node."""
    identity = ServerIdentity("srv_a", "a", "http://a:1", "0", 1.0)
    config = SwarmConfig(identity, SwarmSecret(SECRET), "127.0.0.1", 0, "127.0.0.1", (), 1.0)

    async def no_status() -> Any:
        raise AssertionError("not read here")

    member = SwarmMember(config, no_status)
    loads = {"srv_b": ModelLoad(queued=5, nodes=1), "srv_c": ModelLoad(queued=0, nodes=1)}
    loads |= {"srv_d": ModelLoad(queued=0, running=4, nodes=1), "srv_e": ModelLoad(nodes=0)}
    for member_id, load in loads.items():
        record = _record(member_id, f"http://{member_id[-1]}:1")
        member._see(record.model_copy(update={"models": {"m": load}}))
    forwarder = Forwarder(member, None, None, load_settings(tmp_path))  # type: ignore[arg-type]
    assert forwarder.targets("m") == ["http://c:1", "http://d:1", "http://b:1"]


def test_the_forward_client_key_is_derived_from_the_member_id_and_signed() -> None:
    signer = SwarmSecret(SECRET)
    key = derived_key(Role.CLIENT, signer, "forward:srv_a")
    assert key.secret == derived_key(Role.CLIENT, signer, "forward:srv_a").secret
    assert key.secret.startswith("obb_client_s1")
    assert verified_id(key.secret, signer) == key.record.id
    assert derived_key(Role.CLIENT, signer, "forward:srv_b").secret != key.secret
    assert verified_id(key.secret, SwarmSecret("another swarm's secret, 16+")) is None


@pytest.fixture
def upstreams() -> Iterator[dict[str, Any]]:
    """Two small OpenAI-ish servers: `ok` answers every chat, `busy` answers 503; and
    what `ok` was sent."""
    seen: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def ok(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((dict(request.headers), body))
        content = body["messages"][-1]["content"]
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    async def busy(request: web.Request) -> web.Response:
        error = {"message": "no live node serves it", "code": "model_not_available"}
        return web.json_response({"error": error}, status=503)

    yield {"ok": ok, "busy": busy, "seen": seen}


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def _run(backend: SwarmBackend, content: str = "hi") -> list[Chunk]:
    request = {"model": "m", "messages": [{"role": "user", "content": content}], "stream": False}
    return [c async for c in backend.execute("/v1/chat/completions", request)]


def _backend(targets: list[str]) -> SwarmBackend:
    config = SwarmModel(name="m", backend="swarm", api_key="obb_client_x", forwarded_by="srv_a")
    return SwarmBackend(config, targets=lambda model: targets if model == "m" else [])


def _noop(state: str, fraction: float, done: int | None = None, total: int | None = None) -> None:
    pass


async def test_the_backend_fails_over_past_dead_and_busy_members(
    upstreams: dict[str, Any],
) -> None:
    ok, ok_url = await _serve(upstreams["ok"])
    busy, busy_url = await _serve(upstreams["busy"])
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    backend = _backend([dead_url, busy_url, ok_url])
    try:
        await backend.load(_noop)
        [last] = await _run(backend, "over there")
        assert last.response is not None
        assert last.response["choices"][0]["message"]["content"] == "over there"
        [(headers, body)] = upstreams["seen"]
        assert headers[FORWARDED_HEADER] == "srv_a"
        assert headers["Authorization"] == "Bearer obb_client_x"
        assert body["metadata"] == {FORWARDED_METADATA: "srv_a"}
    finally:
        await backend.close()
        await ok.cleanup()
        await busy.cleanup()


async def test_the_backend_fails_retryably_when_no_member_answers(
    upstreams: dict[str, Any],
) -> None:
    busy, busy_url = await _serve(upstreams["busy"])
    backend = _backend([f"http://127.0.0.1:{free_port()}", busy_url])
    try:
        await backend.load(_noop)
        with pytest.raises(BackendError) as failed:
            await _run(backend)
        assert failed.value.retryable and failed.value.status == 503
        backend._targets = lambda model: []
        with pytest.raises(BackendError) as none:
            await _run(backend)
        assert none.value.retryable and none.value.code == "model_not_available"
    finally:
        await backend.close()
        await busy.cleanup()


async def test_an_error_after_output_is_not_retried_elsewhere(upstreams: dict[str, Any]) -> None:
    """A member that dies mid-stream fails the attempt: sending the job to the next one
    would repeat the text the client already has."""

    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        piece = {"choices": [{"index": 0, "delta": {"content": "half"}}]}
        await response.write(b"data: " + json.dumps(piece).encode() + b"\n\n")
        assert request.transport is not None
        request.transport.close()
        return response

    dying, dying_url = await _serve(dies)
    ok, ok_url = await _serve(upstreams["ok"])
    backend = _backend([dying_url, ok_url])
    got: list[str] = []
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}  # streamed
    try:
        await backend.load(_noop)
        with pytest.raises(BackendError) as failed:
            async for chunk in backend.execute("/v1/chat/completions", request):
                got.append(chunk.text)
        assert failed.value.retryable
        assert got == ["half"] and upstreams["seen"] == []
    finally:
        await backend.close()
        await dying.cleanup()
        await ok.cleanup()


class _Inner:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.config = SwarmModel(name="m", backend="swarm")
        self.state, self.progress, self.error = "ready", 1.0, None

    async def load(self) -> None:
        pass

    async def run(self, job: LeasedJob) -> Outcome:
        self.ran.append(job.id)
        return Outcome({"result": {}})

    async def close(self) -> None:
        pass


async def test_a_job_that_came_forwarded_is_not_forwarded_again() -> None:
    inner = _Inner()
    marks = {"job_1": None, "job_2": "srv_b"}

    async def forwarded_by(job_id: str) -> str | None:
        await asyncio.sleep(0)
        return marks[job_id]

    guard = NotTwice(inner, forwarded_by)
    job = LeasedJob("job_1", "lease_1", "m", "/v1/chat/completions", {})
    assert (await guard.run(job)).error is None
    refused = await guard.run(LeasedJob("job_2", "lease_2", "m", "/v1/chat/completions", {}))
    assert refused.error is not None and refused.error["retryable"] is True
    assert "forwarded here by srv_b" in refused.error["message"]
    assert inner.ran == ["job_1"]
