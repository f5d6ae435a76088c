"""Cost flat in history: /v1/stats and /metrics read counters, not every stored job; the
rows of restarted nodes do not pile up. Real servers on loopback, on SQLite and on
PostgreSQL; the history is seeded straight into the database (200,000 finished jobs in
one INSERT), as `prune`-less years of use would leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ServerProcess, cli, free_port
from tests.pg import temp_database_sync

HISTORY = 200_000
MODELS = 4  # the seeded jobs' models: model-0 .. model-3
STATUS_OF = "CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled' ELSE 'completed' END"
SEED = f"""
INSERT INTO jobs (id, owner, endpoint, model, request, request_hash, status, priority,
                  max_attempts, attempts, created_at, started_at, finished_at, result)
SELECT 'job_seed_' || i, 'seed', '/v1/chat/completions', 'model-' || (i % {MODELS}),
       '{{"model": "m", "messages": [{{"role": "user", "content": "hello there"}}]}}',
       'h', {STATUS_OF}, 0, 3, 1, 1.0, 1.5, 2.0,
       '{{"object": "chat.completion", "choices": []}}'
FROM {{numbers}}
"""
SQLITE_NUMBERS = (
    f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {HISTORY}) "
    "SELECT i FROM n)"
)
PG_NUMBERS = f"generate_series(1, {HISTORY}) AS n(i)"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> Iterator[Callable[[], dict[str, str]]]:
    """`store()`: a server's environment on each store (PostgreSQL: a fresh database
    per call; SQLite: the data dir's own file)."""
    with contextlib.ExitStack() as stack:

        def env() -> dict[str, str]:
            if request.param == "sqlite":
                return {}
            url = stack.enter_context(temp_database_sync(request.getfixturevalue("postgres")))
            return {"OPENBEEPBOOP_DATABASE_URL": url}

        yield env


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """`serve(**env)`: a data dir set up for the store `env` names (keys in its database)
    and a real server on it."""
    started: list[ServerProcess] = []

    def factory(**env: str) -> ServerProcess:
        data_dir = tmp_path / f"server{len(started)}"
        env = {"OPENBEEPBOOP_RATE_LIMIT": "", **env}
        keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json", env=env)
        server = ServerProcess(data_dir, free_port(), keys, env)
        started.append(server)
        server.start()
        return server

    yield factory
    for server in started:
        server.kill(signal.SIGTERM)


def run_sql(server: ServerProcess, sql: str) -> list[tuple[Any, ...]]:
    """Run one statement on the server's database, from outside the server."""
    url = server.env.get("OPENBEEPBOOP_DATABASE_URL")
    if url is None:
        conn = sqlite3.connect(server.data_dir / "openbeepboop.db", timeout=30)
        try:
            with conn:
                return conn.execute(sql.replace("{numbers}", SQLITE_NUMBERS)).fetchall()
        finally:
            conn.close()

    async def pg() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(sql.replace("{numbers}", PG_NUMBERS))]
        finally:
            await conn.close()

    return asyncio.run(pg())


def settle(server: ServerProcess) -> None:
    """Let the database finish with the seed's aftermath (PostgreSQL: the autovacuum and
    checkpoint 200,000 new rows call for; SQLite: the WAL's checkpoint) before timing:
    years of history are at rest, not just written."""
    if "OPENBEEPBOOP_DATABASE_URL" in server.env:
        run_sql(server, "VACUUM ANALYZE jobs")
        run_sql(server, "CHECKPOINT")
    else:
        run_sql(server, "PRAGMA wal_checkpoint(TRUNCATE)")


def p50_ms(
    servers: dict[str, tuple[httpx.Client, str]], path: str, n: int = 60
) -> dict[str, float]:
    """The median latency of GETs of `path` on each server, taking turns request by
    request (whichever goes first alternating), so that the work of other processes on a
    shared machine weighs on each alike."""
    took: dict[str, list[float]] = {name: [] for name in servers}
    names = list(servers)
    for i in range(n + 4):
        for name in names if i % 2 else reversed(names):
            http, key = servers[name]
            start = time.perf_counter()
            r = http.get(path, headers={"Authorization": f"Bearer {key}"})
            if i >= 4:
                took[name].append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
    return {name: statistics.median(t) * 1000 for name, t in took.items()}


def submit(http: httpx.Client, key: str, n: int) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    jobs = [{"endpoint": "/v1/chat/completions", "body": body}] * n
    r = http.post("/v1/jobs", json={"jobs": jobs}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code in (200, 201, 202), r.text


def test_stats_and_metrics_cost_the_same_with_200k_stored_jobs(
    serve: Callable[..., ServerProcess], store: Callable[[], dict[str, str]]
) -> None:
    """Two servers side by side: one holds 10 jobs, the other 10 and 200,000 finished."""
    small, big = serve(**store()), serve(**store())
    started = time.monotonic()
    run_sql(big, SEED)
    seeded_in = time.monotonic() - started
    settle(big)
    with (
        httpx.Client(base_url=small.url, timeout=30) as on_small,
        httpx.Client(base_url=big.url, timeout=30) as on_big,
    ):
        submit(on_small, small.keys["client_key"], 10)
        submit(on_big, big.keys["client_key"], 10)
        servers = {
            "10 jobs": (on_small, small.keys["client_key"]),
            "200k jobs": (on_big, big.keys["client_key"]),
        }
        took = {path: p50_ms(servers, path) for path in ("/v1/stats", "/metrics")}

        auth = {"Authorization": f"Bearer {big.keys['client_key']}"}
        stats = on_big.get("/v1/stats", headers=auth).json()
        metrics = on_big.get("/metrics").text
        # history pruned outside the server's verbs: the counters follow (triggers)
        run_sql(big, "DELETE FROM jobs WHERE model = 'model-3' AND status = 'cancelled'")
        pruned = on_big.get("/v1/stats", headers=auth).json()

    full = dict(run_sql(big, "SELECT status, count(*) FROM jobs GROUP BY status"))
    assert stats["jobs"]["queued"] == full["queued"] == 10
    assert stats["jobs"]["completed"] == full["completed"] == HISTORY * 8 // 10
    assert stats["jobs"]["failed"] == stats["jobs"]["cancelled"] == HISTORY // 10
    assert stats["models"]["model-1"] == {"completed": 40_000, "cancelled": 10_000}
    assert 'openbeepboop_jobs{model="model-2",status="completed"} 40000.0' in metrics
    assert pruned["models"]["model-3"] == {"completed": 40_000}  # no empty "cancelled"
    assert pruned["jobs"]["cancelled"] == HISTORY // 10 - 10_000
    print(f"\nseeded {HISTORY} jobs in {seeded_in:.1f} s; p50 ms {took}")
    for path, ms in took.items():
        # within 2x (or 5 ms: a timer tick on a busy machine) of the small store's
        small_ms, big_ms = ms["10 jobs"], ms["200k jobs"]
        assert big_ms <= max(2 * small_ms, small_ms + 5), (path, took)


def node_rows(server: ServerProcess) -> set[str]:
    return {r[0] for r in run_sql(server, "SELECT name || ':' || id FROM nodes")}


def test_restarted_nodes_replace_their_rows_and_old_rows_expire(
    serve: Callable[..., ServerProcess], store: Callable[[], dict[str, str]]
) -> None:
    server = serve(
        OPENBEEPBOOP_NODE_TTL_SECONDS="1",
        OPENBEEPBOOP_NODE_RETENTION_SECONDS="2",
        OPENBEEPBOOP_REAPER_INTERVAL_SECONDS="0.2",
        **store(),
    )
    auth = {"Authorization": f"Bearer {server.keys['node_key']}"}

    with httpx.Client(base_url=server.url, timeout=30) as http:

        def register(name: str) -> str:
            body = {"name": name, "models": [{"name": "echo"}]}
            r = http.post("/internal/nodes/register", json=body, headers=auth)
            assert r.status_code == 200, r.text
            return str(r.json()["node_id"])

        def heartbeat(node_id: str) -> httpx.Response:
            body = {"node_id": node_id, "lease_ids": [], "stats": {}}
            return http.post("/internal/queue/heartbeat", json=body, headers=auth)

        gone = register("gone-box")
        first = register("box")
        twin = register("box")  # the first run is still live: both rows stay
        assert node_rows(server) == {f"gone-box:{gone}", f"box:{first}", f"box:{twin}"}
        time.sleep(1.2)  # past node_ttl_seconds: neither is live any more
        restarted = register("box")
        assert node_rows(server) == {f"gone-box:{gone}", f"box:{restarted}"}
        codes = [heartbeat(first).status_code for _ in range(2)]
        assert codes[-1] == 404  # the replaced run hears it is not registered
        assert heartbeat(first).json()["error"]["code"] == "node_not_registered"

        deadline = time.monotonic() + 10  # retention 2 s; forgotten on a reaper pass
        while f"gone-box:{gone}" in node_rows(server) and time.monotonic() < deadline:
            assert heartbeat(restarted).status_code == 200
            time.sleep(0.3)
        assert node_rows(server) == {f"box:{restarted}"}
        listed = http.get("/v1/nodes", headers=auth).json()["data"]
        assert [n["id"] for n in listed] == [restarted]


def test_metrics_may_require_a_key(serve: Callable[..., ServerProcess]) -> None:
    server = serve(OPENBEEPBOOP_METRICS_PUBLIC="false")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        anonymous = http.get("/metrics")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"]
        for role in ("client_key", "node_key", "admin_key"):
            auth = {"Authorization": f"Bearer {server.keys[role]}"}
            r = http.get("/metrics", headers=auth)
            assert r.status_code == 200 and "openbeepboop_live_nodes" in r.text
