"""Helpers for tests that run real node processes (and the OpenAI mock) against a real
server: configs, processes that are always cleaned up, polling with deadlines."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import tomli_w

from tests.conftest import ServerProcess, cli, free_port

T = TypeVar("T")
MOCK_SCRIPT = Path(__file__).with_name("mock_openai.py")

# conftest's ServerProcess.start leaves its handle on server.log open (it is reopened on
# every restart); that is not what these tests check, every other warning still fails.
SERVER_LOG_WARNING = (
    r"ignore:Exception ignored in.*server\.log:pytest.PytestUnraisableExceptionWarning"
)


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- processes -------------------------------------------------------------------------


class Proc:
    """A child process whose stdout and stderr go to files; `stop` always reaps it."""

    def __init__(self, argv: list[str], out: Path, err: Path, env: dict[str, str]) -> None:
        self.out_path, self.err_path = out, err
        out.parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[bytes] = out.open("ab")
        self._err: IO[bytes] = err.open("ab")
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err, env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout=timeout)
        self._close_files()
        return code

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._close_files()

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            if not f.closed:
                f.close()

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


class Procs:
    """Every process a test starts; `close` kills whatever is left."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.items.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.items):
            proc.stop(signal.SIGKILL)


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without OPENBEEPBOOP_* overrides that would leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def new_server(data_dir: Path, **env: str) -> ServerProcess:
    """Set up and start a real server (as conftest's `server_process` does), for fixtures
    wider than one test; the caller stops it."""
    keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
    server = ServerProcess(data_dir, free_port(), keys, {"OPENBEEPBOOP_RATE_LIMIT": "", **env})
    server.start()
    return server


# -- nodes -----------------------------------------------------------------------------


def write_config(
    path: Path,
    server: ServerProcess,
    models: list[dict[str, Any]],
    **node: Any,
) -> Path:
    """A node config (TOML) whose outbox lives next to it unless `state_dir` is given."""
    section: dict[str, Any] = {
        "state_dir": str(path.parent / f"{path.stem}-state"),
        "heartbeat_seconds": 0.5,
        "poll_seconds": 2,
        "drain_seconds": 10,
        **node,
    }
    data = {
        "server": {"url": server.url, "api_key": server.keys["node_key"]},
        "node": section,
        "models": models,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def echo_model(delay_ms: float = 0, **extra: Any) -> dict[str, Any]:
    return {"name": "echo", "backend": "echo", "delay_ms": delay_ms, **extra}


def start_node(
    procs: Procs, config: Path, mode: str = "run", tag: str = "node", **env: str
) -> Proc:
    """`openbeepboop-node run|batch --config FILE` as a real process."""
    logs = config.parent
    argv = [sys.executable, "-m", "openbeepboop.cli.node", mode, "--config", str(config)]
    return procs.add(Proc(argv, logs / f"{tag}.out", logs / f"{tag}.err", child_env(**env)))


REGISTERED = re.compile(r"event=registered node_id=(\S+)")


@contextmanager
def with_node(
    server: ServerProcess, config_dir: Path, models: list[dict[str, Any]]
) -> Iterator[ServerProcess]:
    """`server` with one node process serving `models`, registered before the block runs."""
    procs = Procs()
    config = write_config(config_dir / "node.toml", server, models)
    try:
        node_id_of(start_node(procs, config))
        yield server
    finally:
        procs.close()


@contextmanager
def served(data_dir: Path, models: list[dict[str, Any]], **env: str) -> Iterator[ServerProcess]:
    """A new server (`env` as in `new_server`) with one node serving `models`, for fixtures
    wider than one test; both are stopped after the block."""
    server = new_server(data_dir / "server", **env)
    try:
        with with_node(server, data_dir, models):
            yield server
    finally:
        server.kill(signal.SIGTERM)


def node_id_of(node: Proc, timeout: float = 30) -> str:
    """The node_id the node logged when it registered."""

    def found() -> str | None:
        if not node.alive():
            raise AssertionError(f"node exited early:\n{node.stderr()}")
        m = REGISTERED.search(node.stderr())
        return m.group(1) if m else None

    return wait_until(found, timeout, "the node to register")


def log_events(node: Proc, event: str, job_id: str | None = None) -> list[str]:
    """The node's log lines for `event` (and `job_id`, if given)."""
    lines = [ln for ln in node.stderr().splitlines() if f'event="{event}"' in ln]
    if job_id is not None:
        lines = [ln for ln in lines if f"job={job_id}" in ln]
    return lines


# -- the server's client API -----------------------------------------------------------


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def submit_chat(server: ServerProcess, content: str, model: str = "echo", **body: Any) -> str:
    request = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json=request,
        headers=auth(server.keys["client_key"], Prefer="respond-async"),
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def submit_completion(server: ServerProcess, prompt: str, model: str) -> str:
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": model, "prompt": prompt},
        headers=auth(server.keys["client_key"], Prefer="respond-async"),
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def get_job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(
        f"{server.url}/v1/jobs/{job_id}", headers=auth(server.keys["client_key"]), timeout=10
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def cancel_job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.post(
        f"{server.url}/v1/jobs/{job_id}/cancel",
        headers=auth(server.keys["client_key"]),
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def jobs_in(
    server: ServerProcess, ids: list[str], statuses: set[str]
) -> list[dict[str, Any]] | None:
    """All the jobs when each has one of `statuses`, else None (also while unreachable)."""
    try:
        jobs = [get_job(server, i) for i in ids]
    except httpx.HTTPError:
        return None
    return jobs if all(j["status"] in statuses for j in jobs) else None


def wait_jobs(
    server: ServerProcess, ids: list[str], statuses: set[str] | str, timeout: float
) -> list[dict[str, Any]]:
    wanted = {statuses} if isinstance(statuses, str) else statuses
    return wait_until(
        lambda: jobs_in(server, ids, wanted), timeout, f"jobs {ids} to be {sorted(wanted)}"
    )


def answer(job: dict[str, Any]) -> str:
    choice = job["result"]["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


# -- the OpenAI mock -------------------------------------------------------------------


class MockOpenAI:
    """tests/mock_openai.py as a real process."""

    def __init__(self, procs: Procs, logs: Path, *flags: str) -> None:
        self.port = free_port()
        argv = [sys.executable, str(MOCK_SCRIPT), "--port", str(self.port), *flags]
        self.proc = procs.add(Proc(argv, logs / "mock.out", logs / "mock.err", child_env()))
        wait_until(self._ready, 30, "the OpenAI mock to start", interval=0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"mock exited:\n{self.proc.stderr()}")
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def control(self, **settings: Any) -> dict[str, Any]:
        r = httpx.post(self.url + "/control", json=settings, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def requests(self) -> list[dict[str, Any]]:
        r = httpx.get(self.url + "/requests", timeout=10)
        return list(r.json()["requests"])


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]
