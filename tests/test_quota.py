"""Quotas per share (docs/scheduling.md, "Quotas"): jobs and tokens per hour, 429
`insufficient_quota` through the OpenAI SDK, bulks and batches refused whole, replays
and cache hits not counted, one count across replicas on PostgreSQL.

One real server with one echo node for the module (shares set before it starts), and
two replicas on PostgreSQL for one test. Cap: 30 s.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.quotas import QuotaConfig, Quotas
from openbeepboop.server.core.shares import ShareBook
from openbeepboop.server.errors import QuotaExceeded
from openbeepboop.server.models import ApiKey, Role, Share
from openbeepboop.server.settings import load_settings
from openbeepboop.server.store.base import Store
from openbeepboop.server.store.factory import open_store
from openbeepboop.server.store.sqlite import SqliteStore
from tests.conftest import ServerProcess, cli, free_port
from tests.nodes import Procs, auth, echo_model, new_server, node_id_of, start_node, write_config
from tests.pg import temp_database_sync

Quota = tuple[int | None, int | None]  # jobs, tokens per hour
# share -> its quotas; each test owns one share
SHARES: dict[str, Quota] = {
    "sdk": (3, None),
    "bulk": (5, None),
    "replay": (2, None),
    "tokens": (None, 10),
}


async def provision(
    store: Store, shares: dict[str, tuple[int | None, int | None]]
) -> dict[str, str]:
    """A client key in each of `shares` (its group) and the share's quotas, in the store
    (as `keys create --group` and `shares set` do); share -> key."""
    await store.open()
    try:
        keys = {}
        for share, (jobs, tokens) in shares.items():
            keys[share] = (await KeyRing(store).create(Role.CLIENT, share, share)).secret
            await ShareBook(store).put(Share(share, 1.0, jobs, tokens))
        return keys
    finally:
        await store.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """A server whose shares have quotas (a client key per share), with an echo node."""
    data_dir = tmp_path_factory.mktemp("quota") / "server"
    cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
    keys = asyncio.run(provision(open_store(load_settings(data_dir)), SHARES))
    server = new_server(data_dir)
    procs = Procs()
    try:
        config = write_config(data_dir.parent / "node.toml", server, [echo_model()])
        node_id_of(start_node(procs, config))
        yield server, keys
    finally:
        procs.close()
        server.kill()


def sdk(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, text: str, **extra: Any) -> str:
    done = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], **extra
    )
    return done.choices[0].message.content or ""


def queue_jobs(server: ServerProcess, key: str, n: int, **headers: str) -> httpx.Response:
    job = {"body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}}
    body: dict[str, Any] = {"jobs": [job] * n} if n > 1 else job
    return httpx.post(server.url + "/v1/jobs", json=body, headers=auth(key, **headers), timeout=10)


def test_over_the_jobs_quota_the_sdk_gets_a_rate_limit_error(
    lab: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, keys = lab
    client = sdk(server, keys["sdk"])
    for i in range(3):
        assert chat(client, f"ask {i}") == f"ask {i}"
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client, "one too many")
    error = refused.value
    assert error.code == "insufficient_quota"
    assert "share 'sdk' has used 3 of its quota of 3 jobs per hour" in error.message
    assert "resets at" in error.message
    assert 1 <= int(error.response.headers["Retry-After"]) <= 3600
    # streamed too, and the Batch API: a batch's lines are counted at create
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "s"}], stream=True
        )
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = {"model": "echo", "messages": [{"role": "user", "content": "b"}]}
    upload = client.files.create(file=io.BytesIO(json.dumps(line).encode()), purpose="batch")
    with pytest.raises(openai.RateLimitError, match="quota"):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_a_bulk_over_the_quota_is_refused_whole(
    lab: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, keys = lab
    key = keys["bulk"]
    assert queue_jobs(server, key, 4).status_code == 202
    refused = queue_jobs(server, key, 2)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "2 more jobs would pass it" in refused.json()["error"]["message"]
    assert "Retry-After" in refused.headers
    assert queue_jobs(server, key, 1).status_code == 202  # nothing of the bulk was taken
    assert queue_jobs(server, key, 1).status_code == 429
    too_big = queue_jobs(server, key, 6)  # never fits in an hour: 400, not a retry
    assert too_big.status_code == 400 and "split them" in too_big.text
    usage = httpx.get(
        server.url + "/v1/admin/quotas", headers=auth(server.keys["admin_key"]), timeout=10
    ).json()["data"]
    mine = next(u for u in usage if u["share"] == "bulk")
    assert (mine["jobs_used"], mine["jobs_per_hour"], mine["tokens_per_hour"]) == (5, 5, None)
    listed = cli("shares", "list", "--data-dir", str(server.data_dir), "--json")
    assert next(s for s in listed if s["name"] == "bulk")["jobs_used"] == 5


def test_replays_and_cache_hits_are_not_counted(
    lab: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, keys = lab
    key = keys["replay"]
    first = queue_jobs(server, key, 1, **{"Idempotency-Key": "same"})
    again = queue_jobs(server, key, 1, **{"Idempotency-Key": "same"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    client = sdk(server, key)
    assert chat(client, "cached", temperature=0) == "cached"  # the second job counted
    assert chat(client, "cached", temperature=0) == "cached"  # a cache hit: free
    with pytest.raises(openai.RateLimitError):
        chat(client, "new", temperature=0)


def test_a_share_past_its_tokens_quota_gets_429_until_the_hour_ends(
    lab: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, keys = lab
    client = sdk(server, keys["tokens"])
    words = "one two three four five six seven"
    assert chat(client, words) == words  # 7 completion tokens, and the prompt's
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client, "more")
    assert refused.value.code == "insufficient_quota"
    assert "of its quota of 10 tokens per hour" in refused.value.message
    assert "queued jobs still run" in refused.value.message


def test_bad_quota_values_are_clean_errors(tmp_path: Path) -> None:
    argv = ["shares", "set", "lab", "--jobs-per-hour", "-1", "--data-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.server", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "-1" in out.stderr


def test_replicas_on_postgresql_share_one_count(tmp_path: Path, postgres: str) -> None:
    from openbeepboop.server.store.postgres import PostgresStore

    with temp_database_sync(postgres) as url:
        key = asyncio.run(provision(PostgresStore(url), {"pg": (4, None)}))["pg"]
        env = {"OPENBEEPBOOP_DATABASE_URL": url, "OPENBEEPBOOP_RATE_LIMIT": ""}
        servers = [ServerProcess(tmp_path / f"r{i}", free_port(), {}, env) for i in range(2)]
        try:
            for server in servers:
                server.data_dir.mkdir()
            with ThreadPoolExecutor(2) as starting:  # both at once: mostly imports
                list(starting.map(lambda server: server.start(), servers))
            a, b = servers
            assert queue_jobs(a, key, 3).status_code == 202
            assert queue_jobs(b, key, 2).status_code == 429  # 3 + 2 > 4
            assert queue_jobs(b, key, 1).status_code == 202
            assert queue_jobs(a, key, 1).status_code == 429
        finally:
            for server in servers:
                server.kill()


class CountedStore(SqliteStore):
    """A real SQLite store that counts its `add_counters` round trips."""

    trips = 0

    async def add_counters(
        self, amounts: Mapping[str, tuple[float, int]]
    ) -> dict[str, tuple[int, float]]:
        self.trips += 1
        return await super().add_counters(amounts)


async def test_a_window_seen_full_is_refused_without_asking_the_store(tmp_path: Path) -> None:
    store = CountedStore(tmp_path / "q.db")
    await store.open()
    now = [7200.0 * 1000 + 10]
    quotas = Quotas(store, QuotaConfig(jobs_per_hour=2), clock=lambda: now[0])
    key = ApiKey("key_00000000000000aa", Role.CLIENT, "hash", "obb_", "k", 0.0, group="g")
    try:
        await store.create_key(key)
        for _ in range(2):
            assert await quotas.admit(key, 1) is not None
        trips = store.trips
        for _ in range(3):
            with pytest.raises(QuotaExceeded, match="used 2 of its quota of 2 jobs per hour"):
                await quotas.admit(key, 1)
        assert store.trips == trips  # the first full sight was the second admit's
        now[0] += 3600  # the next hour starts over
        assert await quotas.admit(key, 2) is not None
        [usage] = await quotas.usage()
        assert (usage.share, usage.jobs_used, usage.jobs_per_hour) == ("g", 2, 2)
    finally:
        await store.close()
