"""Shared fixtures: an in-process app with keys, and real server processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from openbeepboop.server.http.app import create_app
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import Role
from openbeepboop.server.settings import load_settings


@dataclass
class Api:
    """An app served in-process, with one key of each role and a second client."""

    app: Any
    http: httpx.AsyncClient
    admin: str
    client: str
    other_client: str
    node: str

    def h(self, key: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", **extra}

    async def register(self, models: list[str], key: str | None = None) -> str:
        r = await self.http.post(
            "/internal/nodes/register",
            json={"name": "test-node", "models": [{"name": m} for m in models]},
            headers=self.h(key or self.node),
        )
        assert r.status_code == 200, r.text
        return str(r.json()["node_id"])

    async def submit(
        self, content: str = "hi", model: str = "echo", **extra: Any
    ) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        r = await self.http.post(
            "/v1/chat/completions",
            json=body,
            headers=self.h(self.client, Prefer="respond-async"),
        )
        assert r.status_code == 202, r.text
        return dict(r.json())


@asynccontextmanager
async def serve_in_process(data_dir: Path, **overrides: Any) -> AsyncIterator[Api]:
    settings = load_settings(data_dir, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        ring = app_state(app).keyring
        keys = [(await ring.create(role)).secret for role in (Role.ADMIN, Role.CLIENT, Role.CLIENT)]
        node = (await ring.create(Role.NODE)).secret
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield Api(app, http, keys[0], keys[1], keys[2], node)


@pytest.fixture(params=[True, False], ids=["lane", "no-lane"])
def fast_lane(request: pytest.FixtureRequest) -> bool:
    """Every in-process HTTP test runs with the fast lane on and off: both paths must
    answer alike."""
    return bool(request.param)


@pytest.fixture
async def api(tmp_path: Path, fast_lane: bool) -> AsyncIterator[Api]:
    """An in-process server with default settings (rate limits off for speed)."""
    async with serve_in_process(
        tmp_path, rate_limit="", model_wait_seconds=0.5, fast_lane=fast_lane
    ) as a:
        yield a


@pytest.fixture
def make_api(tmp_path: Path, fast_lane: bool) -> Callable[..., Any]:
    """`async with make_api(**settings) as api:` for tests that need other settings."""
    counter = iter(range(1000))

    def factory(**overrides: Any) -> Any:
        overrides.setdefault("fast_lane", fast_lane)
        return serve_in_process(tmp_path / f"api{next(counter)}", **overrides)

    return factory


# -- real processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run `openbeepboop-server ARGS` and return its parsed JSON output."""
    out = subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@dataclass
class ServerProcess:
    """A real `openbeepboop-server start` on loopback."""

    data_dir: Path
    port: int
    keys: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.log = self.data_dir / "server.log"
        with self.log.open("ab") as out:
            self.proc = self._spawn(out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def _spawn(self, out: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openbeepboop.cli.server",
                "start",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """`server_process(**env)` sets up a data dir and starts a real server."""
    started: list[ServerProcess] = []

    def factory(**env: str) -> ServerProcess:
        data_dir = tmp_path / f"server{len(started)}"
        full_env = {"OPENBEEPBOOP_RATE_LIMIT": "", **env}
        keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
        server = ServerProcess(data_dir, free_port(), keys, full_env)
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.kill(signal.SIGTERM)


# -- PostgreSQL ------------------------------------------------------------------------

POSTGRES_ABSENT = pytest.StashKey[str]()


def _needs_postgres(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    by_param = callspec is not None and callspec.params.get("store") == "postgres"
    return by_param or "postgres" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a PostgreSQL server, leave its tests out with one message at the end
    (rather than one skip line per test). Under CI they stay in, and fail."""
    wanted = [item for item in items if _needs_postgres(item)]
    if not wanted or os.environ.get("CI"):
        return
    from tests.pg import HOW_TO, admin_url, problem_with

    problem = problem_with(admin_url())
    if problem is None:
        return
    config.stash[POSTGRES_ABSENT] = (
        f"{len(wanted)} PostgreSQL tests not run: no server at {admin_url()} ({problem}); "
        f"to run them, {HOW_TO} (README: Development)"
    )
    config.hook.pytest_deselected(items=wanted)
    items[:] = [item for item in items if not _needs_postgres(item)]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    note = config.stash.get(POSTGRES_ABSENT, None)
    if note:
        terminalreporter.write_sep("-", "PostgreSQL", yellow=True)
        terminalreporter.write_line(note, yellow=True)


@pytest.fixture(scope="session")
def postgres() -> str:
    """The URL of a PostgreSQL server whose user may create databases (tests/pg.py);
    checked once per session: without one, every test that needs it is skipped with
    the same message (under CI it fails)."""
    from tests.pg import require_postgres

    return require_postgres()


# The web interface's browser fixtures (`chrome`, `web`), module-scoped, for tests/test_web_*.py;
# imported last: tests/browser.py imports this module's ServerProcess.
from tests.browser import chrome, web  # noqa: E402, F401
