"""A real `openbeepboop serve` (server + embedded node: `gemma-3-270m` and `echo`) on
loopback, for the client library and client CLI tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port

MODELS = {"echo", "gemma-3-270m"}


@dataclass
class AllInOne:
    data_dir: Path
    port: int
    key: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, route: str) -> float:
        """`openbeepboop_http_requests_total` for `route`, summed over methods and statuses."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("openbeepboop_http_requests_total{") and f'route="{route}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def job_count(self) -> int:
        """Every job of every status the server holds (a client key sees all of its own)."""
        r = httpx.get(
            self.url + "/v1/stats", headers={"Authorization": f"Bearer {self.key}"}, timeout=10
        )
        r.raise_for_status()
        return sum(r.json()["jobs"].values())


def _ready(url: str, key_file: Path) -> bool:
    try:
        if httpx.get(url + "/health", timeout=1).status_code != 200 or not key_file.exists():
            return False
        key = key_file.read_text().strip()
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=2)
        return r.status_code == 200 and {m["id"] for m in r.json()["data"]} >= MODELS
    except httpx.HTTPError:
        return False


@contextmanager
def all_in_one(data_dir: Path, timeout: float = 90) -> Iterator[AllInOne]:
    """Start `openbeepboop serve`, wait until both models are served, yield it; then
    SIGTERM it and check that it exits 0."""
    port = free_port()
    log = data_dir.parent / f"{data_dir.name}.log"
    env = {**os.environ, "OPENBEEPBOOP_RATE_LIMIT": ""}
    for name in ("OPENBEEPBOOP_API_KEY", "OPENBEEPBOOP_BASE_URL", "OPENBEEPBOOP_DATA_DIR"):
        env.pop(name, None)
    command = [sys.executable, "-m", "openbeepboop.cli.main", "serve"]
    command += ["--data-dir", str(data_dir), "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    key_file = data_dir / "client.key"
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url, key_file):
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not get ready: {log.read_text()}")
            time.sleep(0.1)
        server = AllInOne(data_dir, port, key_file.read_text().strip(), proc, log)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
    assert proc.returncode == 0, f"serve exited {proc.returncode}: {log.read_text()[-3000:]}"
