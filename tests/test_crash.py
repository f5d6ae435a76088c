"""Durability with real server processes and real signals.

An acknowledged write (a 202 for a job, `accepted: true` for a result) must survive
`kill -9`; a lease held by a node that vanished with the server must expire and the job
must run again; SIGTERM must stop the server at once and cleanly, even during long-polls.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow

ServerFactory = Callable[..., ServerProcess]


# -- helpers ---------------------------------------------------------------------------


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def chat_body(i: int, tag: str = "crash") -> dict[str, Any]:
    """A request with enough shape (unicode, nesting, numbers) to notice any mangling."""
    return {
        "model": "echo",
        "messages": [
            {"role": "system", "content": f"system prompt {i}"},
            {"role": "user", "content": f'{tag} job {i}: héllo ✓ "quoted" \n newline'},
        ],
        "temperature": 0.25,
        "max_tokens": 7 + i,
    }


def submit_one(http: httpx.Client, key: str, body: dict[str, Any]) -> str:
    r = http.post("/v1/chat/completions", json=body, headers=auth(key, Prefer="respond-async"))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued"
    return str(job["id"])


def submit_concurrently(
    url: str, key: str, bodies: list[dict[str, Any]], workers: int = 8
) -> dict[str, dict[str, Any]]:
    """Submit every body from `workers` threads at once (so the writer batches them);
    returns job id -> the body it was submitted with."""
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=30)
            with lock:
                clients.append(local.http)
        http: httpx.Client = local.http
        return http

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            ids = list(pool.map(lambda b: submit_one(client(), key, b), bodies))
    finally:
        for c in clients:
            c.close()
    assert len(set(ids)) == len(ids)
    return dict(zip(ids, bodies, strict=True))


class Submitters:
    """Threads that submit jobs back to back until the server goes away (or the block
    ends); `acked` maps every job answered 202 to its request."""

    def __init__(self, url: str, key: str, workers: int = 6) -> None:
        self.url, self.key = url, key
        self.acked: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(workers)]

    def __enter__(self) -> Submitters:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads), "a submitter hung"

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            i = 0
            while not self._stop.is_set():
                body = chat_body(worker * 100_000 + i, tag="inflight")
                i += 1
                try:
                    r = http.post(
                        "/v1/chat/completions",
                        json=body,
                        headers=auth(self.key, Prefer="respond-async"),
                    )
                except httpx.TransportError:
                    return  # the server went away: this one was never acknowledged
                if r.status_code != 202:
                    self.errors.append(f"{r.status_code} {r.text}")
                    return
                with self._lock:
                    self.acked[r.json()["id"]] = body


def poll_jobs(http: httpx.Client, key: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every job in `ids` by id (POST /v1/results/poll); fails if one is missing."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 1000):
        r = http.post(
            "/v1/results/poll", json={"ids": ids[start : start + 1000]}, headers=auth(key)
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["not_found"] == [], f"lost jobs: {body['not_found'][:5]}"
        found.update((j["id"], j) for j in body["data"])
    return found


def register(http: httpx.Client, node_key: str, models: list[str]) -> str:
    r = http.post(
        "/internal/nodes/register",
        json={"name": "crash-node", "models": [{"name": m} for m in models]},
        headers=auth(node_key),
    )
    assert r.status_code == 200, r.text
    return str(r.json()["node_id"])


def fetch(
    http: httpx.Client, node_key: str, node_id: str, max_jobs: int, wait: float = 0
) -> list[dict[str, Any]]:
    r = http.post(
        "/internal/queue/fetch",
        json={"node_id": node_id, "models": ["echo"], "max_jobs": max_jobs, "wait": wait},
        headers=auth(node_key),
        timeout=wait + 30,
    )
    assert r.status_code == 200, r.text
    jobs: list[dict[str, Any]] = r.json()["jobs"]
    return jobs


def submit_results(
    http: httpx.Client, node_key: str, node_id: str, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    r = http.post(
        "/internal/queue/submit",
        json={"node_id": node_id, "results": items},
        headers=auth(node_key),
    )
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["results"]
    return results


def completion(job_id: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + job_id,
        "object": "chat.completion",
        "created": 1700000000,
        "model": "echo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        "x_float": 0.1 + 0.2,
    }


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def hard_kill(server: ServerProcess) -> None:
    """`kill -9`: no shutdown code of the server runs."""
    assert server.proc is not None and server.proc.poll() is None, "server is not running"
    proc = server.proc
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    server.proc = None


@pytest.fixture
def http_for() -> Iterator[Callable[[ServerProcess], httpx.Client]]:
    """`http_for(server)`: an httpx client on the server, closed at the end."""
    made: list[httpx.Client] = []

    def factory(server: ServerProcess) -> httpx.Client:
        c = httpx.Client(base_url=server.url, timeout=30)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


# -- tests -----------------------------------------------------------------------------


def test_acknowledged_jobs_survive_kill9(
    server_process: ServerFactory, http_for: Callable[[ServerProcess], httpx.Client]
) -> None:
    server = server_process()
    client_key, node_key = server.keys["client_key"], server.keys["node_key"]
    n = 300
    submitted = submit_concurrently(server.url, client_key, [chat_body(i) for i in range(n)])
    assert len(submitted) == n

    hard_kill(server)
    server.start()

    with http_for(server) as http:
        jobs = poll_jobs(http, client_key, list(submitted))
        assert set(jobs) == set(submitted)
        assert all(j["status"] == "queued" and j["attempts"] == 0 for j in jobs.values())
        one = next(iter(submitted))
        r = http.get(f"/v1/jobs/{one}", headers=auth(client_key))
        assert r.status_code == 200 and r.json()["status"] == "queued"

        # The requests themselves came back intact: a node gets exactly what was sent.
        node_id = register(http, node_key, ["echo"])
        leased: dict[str, dict[str, Any]] = {}
        while len(leased) < n:
            got = fetch(http, node_key, node_id, max_jobs=128)
            assert got, f"only {len(leased)} of {n} jobs could be fetched after the restart"
            leased.update((j["id"], j) for j in got)
        assert set(leased) == set(submitted)
        for job_id, body in submitted.items():
            assert leased[job_id]["request"] == body
            assert leased[job_id]["model"] == "echo"
            assert leased[job_id]["attempt"] == 1


def test_jobs_acknowledged_during_kill9_survive(
    server_process: ServerFactory, http_for: Callable[[ServerProcess], httpx.Client]
) -> None:
    """Kill -9 while submissions are in flight: every one that was answered 202 exists."""
    server = server_process()
    client_key = server.keys["client_key"]
    with Submitters(server.url, client_key) as load:
        wait_until(lambda: len(load.acked) >= 150, 30, "150 acknowledged submissions")
        hard_kill(server)
    assert not load.errors, load.errors[:3]

    server.start()
    with http_for(server) as http:
        jobs = poll_jobs(http, client_key, list(load.acked))
        assert set(jobs) == set(load.acked)
        assert all(j["status"] == "queued" for j in jobs.values())


def test_acknowledged_results_survive_kill9(
    server_process: ServerFactory, http_for: Callable[[ServerProcess], httpx.Client]
) -> None:
    server = server_process()
    client_key, node_key = server.keys["client_key"], server.keys["node_key"]
    submitted = submit_concurrently(server.url, client_key, [chat_body(i) for i in range(40)])

    with http_for(server) as http:
        node_id = register(http, node_key, ["echo"])
        leased: list[dict[str, Any]] = []
        while len(leased) < len(submitted):
            got = fetch(http, node_key, node_id, max_jobs=50)
            assert got
            leased += got
    expected = {j["id"]: completion(j["id"], f"answer to {j['id']} ✓") for j in leased}

    # Several nodes' worth of submits at once, each acknowledged, then kill -9 at once.
    def send(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            items = [
                {"job_id": j["id"], "lease_id": j["lease_id"], "result": expected[j["id"]]}
                for j in chunk
            ]
            return submit_results(http, node_key, node_id, items)

    chunks = [leased[i : i + 5] for i in range(0, len(leased), 5)]
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        answers = [a for part in pool.map(send, chunks) for a in part]
    hard_kill(server)
    assert sorted(a["job_id"] for a in answers) == sorted(expected)
    assert all(a["accepted"] is True for a in answers), answers

    server.start()
    with http_for(server) as http:
        jobs = poll_jobs(http, client_key, list(expected))
        for job_id, result in expected.items():
            assert jobs[job_id]["status"] == "completed"
            assert jobs[job_id]["result"] == result
            assert jobs[job_id]["attempts"] == 1
        r = http.get(f"/v1/jobs/{leased[0]['id']}", headers=auth(client_key))
        assert r.json()["result"] == expected[leased[0]["id"]]
        # A completed job is not handed out again.
        node_id = register(http, node_key, ["echo"])
        assert fetch(http, node_key, node_id, max_jobs=10) == []


def test_lease_held_at_kill9_expires_and_job_runs_again(
    server_process: ServerFactory, http_for: Callable[[ServerProcess], httpx.Client]
) -> None:
    """A job in progress when the server dies goes back to the queue once its lease
    lapses (reaped by the new process, after the restart's grace), runs again with its
    attempts counted, and the leases from before the crashes are fenced off."""
    fast = {
        "OPENBEEPBOOP_REAPER_INTERVAL_SECONDS": "0.1",
        "OPENBEEPBOOP_LEASE_GRACE_SECONDS": "0.5",  # the node is gone for good here
    }
    # A lease long enough to see the job in progress before the kill...
    server = server_process(OPENBEEPBOOP_LEASE_SECONDS="3", **fast)
    client_key, node_key = server.keys["client_key"], server.keys["node_key"]
    with http_for(server) as http:
        job_id = submit_one(http, client_key, chat_body(1))
        node_id = register(http, node_key, ["echo"])
        first = fetch(http, node_key, node_id, max_jobs=1)
        assert [j["id"] for j in first] == [job_id]
        assert first[0]["attempt"] == 1
        r = http.get(f"/v1/jobs/{job_id}", headers=auth(client_key))
        assert r.json()["status"] == "in_progress"
    hard_kill(server)

    def requeued(http: httpx.Client) -> Callable[[], dict[str, Any] | None]:
        def check() -> dict[str, Any] | None:
            job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}", headers=auth(client_key)).json()
            assert job["status"] in ("in_progress", "queued"), job
            return job if job["status"] == "queued" else None

        return check

    # ...then a one-second lease: the dead node's lease lapses, the reaper of the new
    # process puts the job back, and it is fetched again; then the server dies again.
    server.env.update(OPENBEEPBOOP_LEASE_SECONDS="1")
    server.start()
    with http_for(server) as http:
        job = wait_until(requeued(http), 20, "the lease from before the crash to be reaped")
        assert job["attempts"] == 1
        node_id = register(http, node_key, ["echo"])
        before = time.time()
        second = fetch(http, node_key, node_id, max_jobs=1, wait=10)
        after = time.time()
        assert [j["id"] for j in second] == [job_id]
        assert second[0]["attempt"] == 2
        assert second[0]["lease_id"] != first[0]["lease_id"]
        assert second[0]["request"] == chat_body(1)
        # The lease is OPENBEEPBOOP_LEASE_SECONDS long, counted from the fetch.
        assert before + 1 - 0.01 <= second[0]["lease_expires_at"] <= after + 1 + 0.01
    hard_kill(server)

    # A third process, with leases long enough to finish the job without a race.
    server.env.update(OPENBEEPBOOP_LEASE_SECONDS="30")
    server.start()
    with http_for(server) as http:
        job = wait_until(requeued(http), 20, "the second lease to be reaped")
        assert job["attempts"] == 2
        node_id = register(http, node_key, ["echo"])
        third = fetch(http, node_key, node_id, max_jobs=1, wait=10)
        assert [j["id"] for j in third] == [job_id]
        assert third[0]["attempt"] == 3
        assert third[0]["request"] == chat_body(1)

        for old in (first[0], second[0]):
            stale = submit_results(
                http,
                node_key,
                node_id,
                [
                    {
                        "job_id": job_id,
                        "lease_id": old["lease_id"],
                        "result": completion(job_id, "old"),
                    }
                ],
            )
            assert stale[0]["accepted"] is False and stale[0]["reason"] == "lease_lost"
        fresh = submit_results(
            http,
            node_key,
            node_id,
            [
                {
                    "job_id": job_id,
                    "lease_id": third[0]["lease_id"],
                    "result": completion(job_id, "new"),
                }
            ],
        )
        assert fresh[0]["accepted"] is True
        job = http.get(f"/v1/jobs/{job_id}", headers=auth(client_key)).json()
        assert job["status"] == "completed" and job["attempts"] == 3
        assert job["result"] == completion(job_id, "new")


def test_sigterm_during_long_poll_exits_cleanly(
    server_process: ServerFactory, http_for: Callable[[ServerProcess], httpx.Client]
) -> None:
    """SIGTERM with a long-poll parked and submissions in flight: the server ends the
    poll, finishes what it acknowledged, and exits 0 at once."""
    server = server_process()
    client_key, node_key = server.keys["client_key"], server.keys["node_key"]
    submitted = submit_concurrently(server.url, client_key, [chat_body(i) for i in range(20)])
    with http_for(server) as http:
        node_id = register(http, node_key, ["idle-model"])

    outcome: dict[str, Any] = {}

    def long_poll() -> None:
        started = time.monotonic()
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                r = http.post(
                    "/internal/queue/fetch",
                    json={"node_id": node_id, "models": ["idle-model"], "wait": 45},
                    headers=auth(node_key),
                )
                outcome["response"] = (r.status_code, r.text)
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            outcome["closed"] = repr(exc)  # a clean connection close is fine too
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = repr(exc)
        outcome["seconds"] = time.monotonic() - started

    poller = threading.Thread(target=long_poll)
    poller.start()
    try:
        with Submitters(server.url, client_key, workers=3) as load:
            # A fetch for an idle model answers in milliseconds unless it is parked; the
            # server cannot tell us it is, so give it a generous moment and check.
            time.sleep(1.0)
            wait_until(lambda: len(load.acked) >= 20, 30, "submissions in flight")
            assert poller.is_alive() and not outcome, outcome
            assert server.proc is not None
            proc = server.proc
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - sent
    finally:
        poller.join(timeout=60)
    server.proc = None

    log = server.log.read_text() if server.log else ""
    assert rc == 0, f"exit code {rc}\n{log[-3000:]}"
    assert took < 5, f"SIGTERM took {took:.1f} s with a long-poll open\n{log[-3000:]}"
    assert not poller.is_alive()
    assert "error" not in outcome, outcome
    if "response" in outcome:
        status, text = outcome["response"]
        assert status == 200, text
        assert '"jobs":[]' in text.replace(" ", "")
    assert outcome["seconds"] < 10, outcome
    assert "Traceback" not in log, log[-3000:]
    assert not load.errors, load.errors[:3]

    server.start()
    with http_for(server) as http:
        jobs = poll_jobs(http, client_key, [*submitted, *load.acked])
        assert all(j["status"] == "queued" for j in jobs.values())
        assert len(jobs) == len(submitted) + len(load.acked)
