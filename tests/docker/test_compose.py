"""The compose files of compose/, brought up as an operator would, with keys passed in
the environment (compose/example.env), never in the image."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import free_port
from tests.docker.engine import Images, compose_project, docker, wait_healthy

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
COMPOSE = HERE.parents[1] / "compose"


def _env(images: Images, keys: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        "OBB_IMAGE": images.app,
        "OPENBEEPBOOP_ADMIN_KEY": keys["admin"],
        "OPENBEEPBOOP_NODE_KEY": keys["node"],
        "OPENBEEPBOOP_CLIENT_KEY": keys["client"],
        **extra,
    }


def _until(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as exc:  # a server restarting
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: still {last!r} after {timeout} s")


def _live_nodes(http: httpx.Client, admin: str) -> int:
    r = http.get("/v1/nodes", headers={"Authorization": f"Bearer {admin}"})
    return len(r.json()["data"]) if r.status_code == 200 else 0


def _submit(http: httpx.Client, key: str, text: str) -> str:
    """Submit until acknowledged: a refused connection (the server restarting) is retried;
    only a 202 counts."""

    def once() -> str | None:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": text}]},
            headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async"},
        )
        return str(r.json()["id"]) if r.status_code == 202 else None

    return str(_until(f"submit {text!r}", once, timeout=90))


def _answer(http: httpx.Client, key: str, job: str) -> str | None:
    r = http.get(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"})
    if r.status_code != 200:
        return None
    got = r.json()
    assert got["status"] in ("queued", "in_progress", "completed"), got
    if got["status"] != "completed":
        return None
    return str(got["result"]["choices"][0]["message"]["content"])


def test_compose_files_refuse_to_start_without_keys(images: Images) -> None:
    """A newcomer who forgot compose/.env is told what to do, before anything starts."""
    for name in ("nodes.yaml", "postgres.yaml"):
        with compose_project([COMPOSE / name], f"obbtest{secrets.token_hex(3)}", {}) as p:
            done = p.run("config", check=False)
            assert done.returncode != 0
            assert "compose/.env" in done.stderr, done.stderr


def test_server_and_nodes_run_100_jobs_through_a_server_restart(
    images: Images, keys: dict[str, str]
) -> None:
    port = free_port()
    env = _env(
        images,
        keys,
        OBB_PORT=str(port),
        OBB_TEST_NODE_CONFIG=str(HERE / "echo-node.toml"),
    )
    files = [COMPOSE / "nodes.yaml", HERE / "nodes-test.yaml"]
    with (
        compose_project(files, f"obbtest{secrets.token_hex(3)}", env) as project,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        project.run("up", "-d", "--scale", "node=2", timeout=600)
        server = project.container("server")
        wait_healthy(server)
        _until("two live nodes", lambda: _live_nodes(http, keys["admin"]) == 2)

        texts = [f"job {n} {secrets.token_hex(4)}" for n in range(100)]
        jobs = [_submit(http, keys["client"], t) for t in texts[:50]]
        # mid-run: nodes hold leases and results while the server is away
        project.run("restart", "-t", "30", "server", timeout=120)
        jobs += [_submit(http, keys["client"], t) for t in texts[50:]]
        for job, text in zip(jobs, texts, strict=True):
            answer = _until(f"{job} completed", lambda j=job: _answer(http, keys["client"], j))
            assert answer == text
        assert docker("inspect", "-f", "{{.RestartCount}} {{.State.Running}}", server)

        # `down` stops the nodes first (they drain), then the server; the volume stays
        project.run("down", "-t", "60", timeout=180)
        project.run("up", "-d", "--scale", "node=2", timeout=600)
        wait_healthy(project.container("server"))
        for job, text in zip(jobs, texts, strict=True):
            assert _answer(http, keys["client"], job) == text
        logs = project.logs()
        assert "Traceback" not in logs, logs[-3000:]


def test_postgres_replicas_behind_the_proxy(images: Images, keys: dict[str, str]) -> None:
    port, port_1, port_2 = free_port(), free_port(), free_port()
    env = _env(
        images,
        keys,
        OBB_PORT=str(port),
        OBB_TEST_PORT_1=str(port_1),
        OBB_TEST_PORT_2=str(port_2),
        POSTGRES_PASSWORD=secrets.token_urlsafe(16),
        POSTGRES_IMAGE=images.postgres,
        NGINX_IMAGE=images.nginx,
    )
    files = [COMPOSE / "postgres.yaml", HERE / "postgres-test.yaml"]
    with (
        compose_project(files, f"obbtest{secrets.token_hex(3)}", env) as project,
        httpx.Client(base_url=f"http://127.0.0.1:{port_1}", timeout=10) as one,
        httpx.Client(base_url=f"http://127.0.0.1:{port_2}", timeout=10) as two,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as proxy,
    ):
        project.run("up", "-d", "--scale", "node=1", timeout=600)
        for service in ("server-1", "server-2"):
            wait_healthy(project.container(service))
        _until("the proxy", lambda: proxy.get("/health").status_code == 200)
        _until("a live node", lambda: _live_nodes(proxy, keys["admin"]) == 1)

        # submitted through one replica, collected through the other
        text = f"hello {secrets.token_hex(4)}"
        job = _submit(one, keys["client"], text)
        assert _until("the job on replica 2", lambda: _answer(two, keys["client"], job)) == text
        job = _submit(two, keys["client"], text + "!")
        assert _until("the job on replica 1", lambda: _answer(one, keys["client"], job)) == (
            text + "!"
        )
        # and through the proxy with the openai SDK, streamed
        sdk = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys["client"])
        stream = sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "through nginx"}], stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == "through nginx"
        # both replicas work on the one database: each lists the other's jobs
        listed = one.get("/v1/jobs", headers={"Authorization": f"Bearer {keys['client']}"})
        assert job in {j["id"] for j in listed.json()["data"]}


def test_swarm_members_join_the_bootstrap(images: Images) -> None:
    port, dht_port = free_port(), free_port()
    env = {
        "OBB_IMAGE": images.app,
        "OBB_PORT": str(port),
        "OBB_DHT_PORT": str(dht_port),
        "OPENBEEPBOOP_SWARM_SECRET": secrets.token_urlsafe(24),
    }
    with (
        compose_project([COMPOSE / "swarm.yaml"], f"obbtest{secrets.token_hex(3)}", env) as p,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        p.run("up", "-d", "--scale", "member=1", timeout=600)
        bootstrap = p.container("bootstrap")
        wait_healthy(bootstrap)
        key = docker("exec", bootstrap, "cat", "/data/client.key").stdout.strip()
        headers = {"Authorization": f"Bearer {key}"}

        def members() -> int:
            return len(http.get("/dht/status", headers=headers).json().get("members", []))

        _until("both members in the bootstrap's view", lambda: members() == 2, timeout=90)
        # a client key the bootstrap made works on the member too (one swarm secret)
        member = p.container("member")
        wait_healthy(member)
        probe = (
            "import urllib.request as u; r = u.Request('http://127.0.0.1:8000/v1/models', "
            f"headers={{'Authorization': 'Bearer {key}'}}); print(u.urlopen(r).status)"
        )
        assert docker("exec", member, "python3", "-c", probe).stdout.strip() == "200"
