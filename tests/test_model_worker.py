"""A model in a worker process of its own (node/worker.py): a real server, a real node
whose echo model runs in a worker (`worker = true`, the same machinery llama.cpp models
use by default), the worker killed with `kill -9` mid-job, stopped when idle and started
again by the next job, a model that cannot load."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.nodes import (
    Proc,
    Procs,
    auth,
    echo_model,
    get_job,
    node_id_of,
    start_node,
    submit_chat,
    wait_until,
    write_config,
)

WORDS = " ".join(f"w{i}" for i in range(40))


def worker_pids(node: Proc) -> list[int]:
    """The node's worker processes (its children running worker_process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == node.pid and b"openbeepboop.node.worker_process" in cmdline:
            found.append(int(entry.name))
    return found


def model_state(server: ServerProcess, node_id: str) -> dict[str, Any] | None:
    r = httpx.get(server.url + "/v1/nodes", headers=auth(server.keys["admin_key"]), timeout=5)
    for node in r.json()["data"]:
        if node["id"] == node_id:
            models = (node.get("stats") or {}).get("models") or []
            return next((m for m in models if m["name"] == "echo"), None)
    return None


@pytest.fixture
def worker_node(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> Iterator[tuple[ServerProcess, Proc, str]]:
    server = server_process()
    procs = Procs()
    model = echo_model(token_delay_ms=50, worker=True, idle_unload_seconds=1.5)
    config = write_config(tmp_path / "node.toml", server, [model])
    try:
        node = start_node(procs, config)
        yield server, node, node_id_of(node)
    finally:
        procs.close()


def test_a_worker_killed_mid_job_is_restarted_and_the_job_completes(
    worker_node: tuple[ServerProcess, Proc, str],
) -> None:
    server, node, _node_id = worker_node
    [first] = wait_until(lambda: worker_pids(node), 10, "the worker process")
    job_id = submit_chat(server, WORDS)
    wait_until(lambda: get_job(server, job_id)["status"] == "in_progress", 10, "the start")
    os.kill(first, signal.SIGKILL)
    done = wait_until(
        lambda: (j := get_job(server, job_id))["status"] in ("completed", "failed") and j,
        30,
        "the job to end",
    )
    assert done["status"] == "completed", done
    assert done["result"]["choices"][0]["message"]["content"] == WORDS
    assert done["attempts"] == 1  # handed to a new worker on the same node, not charged
    assert node.alive()
    [second] = worker_pids(node)
    assert second != first
    assert 'event="worker died"' in node.stderr()


def node_events(server: ServerProcess, node_id: str, seen: list[dict[str, Any]]) -> None:
    """Collect `GET /v1/nodes/{id}/events` into `seen` until the stream (or the server)
    ends."""
    headers = auth(server.keys["client_key"])
    url = f"{server.url}/v1/nodes/{node_id}/events"
    with (
        contextlib.suppress(httpx.HTTPError),
        httpx.stream("GET", url, headers=headers, timeout=30) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line.removeprefix("data: ")))


def test_an_idle_worker_is_unloaded_and_the_next_job_loads_it_again(
    worker_node: tuple[ServerProcess, Proc, str],
) -> None:
    server, node, node_id = worker_node
    events: list[dict[str, Any]] = []
    watcher = threading.Thread(target=node_events, args=(server, node_id, events), daemon=True)
    watcher.start()
    wait_until(
        lambda: (model_state(server, node_id) or {}).get("state") == "unloaded",
        15,
        "the idle worker to be unloaded",
    )
    assert worker_pids(node) == []  # its memory is given back: no process left
    shown = subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.client", "nodes"],
        env={
            **os.environ,
            "OPENBEEPBOOP_BASE_URL": server.url,
            "OPENBEEPBOOP_API_KEY": server.keys["client_key"],
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0 and "echo: unloaded" in shown.stdout, shown
    job_id = submit_chat(server, "back again")
    done = wait_until(
        lambda: (j := get_job(server, job_id))["status"] == "completed" and j, 20, "the job"
    )
    assert done["result"]["choices"][0]["message"]["content"] == "back again"
    seen = wait_until(
        lambda: (s := (model_state(server, node_id) or {}).get("state")) in ("ready", "busy") and s,
        5,
        "the model ready again",
    )
    assert seen in ("ready", "busy")
    # the node's event stream told the same story, live
    assert events[0]["type"] == "node" and events[0]["node"]["id"] == node_id

    def after_unloaded() -> list[str | None]:
        kinds = [e.get("state") for e in events if e["type"] == "state"]
        return kinds[kinds.index("unloaded") :] if "unloaded" in kinds else []

    wait_until(
        lambda: any(k in ("ready", "busy") for k in after_unloaded()),
        5,
        "the node's events to show the model ready again after 'unloaded'",
    )
    # The watcher's event stream is still open, and a SIGTERM would have the server wait
    # out its 10 s graceful shutdown for it: this server is done with, so it is killed.
    server.kill(signal.SIGKILL)
    watcher.join(timeout=10)
    assert not watcher.is_alive()


def test_a_model_that_cannot_load_in_its_worker_is_reported(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_process()
    procs = Procs()
    missing = {"name": "gone", "backend": "llama_cpp", "path": str(tmp_path / "no.gguf")}
    config = write_config(tmp_path / "node.toml", server, [echo_model(), missing])
    try:
        node = start_node(procs, config)
        node_id = node_id_of(node)  # echo still loads; the node serves it
        assert "model_unavailable" in node.stderr() or "not found" in node.stderr()
        assert worker_pids(node) == []  # the failed worker is gone
        r = httpx.get(server.url + "/v1/nodes", headers=auth(server.keys["admin_key"]))
        [shown] = [n for n in r.json()["data"] if n["id"] == node_id]
        states = {m["name"]: m for m in shown["models"]}
        assert states["gone"]["state"] == "error" and "not found" in states["gone"]["error"]
        # the machine, as the node found it (a llama.cpp model: what llama.cpp offloads to)
        hardware = shown["hardware"]
        assert hardware["cpus"] == os.cpu_count() and hardware["ram_bytes"] > 0
        assert isinstance(hardware["llama_gpu_offload"], bool)
        assert "CPU" in hardware["llama_system"]
    finally:
        procs.close()
