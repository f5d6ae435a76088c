"""A Docker engine, the images, and compose projects for the container tests.

No registry is reachable on the machines these tests run on, so nothing is pulled: the
base image is made with debootstrap (docker/base-image.sh), the OpenBeepBoop image is
built on it (docker/build.sh, reusing the llama.cpp wheel pip built for `.venv`), and
PostgreSQL and nginx are stand-ins built from Debian's packages (tests/docker/images).
Without an engine the tests are skipped with one message; under CI (`CI` set) they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = Path(__file__).resolve().parent / "images"
BASE_TAG = os.environ.get("OBB_TEST_BASE_IMAGE", "openbeepboop-base:bookworm")
IMAGE_TAG = "openbeepboop:test"
POSTGRES_TAG = "openbeepboop-test-postgres:15"
NGINX_TAG = "openbeepboop-test-nginx:latest"
HOW_TO = (
    "install an engine (`apt-get install docker.io debootstrap docker-compose`, as "
    "`make test-docker` does) and run the tests as root, or start dockerd yourself"
)


def docker(
    *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker ARGS`, its output captured; a failure shows what docker said."""
    done = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {done.returncode}\n{done.stderr[-3000:]}")
    return done


def engine_problem() -> str | None:
    """Why no engine answers, or None."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if done.returncode != 0 or not done.stdout.strip():
        return (done.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return None


@dataclass
class Engine:
    """The engine the tests use; `started` when the tests started dockerd themselves."""

    version: str
    daemon: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.daemon is None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()


def can_start_dockerd() -> bool:
    return shutil.which("dockerd") is not None and os.geteuid() == 0


def missing() -> str | None:
    """Why these tests cannot run here at all (no engine and none to start, or no
    compose), or None; checked before the run, without starting anything."""
    problem = engine_problem()
    if problem is not None and not can_start_dockerd():
        return problem
    if compose_command() is None and shutil.which("docker") is not None:
        return "no compose (`docker compose` or `docker-compose`)"
    return None


def _start_dockerd(log: Path) -> subprocess.Popen[bytes] | None:
    if not can_start_dockerd():
        return None
    with log.open("wb") as out:  # the daemon keeps its own copy of the descriptor
        daemon = subprocess.Popen(
            ["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if engine_problem() is None:
            return daemon
        if daemon.poll() is not None:
            return None
        time.sleep(0.5)
    daemon.kill()
    daemon.wait()
    return None


def require_engine(tmp: Path) -> Engine:
    """A running engine: the one there is, or dockerd started here; else skip (fail
    under CI) with one message."""
    problem = engine_problem()
    daemon = None
    log = tmp / "dockerd.log"
    if problem is not None:
        daemon = _start_dockerd(log)
        if daemon is not None:
            problem = None
    if problem is None and compose_command() is None:
        problem = "no compose (`docker compose` or `docker-compose`)"
    if problem is not None:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        message = f"container tests need a Docker engine ({problem}): {HOW_TO}\n{tail}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    version = docker("info", "--format", "{{.ServerVersion}}").stdout.strip()
    return Engine(version, daemon, log if daemon else None)


def compose_command() -> list[str] | None:
    """Compose v2 (`docker compose`) when the plugin is there, else v1 (`docker-compose`)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=20
        )
        if done.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> float:
    """Run a build step, its output kept only for the failure message; returns seconds."""
    started = time.monotonic()
    done = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {done.returncode}\n{done.stderr[-4000:]}")
    return time.monotonic() - started


@dataclass
class Images:
    """The tags built for this run, and how long each took."""

    app: str = IMAGE_TAG
    postgres: str = POSTGRES_TAG
    nginx: str = NGINX_TAG
    seconds: dict[str, float] = field(default_factory=dict)


def build_images() -> Images:
    """The base image (once per machine), the app image, and the stand-ins."""
    images = Images()
    images.seconds["base"] = _run(["bash", "docker/base-image.sh", BASE_TAG], timeout=900)
    images.seconds["app"] = _run(
        ["bash", "docker/build.sh", "--base", BASE_TAG, "-t", IMAGE_TAG], timeout=2400
    )
    for tag, name in ((POSTGRES_TAG, "postgres"), (NGINX_TAG, "nginx")):
        images.seconds[name] = _run(
            [
                "docker",
                "build",
                "-q",
                "--network",
                "host",
                "--build-arg",
                f"BASE_IMAGE={BASE_TAG}",
                "-t",
                tag,
                "-f",
                str(IMAGES / f"{name}.Dockerfile"),
                str(IMAGES),
            ],
            timeout=900,
            env={"DOCKER_BUILDKIT": "0"},  # plain Dockerfiles: any builder will do
        )
    return images


@dataclass
class Compose:
    """One compose project of the repository's files, with its own name and settings."""

    files: list[Path]
    project: str
    env: dict[str, str]

    def run(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = compose_command()
        assert command is not None
        # only the settings given here: not a compose/.env a developer keeps
        empty = Path(tempfile.gettempdir()) / "openbeepboop-test-empty.env"
        empty.touch()
        cmd = [*command, "--env-file", str(empty), "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        done = subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} -> {done.returncode}\n{done.stderr[-3000:]}"
            )
        return done

    def container(self, service: str, index: int = 1) -> str:
        """The id of a service's container."""
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) >= index, f"no container {index} of {service}"
        return sorted(ids)[index - 1] if index > 1 else ids[0]

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "200", check=False).stdout

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "-t", "60", check=False)


@contextlib.contextmanager
def compose_project(files: list[Path], project: str, env: dict[str, str]) -> Iterator[Compose]:
    """A compose project brought down, volumes and all, afterwards (and before: a run
    killed half-way leaves none behind for the next)."""
    project_ = Compose(files, project, env)
    project_.down()
    try:
        yield project_
    except BaseException:
        print(project_.logs())  # pytest shows it with the failure
        raise
    finally:
        project_.down()


def wait_healthy(container: str, timeout: float = 120) -> None:
    """Until docker says the container's HEALTHCHECK passes."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        if status == "healthy":
            return
        time.sleep(0.5)
    logs = docker("logs", "--tail", "60", container, check=False)
    raise AssertionError(f"{container} is {status!r}, not healthy\n{logs.stdout}{logs.stderr}")
