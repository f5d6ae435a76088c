"""The image on its own: `docker run` of the all-in-one (server + a node on the bundled
Gemma 3 270M), as docs/docker.md tells a newcomer to start it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import free_port
from tests.docker.engine import Images, docker, wait_healthy

pytestmark = pytest.mark.slow


@dataclass
class Running:
    name: str
    port: int
    volume: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_key(self) -> str:
        return docker("exec", self.name, "cat", "/data/client.key").stdout.strip()


@pytest.fixture(scope="module")
def allinone(images: Images) -> Iterator[Running]:
    tag = secrets.token_hex(4)
    box = Running(f"obb-test-allinone-{tag}", free_port(), f"obb-test-data-{tag}")
    docker(
        "run", "-d", "--name", box.name, "-p", f"127.0.0.1:{box.port}:8000",
        "-v", f"{box.volume}:/data", images.app,
    )  # fmt: skip
    try:
        wait_healthy(box.name)
        yield box
    finally:
        docker("rm", "-f", box.name, check=False)
        docker("volume", "rm", box.volume, check=False)


def test_runs_as_a_user_without_root(allinone: Running) -> None:
    assert docker("inspect", "-f", "{{.Config.User}}", allinone.name).stdout.strip() == (
        "openbeepboop"
    )
    uids = docker(
        "exec", allinone.name, "sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status"
    ).stdout.split("\n")
    real = {line.split()[1] for line in uids if line.strip()}
    assert real and "0" not in real, uids  # tini, the server and the model worker


def test_the_first_start_prints_keys_and_keeps_the_client_key(allinone: Running) -> None:
    logs = docker("logs", allinone.name)
    key = allinone.client_key()
    assert key.startswith("obb_client_")
    assert key in logs.stdout + logs.stderr  # shown once, in `docker logs`
    # the banner tells clients outside the container a URL they can use
    assert "OPENBEEPBOOP_BASE_URL=http://127.0.0.1:8000" in logs.stderr


def test_answers_a_chat_request_with_the_bundled_model(allinone: Running) -> None:
    client = OpenAI(base_url=allinone.url + "/v1", api_key=allinone.client_key())
    answer = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Name a colour of the sky."}],
        max_tokens=16,
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert {m.id for m in client.models.list()} >= {"gemma-3-270m", "echo"}


def _submit(http: httpx.Client, tokens: int, n: int) -> str:
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": "gemma-3-270m",
            "messages": [{"role": "user", "content": f"Count from one to fifty ({n})."}],
            "max_tokens": tokens,
            "temperature": 0.7,
        },
        headers={"Prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def test_sigterm_drains_and_the_volume_keeps_everything(allinone: Running) -> None:
    key = allinone.client_key()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=allinone.url, headers=headers, timeout=30) as http:
        running = _submit(http, 48, 0)
        queued = [_submit(http, 8, n) for n in range(1, 6)]
        deadline = time.monotonic() + 60
        while http.get(f"/v1/jobs/{running}").json()["status"] != "in_progress":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        started = time.monotonic()
        docker("stop", "-t", "60", allinone.name, timeout=90)
        stopped_in = time.monotonic() - started
    # the embedded node's drain_seconds is 10: it finished what ran, then stopped
    assert stopped_in < 15, stopped_in
    state = docker("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", allinone.name)
    assert state.stdout.split() == ["0", "false"], state.stdout
    logs = docker("logs", allinone.name)
    assert "draining" in logs.stdout + logs.stderr

    docker("start", allinone.name)
    # the published port is the same container's: wait for it to answer again
    wait_healthy(allinone.name)
    assert allinone.client_key() == key  # the volume kept the data directory
    with httpx.Client(base_url=allinone.url, headers=headers, timeout=30) as http:
        done = http.get(f"/v1/jobs/{running}").json()
        assert done["status"] == "completed", done  # finished during the drain
        deadline = time.monotonic() + 120
        for job in queued:  # queued at the stop: kept, and run after the restart
            while (got := http.get(f"/v1/jobs/{job}").json())["status"] != "completed":
                assert got["status"] in ("queued", "in_progress"), got
                assert time.monotonic() < deadline, got
                time.sleep(0.1)


def test_runs_with_a_read_only_root_filesystem(images: Images) -> None:
    """Nothing is written outside the volume (and /tmp): the bundled model was assembled
    when the image was built, not at each start."""
    name, port = f"obb-test-ro-{secrets.token_hex(4)}", free_port()
    docker(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-p", f"127.0.0.1:{port}:8000", images.app,
    )  # fmt: skip
    try:
        wait_healthy(name)
        key = docker("exec", name, "cat", "/data/client.key").stdout.strip()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        answer = client.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content
    finally:
        docker("rm", "-f", "-v", name, check=False)


def test_the_build_secrets_are_not_in_the_image(images: Images) -> None:
    """docker/build.sh hands the build this machine's CA bundle (and pip config) as
    secrets: the CAs this machine added (its TLS-inspecting proxy's, in
    /usr/local/share/ca-certificates) must be nowhere in the image."""
    listed = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        images.app,
        "-c",
        "ls -A /run/secrets 2>/dev/null; true",
    )
    assert listed.stdout.strip() == ""
    local = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    for cert in local:
        body = [ln for ln in cert.read_text().splitlines() if len(ln) == 64]
        marker = body[len(body) // 2]  # a line of base64 no other certificate has
        found = docker(
            "run", "--rm", "--user", "0", "--entrypoint", "grep", images.app,
            "-rlF", marker, "/etc", "/opt", "/home", "/usr/local", "/root",
            check=False, timeout=180,
        )  # fmt: skip
        assert found.stdout == "", f"{cert.name} is in the image: {found.stdout}"
        assert found.returncode == 1, found.stderr  # searched everything, found nothing
