"""LlamaNet's native API (`/generate`, `/generate/stream`, `/status`, `/info`) on a real
server with a real echo node: what a LlamaNet client reads, the job behind each
generation, the load figures, and the errors in OpenAI's shape."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from openbeepboop.server.core.generate import pick_model
from openbeepboop.server.errors import InvalidRequest
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Procs,
    auth,
    cancel_job,
    echo_model,
    get_job,
    new_server,
    node_id_of,
    start_node,
    submit_completion,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)

PROMPT = "the quick brown fox jumps over the lazy dog"
NODE_TTL = 3  # seconds: a stopped node stops counting soon


@dataclass
class Setup:
    server: ServerProcess
    node_id: str
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    def key(self, role: str = "client") -> dict[str, str]:
        return auth(self.server.keys[f"{role}_key"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("llamanet")
    server = new_server(tmp / "server", OPENBEEPBOOP_NODE_TTL_SECONDS=str(NODE_TTL))
    procs = Procs()
    try:
        config = write_config(tmp / "node.toml", server, [echo_model()])
        node_id = node_id_of(start_node(procs, config))
        yield Setup(server, node_id, tmp)
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


def post(s: Setup, path: str, body: Any, role: str = "client") -> httpx.Response:
    return httpx.post(s.url + path, json=body, headers=s.key(role), timeout=20)


def get(s: Setup, path: str, role: str = "client") -> httpx.Response:
    return httpx.get(s.url + path, headers=s.key(role), timeout=10)


def served(s: Setup) -> list[str]:
    return list(get(s, "/info").json()["models"])


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if param is not None:
        assert error["param"] == param, error


def test_generate_runs_a_job_on_the_node(setup: Setup) -> None:
    wait_until(lambda: served(setup) == ["echo"], 10, "only echo to be served")
    # no model: the one model live nodes serve
    r = post(setup, "/generate", {"prompt": PROMPT, "max_tokens": 50, "temperature": 0.2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == PROMPT
    assert out["tokens_generated"] == len(PROMPT.split())
    assert out["node_id"] == setup.node_id
    assert out["model"] == "echo"
    assert isinstance(out["generation_time"], float) and 0 <= out["generation_time"] < 10
    assert r.headers["x-openbeepboop-job-id"] == out["id"]
    # an ordinary text-completion job: completed, run by that node
    job = get_job(setup.server, out["id"])
    assert job["status"] == "completed" and job["node_id"] == setup.node_id
    assert job["endpoint"] == "/v1/completions" and job["model"] == "echo"
    assert job["result"]["choices"][0]["text"] == PROMPT
    # max_tokens is passed on (the echo node cuts its words there)
    short = post(setup, "/generate", {"prompt": PROMPT, "max_tokens": 3, "model": "echo"}).json()
    assert short["text"] == "the quick brown" and short["tokens_generated"] == 3
    assert short["finish_reason"] == "length"


def test_stream_pieces_make_the_same_text(setup: Setup) -> None:
    body = {"prompt": PROMPT, "max_tokens": 50, "temperature": 0.7}
    with httpx.stream(
        "POST", setup.url + "/generate/stream", json=body, headers=setup.key(), timeout=20
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    *pieces, last = events
    assert pieces and all(e["finished"] is False and set(e) == {"text", "finished"} for e in pieces)
    assert "".join(e["text"] for e in pieces) == PROMPT
    assert last["finished"] is True and last["text"] == ""
    assert last["tokens_generated"] == len(PROMPT.split())
    assert last["node_id"] == setup.node_id and last["model"] == "echo"
    assert 0 <= last["generation_time"] < 10
    assert r.headers["x-openbeepboop-job-id"] == last["id"]
    assert get_job(setup.server, last["id"])["status"] == "completed"


def test_the_readme_loop_with_requests(setup: Setup) -> None:
    """LlamaNet's own client loop, as its README prints it, plus our Bearer header."""
    response = requests.post(
        setup.url + "/generate/stream",
        json={"prompt": "Explain quantum computing", "max_tokens": 200, "temperature": 0.7},
        headers=setup.key(),
        stream=True,
        timeout=20,
    )
    text, summary = "", None
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            data = json.loads(line[6:])
            if not data.get("finished"):
                text += data["text"]
            else:
                tokens, seconds = data["tokens_generated"], data["generation_time"]
                summary = f"[Generated {tokens} tokens in {seconds:.2f}s]"
                break
    response.close()
    assert text == "Explain quantum computing"
    assert summary is not None and summary.startswith("[Generated 3 tokens in ")


def test_status_and_info(setup: Setup) -> None:
    # a model with queued jobs and no node
    ids = [submit_completion(setup.server, "waits", "ghost") for _ in range(2)]
    try:
        post(setup, "/generate", {"prompt": "warm up", "model": "echo"})
        # the node reports tokens/s in its heartbeats (every 0.5 s)
        status = wait_until(
            lambda: (s := get(setup, "/status").json())["tokens_per_s"] > 0 and s,
            10,
            "the node to report tokens/s",
        )
        assert status["models"]["ghost"] == {"queued": 2, "running": 0, "nodes": 0}
        assert status["models"]["echo"]["nodes"] == 1
        assert status["queued"] == status["queue_depth"] == 2
        assert status["nodes"] == 1 and status["capacity"] == 1
        assert status["load"] == status["queued"] + status["running"]  # one slot
        assert status["tps"] == status["tokens_per_s"]
        assert status["node_id"] == status["id"] and status["id"]
        assert status["url"] == setup.url
        assert 0 <= status["uptime"] < 600 and status["version"]
        # any key: a node's too
        node_view = get(setup, "/status", role="node")
        assert node_view.status_code == 200 and node_view.json()["id"] == status["id"]
        info = get(setup, "/info", role="node").json()
        assert info["id"] == info["node_id"] == status["id"]
        assert info["models"] == ["echo"]  # served: not the model nobody serves
        assert info["dht"] is None and info["url"] == setup.url
        assert info["version"] == status["version"] and info["started_at"] > 0
        assert get(setup, "/dht/status").json()["id"] == status["id"]  # one identity
    finally:
        for job_id in ids:
            cancel_job(setup.server, job_id)
    after = get(setup, "/status").json()
    assert "ghost" not in after["models"] and after["queued"] == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "model": ""}, "model"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ([1, 2], None),
    ],
)
def test_bad_bodies_are_openai_errors(setup: Setup, body: Any, param: str | None) -> None:
    for path in ("/generate", "/generate/stream"):
        assert_openai_error(post(setup, path, body), 400, param)


def test_bad_json_keys_and_models(setup: Setup) -> None:
    for path in ("/generate", "/generate/stream"):
        r = httpx.post(
            setup.url + path,
            content=b'{"prompt": ',
            headers={**setup.key(), "Content-Type": "application/json"},
        )
        assert_openai_error(r, 400)
        assert r.json()["error"]["code"] == "invalid_json"
        # a key, and a client's
        assert_openai_error(httpx.post(setup.url + path, json={"prompt": "x"}), 401)
        assert_openai_error(post(setup, path, {"prompt": "x"}, role="node"), 403)
        # a model no node ever served, while one is live: 404 before any stream starts
        r = post(setup, path, {"prompt": "x", "model": "no-such-model"})
        assert_openai_error(r, 404, "model")
        assert r.headers["content-type"] == "application/json"
    for path in ("/status", "/info"):
        assert_openai_error(httpx.get(setup.url + path), 401)


def test_two_models_need_a_name_and_streams_end_with_their_error(setup: Setup) -> None:
    procs = Procs()
    try:
        slow = echo_model(name="slow", token_delay_ms=300)
        node_id_of(start_node(procs, write_config(setup.tmp / "slow.toml", setup.server, [slow])))
        wait_until(lambda: served(setup) == ["echo", "slow"], 10, "two models to be served")
        for path in ("/generate", "/generate/stream"):
            r = post(setup, path, {"prompt": "which one?"})
            assert_openai_error(r, 400, "model")
            assert "echo" in r.json()["error"]["message"] and "slow" in r.json()["error"]["message"]
        # a job cancelled mid-stream: the last event says so
        body = {"prompt": "one two three four five six seven eight", "model": "slow"}
        with httpx.stream(
            "POST", setup.url + "/generate/stream", json=body, headers=setup.key(), timeout=20
        ) as r:
            lines = r.iter_lines()
            first = next(json.loads(x[6:]) for x in lines if x.startswith("data: "))
            assert first == {"text": "one", "finished": False}
            running = get(setup, "/status").json()
            assert running["models"]["slow"] == {"queued": 0, "running": 1, "nodes": 1}
            assert running["running"] == 1 and running["nodes"] == 2
            cancel_job(setup.server, r.headers["x-openbeepboop-job-id"])
            rest = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
        last = rest[-1]
        assert last["finished"] is True and last["error"]["code"] == "job_cancelled", last
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert len(rest) < 8  # it ended early
        # a key revoked mid-stream: the last event carries the revocation
        made = post(setup, "/v1/admin/keys", {"role": "client", "name": "brief"}, role="admin")
        assert made.status_code == 201, made.text
        headers = auth(made.json()["key"])
        with httpx.stream(
            "POST", setup.url + "/generate/stream", json=body, headers=headers, timeout=20
        ) as r:
            lines = r.iter_lines()
            first = next(json.loads(x[6:]) for x in lines if x.startswith("data: "))
            assert first == {"text": "one", "finished": False}
            revoked = post(setup, f"/v1/admin/keys/{made.json()['id']}/revoke", {}, role="admin")
            assert revoked.status_code == 200, revoked.text
            rest = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
        last = rest[-1]
        assert last["finished"] is True and last["error"]["code"] == "api_key_revoked", last
        assert len(rest) < 8
    finally:
        procs.close()


def test_pick_model() -> None:
    assert pick_model("asked", ["a", "b"]) == "asked"
    assert pick_model(None, ["only", "only"]) == "only"
    for served_models in ([], ["a", "b"]):
        with pytest.raises(InvalidRequest) as caught:
            pick_model(None, served_models)
        assert caught.value.param == "model"
