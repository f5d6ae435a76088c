"""Position and ETA (docs/scheduling.md): a queued job's `estimated_start_at` from its
model's measured pace, in the job object, the 202 answer, the events stream, the client's
`job.eta`, the CLI's `poll`, `get` and `status` (`--watch` too), and `/v1/stats`.

One real server for the module; the test plays the node over the node protocol, so that
the runs it measures take a known time. Under 15 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from openbeepboop.client import Client
from openbeepboop.server.core.eta import Pace, measure, slots, wait_seconds
from openbeepboop.server.models import Node, RecentRuns
from tests.conftest import ServerProcess, cli, free_port

MODEL = "paced"
RUN_SECONDS = 0.2
RESULT = {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}


# -- the arithmetic ----------------------------------------------------------------------


def test_pace_is_the_throughput_of_a_busy_window() -> None:
    runs = RecentRuns(MODEL, count=120, busy_seconds=240.0, first_started=0.0, last_finished=99)
    pace = measure(runs, running=4, now=100.0, window=60.0)
    assert pace.per_second == pytest.approx(2.0)  # 120 in the window's 60 s (Little: 4/2)


def test_pace_after_a_quiet_spell_is_littles_law() -> None:
    # one job ran 50 s ago; now 8 run, each taking 0.5 s: 16 a second, not 1/50
    runs = RecentRuns(MODEL, count=1, busy_seconds=0.5, first_started=50.0, last_finished=50.5)
    assert measure(runs, running=8, now=100.0, window=60.0).per_second == pytest.approx(16.0)


def test_wait_counts_the_jobs_ahead_beyond_the_free_slots() -> None:
    pace = Pace(per_second=4.0, running=2)
    assert wait_seconds(0, free=1, pace=pace) == 0.0  # next, and a slot is free
    assert wait_seconds(2, free=3, pace=pace) == 0.0
    assert wait_seconds(0, free=0, pace=pace) == pytest.approx(0.125)  # half an interval
    assert wait_seconds(9, free=1, pace=pace) == pytest.approx(8.5 / 4)
    assert wait_seconds(9, free=-2, pace=pace) == pytest.approx(9.5 / 4)  # over-committed


def test_slots_are_the_models_concurrency_else_the_nodes_capacity() -> None:
    def node(models: list[dict[str, Any]], capacity: int) -> Node:
        return Node("n", "n", "k", models, capacity, {}, "1", 0.0, 0.0)

    nodes = [
        node([{"name": MODEL, "concurrency": 3}, {"name": "x"}], 5),
        node([{"name": MODEL}], 2),
    ]
    assert slots(MODEL, nodes) == 5
    assert slots("x", nodes[:1]) == 5


# -- a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("eta") / "data"
    keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
    proc = ServerProcess(data_dir, free_port(), keys, {"OPENBEEPBOOP_RATE_LIMIT": ""})
    proc.start()
    yield proc
    proc.kill(signal.SIGTERM)


class Lab:
    """A client key's HTTP and a node (played by the test) serving MODEL, one job at once."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.client_h = {"Authorization": f"Bearer {server.keys['client_key']}"}
        self.node_h = {"Authorization": f"Bearer {server.keys['node_key']}"}
        body = {"name": "pacer", "models": [{"name": MODEL, "concurrency": 1}], "capacity": 1}
        r = self.http.post("/internal/nodes/register", json=body, headers=self.node_h)
        r.raise_for_status()
        self.node_id = str(r.json()["node_id"])

    def submit(self) -> dict[str, Any]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {**self.client_h, "Prefer": "respond-async"}
        r = self.http.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 202, r.text
        return dict(r.json())

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}", headers=self.client_h)
        r.raise_for_status()
        return dict(r.json())

    def run_one(self) -> str:
        """Take the next job, run it for RUN_SECONDS, report it done."""
        body = {"node_id": self.node_id, "models": [MODEL], "max_jobs": 1}
        r = self.http.post("/internal/queue/fetch", json=body, headers=self.node_h)
        [job] = r.json()["jobs"]
        time.sleep(RUN_SECONDS)
        done = {"job_id": job["id"], "lease_id": job["lease_id"], "result": RESULT}
        self.http.post("/internal/queue/submit", json={"results": [done]}, headers=self.node_h)
        return str(job["id"])

    def first_event(self, job_id: str) -> dict[str, Any]:
        path = f"/v1/jobs/{job_id}/events"
        with self.http.stream("GET", path, headers=self.client_h) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return dict(json.loads(line[6:]))
        raise AssertionError("no event")

    def cli(self, *args: str, timeout: float = 30) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "openbeepboop.cli.client", *args],
            capture_output=True,
            text=True,
            env=self.cli_env(),
            timeout=timeout,
            check=False,
        )
        assert out.returncode == 0, (out.stdout, out.stderr)
        return out.stdout

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
        env.update(
            OPENBEEPBOOP_BASE_URL=self.server.url,
            OPENBEEPBOOP_API_KEY=self.server.keys["client_key"],
            OPENBEEPBOOP_STATE_DIR=str(self.server.data_dir.parent / "client"),
        )
        return env


@pytest.fixture(scope="module")
def lab(server: ServerProcess) -> Iterator[Lab]:
    lab = Lab(server)
    yield lab
    lab.http.close()


@pytest.fixture(scope="module")
def measured(lab: Lab) -> dict[str, Any]:
    """Before and after the model's pace is known: the first job as submitted (nothing
    ran), its first event; then, once three jobs ran, five queued jobs as they stand."""
    first = lab.submit()
    before = {
        "submitted": first,
        "got": lab.job(first["id"]),
        "event": lab.first_event(first["id"]),
    }
    assert lab.run_one() == first["id"]
    lab.submit(), lab.submit()
    lab.run_one(), lab.run_one()
    time.sleep(1.1)  # past the server's last reading of the pace (once a second)
    return {"before": before, "submitted": [lab.submit() for _ in range(5)]}


def test_no_estimate_before_anything_of_the_model_ran(measured: dict[str, Any]) -> None:
    before = measured["before"]
    assert before["submitted"]["queue_position"] == 0
    assert before["submitted"]["estimated_start_at"] is None
    assert before["got"]["status"] == "queued" and before["got"]["estimated_start_at"] is None
    event = before["event"]
    assert event["type"] == "queued" and "estimated_start_at" not in event


def test_queued_jobs_get_sane_estimates_once_jobs_ran(lab: Lab, measured: dict[str, Any]) -> None:
    jobs = [lab.job(j["id"]) for j in measured["submitted"]]
    now = time.time()
    assert [j["queue_position"] for j in jobs] == [0, 1, 2, 3, 4]
    starts = [j["estimated_start_at"] for j in jobs]
    assert all(isinstance(s, float | int) for s in starts), starts
    assert starts == sorted(starts) and starts[-1] > starts[0]  # later in line, later start
    assert now - 2 <= starts[0] <= now + 1  # next, and the node is idle: now
    # three runs of 0.2 s took about 1-2 s with the gaps: 1 to 5 jobs a second
    assert 4 / 5 - 0.5 <= starts[-1] - starts[0] <= 4 / 0.5 + 0.5
    submitted = [j["estimated_start_at"] for j in measured["submitted"]]
    assert all(isinstance(s, float | int) for s in submitted)  # the 202 said it too


def test_a_started_job_has_no_estimate(lab: Lab, measured: dict[str, Any]) -> None:
    first = measured["before"]["submitted"]["id"]
    got = lab.job(first)
    assert got["status"] == "completed"
    assert (got["queue_position"], got["estimated_start_at"]) == (None, None)


def test_the_queued_event_carries_the_estimate(lab: Lab, measured: dict[str, Any]) -> None:
    last = measured["submitted"][-1]["id"]
    event = lab.first_event(last)
    assert event["type"] == "queued" and event["position"] == 4
    assert event["estimated_start_at"] > time.time() - 1


def test_the_client_job_eta_is_a_utc_datetime(lab: Lab, measured: dict[str, Any]) -> None:
    last = measured["submitted"][-1]["id"]
    with Client(base_url=lab.server.url, api_key=lab.server.keys["client_key"]) as client:
        job = client.jobs.get(last)
        assert job.queue_position == 4
        eta = job.eta
        assert isinstance(eta, datetime) and eta.tzinfo is not None
        assert eta.timestamp() == pytest.approx(lab.job(last)["estimated_start_at"], abs=2)
        assert (eta - datetime.now(UTC)).total_seconds() > -2
        first = client.jobs.get(measured["before"]["submitted"]["id"])
        assert first.eta is None and first.queue_position is None


def test_poll_and_get_show_position_and_estimate(lab: Lab, measured: dict[str, Any]) -> None:
    last = measured["submitted"][-1]["id"]
    assert lab.cli("poll", last).startswith("queued: position 4, starts in about ")
    assert re.search(r"^estimate\s+starts in about \d+ s$", lab.cli("get", last), re.M)
    polled = json.loads(lab.cli("poll", last, "--json"))
    assert polled["estimated_start_at"] is not None


def test_stats_and_status_show_the_pace(lab: Lab, measured: dict[str, Any]) -> None:
    stats = lab.http.get("/v1/stats", headers=lab.client_h).json()
    pace = stats["eta"][MODEL]
    assert pace["jobs_per_second"] > 0 and pace["wait_seconds"] > 0
    shown = lab.cli("status")
    header, row = shown.splitlines()[0], next(x for x in shown.splitlines() if x.startswith(MODEL))
    assert header.split()[-2:] == ["jobs/s", "wait"]
    assert float(row.split()[-3]) > 0 and row.split()[-1] == "s"


def test_status_watch_shows_the_pace(lab: Lab, measured: dict[str, Any]) -> None:
    argv = [sys.executable, "-m", "openbeepboop.cli.client", "status", "--watch"]
    argv += ["--interval", "0.2"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=lab.cli_env()
    )
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    row = next(x for x in out.splitlines() if x.startswith(MODEL))
    assert "jobs/s" in out and float(row.split()[-3]) > 0, (out, err)


def test_the_job_page_shows_the_estimate(lab: Lab, measured: dict[str, Any]) -> None:
    last = measured["submitted"][-1]["id"]
    with httpx.Client(base_url=lab.server.url, timeout=30) as browser:
        form = browser.get("/login").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert token is not None, form
        body = {"csrf_token": token.group(1), "api_key": lab.server.keys["client_key"]}
        assert browser.post("/login", data=body).status_code == 303
        page = browser.get(f"/jobs/{last}").text
    assert re.search(r"4 jobs ahead in the queue, starts in about [0-9.]+ (ms|s)", page), page
