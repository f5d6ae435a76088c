"""What only the PostgreSQL store has: several stores (as replicas would) on one
database, migrations racing, lost connections, and the LISTEN/NOTIFY bridge. The
contract every store shares is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import asyncpg
import pytest

from openbeepboop.server.core.deltas import DeltaHub
from openbeepboop.server.core.notify import Notifier
from openbeepboop.server.models import NewJob, Piece
from openbeepboop.server.store.migrations import load_migrations
from openbeepboop.server.store.pg_bridge import PAYLOAD_BYTES, encode
from openbeepboop.server.store.postgres import PostgresStore
from openbeepboop.server.topics import job_topic, model_topic
from tests.pg import temp_database

T0 = 1_000_000.0


def new_job(model: str = "m", text: str = "hi") -> NewJob:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return NewJob("alice", "/v1/chat/completions", model, body, "h")


@dataclass
class Replica:
    store: PostgresStore
    notifier: Notifier
    deltas: DeltaHub


@pytest.fixture
async def database(postgres: str) -> AsyncIterator[str]:
    async with temp_database(postgres) as url:
        yield url


MakeReplicas = Callable[[int], Awaitable[list[Replica]]]


@pytest.fixture
async def replicas(database: str) -> AsyncIterator[MakeReplicas]:
    """`await replicas(n)`: n opened stores on one database, each bridged to its own
    notifier and delta hub."""
    async with AsyncExitStack() as stack:

        async def make(n: int) -> list[Replica]:
            out = []
            for _ in range(n):
                r = Replica(PostgresStore(database, pool_size=4), Notifier(), DeltaHub())
                await r.store.open()
                stack.push_async_callback(r.store.close)
                await r.store.bridge(r.notifier, r.deltas)
                out.append(r)
            for r in out:
                assert r.store._bridge is not None
                await asyncio.wait_for(r.store._bridge.connected.wait(), 10)
            return out

        yield make


async def terminate(url: str, application: str) -> int:
    name = url.rsplit("/", 1)[-1]
    conn = await asyncpg.connect(url)
    try:
        killed = await conn.fetchval(  # each waits (up to 5 s) until its backend is gone
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name = $2 AND pid <> pg_backend_pid()",
            name,
            application,
        )
    finally:
        await conn.close()
    return int(killed)


async def waited(notifier: Notifier, topic: str, timeout: float) -> float | None:
    """Seconds until `topic` is delivered (None: not within `timeout`)."""
    start = time.monotonic()
    with notifier.listen([topic]) as event:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return None
    return time.monotonic() - start


# -- several stores on one database ------------------------------------------------------


async def test_migrations_racing_from_many_replicas_apply_once(database: str) -> None:
    stores = [PostgresStore(database, pool_size=2) for _ in range(4)]
    applied = await asyncio.gather(*(s.migrate() for s in stores))
    shipped = [m.version for m in load_migrations("postgres")]
    assert sorted(v for versions in applied for v in versions) == shipped


async def test_claims_from_two_replicas_never_share_a_job(replicas: MakeReplicas) -> None:
    a, b = await replicas(2)
    ids = [o.job.id for o in await a.store.submit_jobs([new_job() for _ in range(300)], T0)]
    claims = await asyncio.gather(
        *[(a if i % 2 else b).store.fetch_jobs(f"n{i}", ["m"], 9, 60, T0) for i in range(40)]
    )
    claimed = [j.id for batch in claims for j in batch]
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == set(ids)


# -- lost connections -------------------------------------------------------------------


async def test_verbs_retry_once_on_a_connection_postgres_ended(database: str) -> None:
    store = PostgresStore(database, pool_size=2)
    await store.open()
    try:
        [job] = [o.job for o in await store.submit_jobs([new_job()], T0)]
        assert await terminate(database, "openbeepboop") >= 1
        await asyncio.sleep(0.2)
        got = await store.get_job(job.id)  # a read
        assert got is not None and got.id == job.id
        assert await terminate(database, "openbeepboop") >= 1  # no pause: may be mid-use
        [claimed] = await store.fetch_jobs("n", ["m"], 1, 60, T0)  # a write, before COMMIT
        assert claimed.id == job.id
    finally:
        await store.close()


# -- the bridge ---------------------------------------------------------------------------


async def test_topics_published_on_one_replica_wake_waiters_on_the_other(
    replicas: MakeReplicas,
) -> None:
    a, b = await replicas(2)
    waiting = asyncio.create_task(waited(b.notifier, model_topic("m"), 5))
    await asyncio.sleep(0.1)
    a.notifier.publish([model_topic("m")])
    took = await waiting
    assert took is not None and took < 0.5


async def test_deltas_of_any_size_and_finishes_reach_the_other_replica(
    replicas: MakeReplicas,
) -> None:
    a, b = await replicas(2)
    call = {"index": 0, "function": {"arguments": "ä" * 9000}}  # chunk choices, long too
    pieces: list[Piece] = [
        "Hello",
        " wörld ✓",
        "x" * 20_000 + "é" * 3000,  # one past 8000 bytes
        [{"index": 0, "delta": {"tool_calls": [call]}}],
        [{"index": 1, "delta": {"content": "!"}, "finish_reason": "stop"}],
        "!",
    ]
    for index, piece in enumerate(pieces):
        assert a.deltas.push("job_1", index, piece)
    a.deltas.finish("job_1")

    async def is_final() -> bool:
        return False

    async def follow() -> list[Piece]:
        return [p async for p in b.deltas.follow("job_1", is_final, every=5)]

    assert await asyncio.wait_for(follow(), 10) == pieces  # ends: the finish arrived too


async def test_a_lost_notification_costs_at_most_about_a_second(
    replicas: MakeReplicas, database: str
) -> None:
    a, b = await replicas(2)
    [job] = [o.job for o in await a.store.submit_jobs([new_job()], T0)]
    [leased] = await a.store.fetch_jobs("n", ["m"], 1, 60, T0)
    # b's notification connection goes away, and the cancel below is never announced
    assert await terminate(database, "openbeepboop-bridge") >= 2
    waiting = asyncio.create_task(waited(b.notifier, job_topic(job.id), 5))
    await asyncio.sleep(0.1)
    await a.store.cancel_job(leased.id, T0 + 1)
    took = await waiting
    assert took is not None and took < 2.5, took  # the fallback re-check found it
    # and the bridge connects again by itself
    assert b.store._bridge is not None
    await asyncio.wait_for(b.store._bridge.connected.wait(), 10)


def test_encode_packs_in_order_within_the_payload_limit() -> None:
    items = [("t", f"job:job_{i:024d}") for i in range(500)]
    items += [("d", ["job_1", 0, "y" * 30_000]), ("t", "nodes"), ("t", "nodes")]
    channels, payloads = encode(items)
    assert all(len(p.encode()) < PAYLOAD_BYTES + 100 for p in payloads)
    assert channels[0] == channels[1] == "openbeepboop_wake"  # 500 topics: two messages
    assert channels[-1] == "openbeepboop_wake" and payloads[-1] == "nodes"  # deduplicated
    assert "openbeepboop_delta" in channels
