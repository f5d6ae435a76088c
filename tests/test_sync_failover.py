"""A synchronous call whose model loses its node: it fails over to another node serving
the model, or, when none is left, gets a 503 `model_not_available` once the node is
known dead (`node_ttl_seconds`), not after `sync_timeout_seconds`. The job is then
cancelled (the SDK retries a 503 as a new request), unless the call carried an
Idempotency-Key, whose retry finds the same job.

Real server, real echo nodes, `kill -9`."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, cli, free_port
from tests.nodes import (
    SERVER_LOG_WARNING,
    Proc,
    Procs,
    auth,
    echo_model,
    get_job,
    log_events,
    node_id_of,
    start_node,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]

NODE_TTL = 3.0
SLOW_MS = 120_000  # the job never finishes on its first node


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    env = {
        "OPENBEEPBOOP_RATE_LIMIT": "",
        "OPENBEEPBOOP_NODE_TTL_SECONDS": str(NODE_TTL),
        "OPENBEEPBOOP_LEASE_SECONDS": "6",
        "OPENBEEPBOOP_MODEL_WAIT_SECONDS": "2",
    }
    data = tmp_path / "server"
    keys = cli("setup", "--non-interactive", "--data-dir", str(data), "--json", env=env)
    proc = ServerProcess(data, free_port(), keys, env)
    proc.start()
    try:
        yield proc
    finally:
        proc.kill(signal.SIGTERM)


def echo_node(procs: Procs, server: ServerProcess, tmp_path: Path, name: str, **model: Any) -> Proc:
    config = write_config(tmp_path / name / "node.toml", server, [echo_model(**model)], name=name)
    node = start_node(procs, config, tag=name)
    node_id_of(node)
    return node


def chat(server: ServerProcess, content: str, **headers: str) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": content}]}
    return httpx.post(
        server.url + "/v1/chat/completions",
        json=body,
        headers=auth(server.keys["client_key"], **headers),
        timeout=120,
    )


def running_job(server: ServerProcess, node: Proc) -> str:
    """The id of the job `node` started (its log names it)."""
    line = wait_until(lambda: log_events(node, "job started"), 20, "the job to start")[0]
    return line.split("job=")[1].split()[0]


def test_a_sync_call_whose_only_node_dies_gets_503_and_its_job_is_cancelled(
    server: ServerProcess, procs: Procs, tmp_path: Path
) -> None:
    node = echo_node(procs, server, tmp_path, "only", delay_ms=SLOW_MS)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        plain = pool.submit(chat, server, "nobody will answer")
        job_id = running_job(server, node)
        kept = pool.submit(chat, server, "keep me", **{"Idempotency-Key": "retry-me"})
        time.sleep(0.5)
        node.send(signal.SIGKILL)
        killed = time.monotonic()
        answers = [plain.result(timeout=60), kept.result(timeout=60)]
    took = time.monotonic() - killed
    assert took < NODE_TTL + 8, f"answered {took:.1f} s after the node died"
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_not_available"
        assert float(r.headers["Retry-After"]) >= 1
    assert "cancelled" in answers[0].json()["error"]["message"]
    assert get_job(server, job_id)["status"] == "cancelled"
    # the call with an Idempotency-Key left its job queued: a retry finds the same job
    kept_id = answers[1].json()["error"]["message"].split("(job ")[1].split(":")[0]
    assert kept_id != job_id and get_job(server, kept_id)["status"] == "queued"
    later = echo_node(procs, server, tmp_path, "later")
    r = chat(server, "keep me", **{"Idempotency-Key": "retry-me"})
    assert r.status_code == 200, r.text
    assert r.headers["x-openbeepboop-job-id"] == kept_id
    assert r.json()["choices"][0]["message"]["content"] == "keep me"
    assert later.alive()


def test_a_streamed_call_whose_only_node_dies_ends_with_model_not_available(
    server: ServerProcess, procs: Procs, tmp_path: Path
) -> None:
    node = echo_node(procs, server, tmp_path, "only", delay_ms=SLOW_MS)
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = auth(server.keys["client_key"])
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        job_id = r.headers["x-openbeepboop-job-id"]
        running_job(server, node)
        node.send(signal.SIGKILL)
        killed = time.monotonic()
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert time.monotonic() - killed < NODE_TTL + 8
    assert lines[-1] == "data: [DONE]"
    assert '"code":"model_not_available"' in lines[-2].replace(" ", "")
    assert get_job(server, job_id)["status"] == "cancelled"


def test_a_sync_call_fails_over_to_another_node_serving_the_model(
    server: ServerProcess, procs: Procs, tmp_path: Path
) -> None:
    first = echo_node(procs, server, tmp_path, "first", delay_ms=SLOW_MS)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(chat, server, "carry on")
        job_id = running_job(server, first)
        second = echo_node(procs, server, tmp_path, "second")
        first.send(signal.SIGKILL)
        r = call.result(timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "carry on"
    job = get_job(server, job_id)
    assert job["attempts"] == 2 and job["node_id"] == node_id_of(second)
