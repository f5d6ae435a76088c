"""Pinned jobs on real processes: one server and two echo nodes with different names and
labels (from their node_config.toml). Jobs pinned by name, by id, by labels (the OpenAI
SDK's `extra_body`, `/v1/jobs`, a batch's lines, the WebSocket and
`openbeepboop-client submit --node`) run only where pinned; unpinned jobs run anywhere."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.asyncio.client import connect

from openbeepboop.node.config import load_node_config
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Procs,
    child_env,
    echo_model,
    new_server,
    node_id_of,
    start_node,
    write_config,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)


@dataclass
class Fleet:
    server: ServerProcess
    ids: dict[str, str]  # node name -> node id

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.server.keys['client_key']}"}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)

    def sdk(self) -> openai.OpenAI:
        key = self.server.keys["client_key"]
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("pins")
    server = new_server(tmp / "server")
    procs = Procs()
    try:
        ids = {}
        for name, labels in (
            ("alpha", {"site": "lab1"}),
            ("beta", {"site": "lab2", "gpu": "a100"}),
        ):
            config = write_config(
                tmp / f"{name}.toml", server, [echo_model(concurrency=4)], name=name, labels=labels
            )
            ids[name] = node_id_of(start_node(procs, config, tag=name))
        yield Fleet(server, ids)
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


def wait_done(http: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(found) < len(ids) and time.monotonic() < deadline:
        r = http.post("/v1/results/poll", json={"ids": ids, "wait": 5, "only_final": True})
        found.update({j["id"]: j for j in r.json()["data"]})
    assert len(found) == len(ids), f"{len(found)} of {len(ids)} jobs final"
    assert {j["status"] for j in found.values()} == {"completed"}, found
    return found


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}


def test_nodes_show_their_labels(fleet: Fleet) -> None:
    with fleet.http() as http:
        nodes = http.get("/v1/nodes").json()["data"]
    assert {n["name"]: n["labels"] for n in nodes} == {
        "alpha": {"site": "lab1"},
        "beta": {"site": "lab2", "gpu": "a100"},
    }


def test_pinned_jobs_run_only_where_pinned(fleet: Fleet) -> None:
    alpha, beta = fleet.ids["alpha"], fleet.ids["beta"]
    sdk = fleet.sdk()
    # the SDK, synchronous: the answer comes from the pinned node
    for name in ("alpha", "beta"):
        for _ in range(3):
            raw = sdk.chat.completions.with_raw_response.create(
                model="echo", messages=[{"role": "user", "content": "x"}], extra_body={"node": name}
            )
            job_id = raw.headers["x-openbeepboop-job-id"]
            with fleet.http() as http:
                assert http.get(f"/v1/jobs/{job_id}").json()["node_id"] == fleet.ids[name]
    with fleet.http() as http:
        pinned = {"alpha": [], "beta": [], "free": []}
        specs = []
        for i in range(40):
            where = ("alpha", "beta", "free")[i % 3]
            spec: dict[str, Any] = {"body": chat(f"job {i}")}
            if where == "alpha":
                spec["node"] = alpha if i % 2 else "alpha"  # by id or by name
            elif where == "beta":
                spec["node_labels"] = {"gpu": "a100"}
            specs.append((where, spec))
        r = http.post("/v1/jobs", json={"jobs": [s for _, s in specs]})
        assert r.status_code == 202, r.text
        for (where, _), job in zip(specs, r.json()["data"], strict=True):
            pinned[where].append(job["id"])
        done = wait_done(http, [j for ids in pinned.values() for j in ids])
    assert {done[j]["node_id"] for j in pinned["alpha"]} == {alpha}
    assert {done[j]["node_id"] for j in pinned["beta"]} == {beta}
    assert {done[j]["node_id"] for j in pinned["free"]} <= {alpha, beta}


def test_batch_lines_carry_their_pins(fleet: Fleet) -> None:
    sdk = fleet.sdk()
    lines = []
    for i in range(12):
        pin = {"node": "alpha"} if i % 2 else {"node_labels": {"site": "lab2"}}
        body = chat(f"line {i}", **pin)
        lines.append(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    data = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    upload = sdk.files.create(file=("pins.jsonl", io.BytesIO(data)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    out = [json.loads(x) for x in sdk.files.content(batch.output_file_id).text.splitlines()]
    with fleet.http() as http:
        jobs = http.get("/v1/jobs", params={"limit": 100}).json()["data"]
    node_of = {j["custom_id"]: j["node_id"] for j in jobs if j["custom_id"]}
    assert len(out) == 12
    for i in range(12):
        assert node_of[f"r{i}"] == fleet.ids["alpha" if i % 2 else "beta"]
    # a line pinned to a node nobody has registered fails the batch, naming the node
    bad = {**lines[0], "body": chat("x", node="gamma")}
    data = (json.dumps(bad) + "\n").encode()
    upload = sdk.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed") and time.monotonic() < deadline + 30:
        time.sleep(0.2)
        batch = sdk.batches.retrieve(batch.id)
    assert batch.status == "failed" and batch.errors is not None
    [error] = batch.errors.data or []
    assert error.code == "unknown_node" and "gamma" in (error.message or "")


def test_cli_submit_node_and_label(fleet: Fleet) -> None:
    env = child_env(
        OPENBEEPBOOP_BASE_URL=fleet.server.url,
        OPENBEEPBOOP_API_KEY=fleet.server.keys["client_key"],
    )

    def submit(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "openbeepboop.cli.client", "--json", "submit", "-m", "echo"]
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    for name in ("alpha", "beta"):
        out = submit("hello", "--node", name, "--wait")
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)
        assert (job["node"], job["node_id"]) == (name, fleet.ids[name])
    out = submit("hello", "--label", "site=lab1", "--label", "x=", "--wait")
    assert out.returncode == 7 and "site=lab1, x=" in out.stderr  # nobody has x=""
    out = submit("hello", "--label", "site=lab1", "--wait")
    assert json.loads(out.stdout)["node_id"] == fleet.ids["alpha"]
    out = submit("hello", "--node", "gamma")
    assert out.returncode == 7 and "no node named 'gamma' has registered" in out.stderr
    out = submit("hello", "--label", "gpu")
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
    argv = [sys.executable, "-m", "openbeepboop.cli.client", "nodes"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "labels: gpu=a100, site=lab2" in out.stdout and "labels: site=lab1" in out.stdout


def test_websocket_add_takes_a_pin(fleet: Fleet) -> None:
    url = fleet.server.url.replace("http://", "ws://") + "/ws"
    auth = {"Authorization": f"Bearer {fleet.server.keys['client_key']}"}
    assistant = {
        "streams": [
            {
                "provider": "local",
                "settings": {"model": "echo"},
                "messages": [{"role": "user", "content": "{query}"}],
            }
        ]
    }

    async def run() -> list[str]:
        job_ids = []
        async with connect(url, additional_headers=auth) as ws:
            for i in range(4):
                add = {"type": "add", "id": f"w{i}", "query": "hi", "assistant": assistant}
                add |= {"node": "beta"} if i % 2 else {"node_labels": {"site": "lab1"}}
                await ws.send(json.dumps(add))
            done = 0
            while done < 4:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert msg["type"] != "failed" and msg["type"] != "error", msg
                if msg["type"] == "resp_add":
                    job_ids.append(msg["job_id"])
                done += msg["type"] == "done"
        return job_ids

    job_ids = asyncio.run(run())
    with fleet.http() as http:
        jobs = [http.get(f"/v1/jobs/{j}").json() for j in job_ids]
    assert len(jobs) == 4
    for job in jobs:
        expected = "beta" if job["node"] == "beta" else "alpha"
        assert job["node_labels"] == (None if expected == "beta" else {"site": "lab1"})
        assert job["node_id"] == fleet.ids[expected]


def test_node_setup_writes_labels(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    argv = [sys.executable, "-m", "openbeepboop.cli.node", "setup", "--non-interactive"]
    argv += ["--config", str(config), "--server", "http://127.0.0.1:9", "--api-key", "k"]
    argv += ["--name", "mac", "--label", "gpu=m3", "--label", "site=lab2", "--no-check"]
    out = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = load_node_config(config)
    assert (loaded.node.name, loaded.node.labels) == ("mac", {"gpu": "m3", "site": "lab2"})
