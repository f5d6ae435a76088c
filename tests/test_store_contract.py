"""The store contract: every verb of `Store`, run on every implementation.

A new store joins by adding itself to `STORES`. PostgreSQL runs on a real server, in a
fresh database per test (tests/pg.py); without a server those tests are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from openbeepboop.server.core.keys import new_key
from openbeepboop.server.errors import IdempotencyMismatch
from openbeepboop.server.models import (
    Batch,
    BatchStatus,
    CacheSummary,
    JobFilter,
    JobStatus,
    NewJob,
    Node,
    NodeResult,
    Role,
    Share,
    StoredFile,
    SwarmRevocation,
    Template,
    WebSession,
)
from openbeepboop.server.store.base import Store
from openbeepboop.server.store.sqlite import SqliteStore

T0 = 1_000_000.0
LEASE = 60.0


@contextlib.asynccontextmanager
async def opened(store: Store) -> AsyncIterator[Store]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def sqlite_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    return opened(SqliteStore(tmp_path / "contract.db"))


@contextlib.asynccontextmanager
async def postgres_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    from openbeepboop.server.store.postgres import PostgresStore
    from tests.pg import temp_database

    admin = request.getfixturevalue("postgres")
    async with temp_database(admin) as url, opened(PostgresStore(url, pool_size=8)) as store:
        yield store


StoreMaker = AbstractAsyncContextManager[Store]
STORES: dict[str, Callable[[pytest.FixtureRequest, Path], StoreMaker]] = {
    "sqlite": sqlite_store,
    "postgres": postgres_store,
}


@pytest.fixture(params=sorted(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with STORES[request.param](request, tmp_path) as s:
        yield s


def new_job(model: str = "m", owner: str = "alice", **kw: Any) -> NewJob:
    body = {"model": model, "messages": [{"role": "user", "content": kw.pop("text", "hi")}]}
    return NewJob(
        owner=owner,
        endpoint="/v1/chat/completions",
        model=model,
        request=body,
        request_hash=kw.pop("request_hash", "h-" + secrets.token_hex(4)),
        **kw,
    )


async def submit(store: Store, *jobs: NewJob, now: float = T0) -> list[str]:
    return [o.job.id for o in await store.submit_jobs(list(jobs), now)]


async def fetch(store: Store, models: list[str] | None = None, n: int = 1, now: float = T0) -> Any:
    return await store.fetch_jobs("node-1", models or ["m"], n, LEASE, now)


RESULT = {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}


# -- submit / get / list ---------------------------------------------------------------


async def test_submit_then_get_returns_the_request(store: Store) -> None:
    [job_id] = await submit(store, new_job(text="hello", priority=3, metadata={"k": "v"}))
    job = await store.get_job(job_id)
    assert job is not None
    assert job.status is JobStatus.QUEUED
    assert job.request["messages"][0]["content"] == "hello"
    assert (job.priority, job.metadata, job.attempts) == (3, {"k": "v"}, 0)


async def test_get_unknown_job_is_none(store: Store) -> None:
    assert await store.get_job("job_nope") is None


async def test_get_jobs_returns_existing_only(store: Store) -> None:
    ids = await submit(store, new_job(), new_job())
    found = await store.get_jobs([*ids, "job_nope"])
    assert sorted(j.id for j in found) == sorted(ids)


async def test_idempotent_submit_returns_the_same_job(store: Store) -> None:
    first = await store.submit_jobs([new_job(idempotency_key="k1", request_hash="h")], T0)
    again = await store.submit_jobs([new_job(idempotency_key="k1", request_hash="h")], T0 + 1)
    assert again[0].job.id == first[0].job.id
    assert (first[0].created, again[0].created) == (True, False)


async def test_idempotency_key_with_other_body_is_refused_and_inserts_nothing(
    store: Store,
) -> None:
    await store.submit_jobs([new_job(idempotency_key="k1", request_hash="h")], T0)
    with pytest.raises(IdempotencyMismatch):
        await store.submit_jobs([new_job(), new_job(idempotency_key="k1", request_hash="x")], T0)
    assert len(await store.list_jobs(JobFilter(limit=10))) == 1


async def test_idempotency_keys_are_scoped_per_owner(store: Store) -> None:
    a = await submit(store, new_job(owner="a", idempotency_key="k", request_hash="h"))
    b = await submit(store, new_job(owner="b", idempotency_key="k", request_hash="h"))
    assert a != b


async def test_list_jobs_filters_and_pages_newest_first(store: Store) -> None:
    ids = await submit(store, *[new_job(owner="a") for _ in range(5)], new_job(owner="b"))
    first = await store.list_jobs(JobFilter(owner="a", limit=3))
    assert [j.id for j in first] == ids[4:1:-1]
    rest = await store.list_jobs(JobFilter(owner="a", limit=3, after_seq=first[-1].seq))
    assert [j.id for j in rest] == ids[1::-1]
    by_model = await store.list_jobs(JobFilter(model="other"))
    assert by_model == []


async def test_list_jobs_by_batch_and_creation_time(store: Store) -> None:
    early = await submit(store, new_job(), new_job(batch_id="batch_x"), now=T0)
    late = await submit(store, new_job(batch_id="batch_x"), new_job(owner="b"), now=T0 + 60)
    in_batch = await store.list_jobs(JobFilter(batch_id="batch_x"))
    assert [j.id for j in in_batch] == [late[0], early[1]]
    since = await store.list_jobs(JobFilter(created_after=T0 + 60))
    assert [j.id for j in since] == late[::-1]
    until = await store.list_jobs(JobFilter(created_before=T0 + 60))
    assert [j.id for j in until] == early[::-1]
    both = JobFilter(owner="alice", batch_id="batch_x", created_after=T0, created_before=T0 + 1)
    assert [j.id for j in await store.list_jobs(both)] == [early[1]]
    cursor = in_batch[0].seq  # older than the late batch job, still since T0
    paged = await store.list_jobs(JobFilter(created_after=T0, limit=1, after_seq=cursor))
    assert [j.id for j in paged] == [early[1]]


async def test_list_jobs_by_status(store: Store) -> None:
    a, _b = await submit(store, new_job(), new_job())
    await store.cancel_job(a, T0)
    cancelled = await store.list_jobs(JobFilter(status=JobStatus.CANCELLED))
    assert [j.id for j in cancelled] == [a]


async def test_delete_job_only_when_final(store: Store) -> None:
    running, done = await submit(store, new_job(), new_job())
    await store.cancel_job(done, T0)
    assert await store.delete_job(running) is False
    assert await store.get_job(running) is not None
    assert await store.delete_job(done) is True
    assert await store.get_job(done) is None
    assert await store.delete_job(done) is False


async def test_queue_position_follows_priority_then_age(store: Store) -> None:
    low, high, low2 = await submit(
        store, new_job(priority=0), new_job(priority=5), new_job(priority=0)
    )
    positions = {}
    for job_id in (low, high, low2):
        job = await store.get_job(job_id)
        assert job is not None
        positions[job_id] = await store.queue_position(job)
    assert positions == {high: 0, low: 1, low2: 2}


async def test_submit_positions_match_queue_position_through_the_lifecycle(store: Store) -> None:
    """The position a submit reports for a new job is what `queue_position` says of it,
    while jobs ahead are claimed, finished, released, retried, cancelled and expired."""

    async def submit_one(**kw: Any) -> tuple[str, int | None]:
        [outcome] = await store.submit_jobs([new_job(**kw)], T0, positions=True)
        return outcome.job.id, outcome.position

    async def check(job_id: str, reported: int | None) -> None:
        job = await store.get_job(job_id)
        assert job is not None
        assert reported == await store.queue_position(job)

    await check(*await submit_one())  # 0: an empty queue
    await check(*await submit_one(priority=5))  # 0: ahead of the first
    await check(*await submit_one(model="other"))  # 0: another model's queue
    [a, b] = await fetch(store, n=2)  # the two of model m
    await store.submit_results([NodeResult(a.id, str(a.lease_id), result=RESULT)], T0)
    await store.submit_results([NodeResult(b.id, str(b.lease_id), released=True)], T0)
    await check(*await submit_one())  # 1: behind the released job
    [c] = await fetch(store, n=1)
    failed = NodeResult(c.id, str(c.lease_id), error={"code": "x"}, retryable=True)
    await store.submit_results([failed], T0)  # queued again
    await check(*await submit_one(priority=-1))  # 2: behind both priority-0 jobs
    expiring, _ = await submit_one(priority=9, expires_at=T0 + 1)
    await store.reap(T0 + 2)  # expires it
    cancelled, _ = await submit_one(priority=9)
    await store.cancel_job(cancelled, T0)
    await check(*await submit_one(priority=9))  # 0: the priority-9 jobs are gone
    await check(*await submit_one())  # 3: the two priority-0 jobs and the priority-9 one
    assert expiring != cancelled


# -- fetch (claim) ---------------------------------------------------------------------


async def test_fetch_leases_by_priority_then_age(store: Store) -> None:
    old, high, new = await submit(
        store, new_job(priority=0), new_job(priority=9), new_job(priority=0)
    )
    jobs = await fetch(store, n=3)
    assert [j.id for j in jobs] == [high, old, new]
    assert all(j.status is JobStatus.IN_PROGRESS and j.attempts == 1 for j in jobs)
    assert len({j.lease_id for j in jobs}) == 3
    assert all(j.lease_expires_at == T0 + LEASE for j in jobs)


async def test_fetch_only_the_models_asked_for(store: Store) -> None:
    [a] = await submit(store, new_job(model="a"))
    await submit(store, new_job(model="b"))
    jobs = await fetch(store, models=["a", "c"], n=5)
    assert [j.id for j in jobs] == [a]


async def test_fetch_across_models_keeps_priority_order(store: Store) -> None:
    a, b = await submit(store, new_job(model="a"), new_job(model="b", priority=1))
    jobs = await fetch(store, models=["a", "b"], n=1)
    assert [j.id for j in jobs] == [b]
    assert [j.id for j in await fetch(store, models=["a", "b"], n=1)] == [a]


async def test_fetch_empty_queue_returns_nothing(store: Store) -> None:
    assert await fetch(store, n=4) == []


async def test_fetch_skips_jobs_past_expires_at(store: Store) -> None:
    await submit(store, new_job(expires_at=T0 + 1))
    assert await fetch(store, now=T0 + 2) == []


async def test_concurrent_claimers_never_share_a_job(store: Store) -> None:
    ids = await submit(store, *[new_job() for _ in range(200)])
    claims = await asyncio.gather(
        *[store.fetch_jobs(f"node-{i}", ["m"], 7, LEASE, T0) for i in range(40)]
    )
    claimed = [j.id for batch in claims for j in batch]
    assert len(claimed) == len(set(claimed)) == 200
    assert set(claimed) == set(ids)


# -- fair share (store/fair.py) ---------------------------------------------------------


async def owners_of(store: Store, n: int, models: list[str] | None = None) -> str:
    """The owners of the next `n` jobs claimed one at a time, as one letter each."""
    got = [await fetch(store, models, n=1) for _ in range(n)]
    return "".join(j.owner[0] for batch in got for j in batch)


async def test_fair_claim_takes_shares_in_turn_however_many_each_queued(store: Store) -> None:
    await submit(store, *[new_job(owner="alice") for _ in range(50)])
    await submit(store, *[new_job(owner="bob") for _ in range(3)])
    await submit(store, new_job(owner="carol"))
    assert await owners_of(store, 9) == "abcababaa"


async def test_fair_claim_of_several_jobs_interleaves_shares(store: Store) -> None:
    await submit(store, *[new_job(owner="alice") for _ in range(10)])
    await submit(store, *[new_job(owner="bob") for _ in range(10)])
    jobs = await fetch(store, n=6)
    assert sorted(j.owner for j in jobs) == ["alice"] * 3 + ["bob"] * 3
    assert await owners_of(store, 4) == "abab"


async def test_fair_claim_priority_comes_first(store: Store) -> None:
    await submit(store, *[new_job(owner="alice", priority=5) for _ in range(3)])
    await submit(store, new_job(owner="bob"))
    assert await owners_of(store, 4) == "aaab"


async def test_a_share_back_from_idle_gets_its_turn_but_no_credit(store: Store) -> None:
    await submit(store, *[new_job(owner="alice") for _ in range(20)])
    assert await owners_of(store, 10) == "a" * 10
    await submit(store, *[new_job(owner="bob") for _ in range(5)])
    assert await owners_of(store, 6) == "bababa"  # at once, then in turn: not 5 in a row


async def test_weights_set_the_turns(store: Store) -> None:
    await store.put_share(Share("alice", weight=3.0, updated_at=T0))
    await submit(store, *[new_job(owner="alice") for _ in range(20)])
    await submit(store, *[new_job(owner="bob") for _ in range(20)])
    taken = await owners_of(store, 16)
    assert (taken.count("a"), taken.count("b")) == (12, 4)


async def test_keys_of_one_group_share_one_turn(store: Store) -> None:
    for name in ("key_0000000000000001", "key_0000000000000002"):
        issued = new_key(Role.CLIENT, name)
        await store.create_key(replace(issued.record, id=name, group="team"))
        await submit(store, *[new_job(owner=name) for _ in range(10)])
    await submit(store, *[new_job(owner="carol") for _ in range(10)])
    taken = await owners_of(store, 10)
    assert taken.count("c") == 5  # carol alone gets as many turns as the whole team
    assert await store.set_key_group("key_0000000000000002", None) is not None
    taken = await owners_of(store, 10)
    assert taken.count("c") == 3  # three shares now (the key's own starts at the clock)


async def test_unfair_claim_takes_the_oldest_first(store: Store) -> None:
    await submit(store, *[new_job(owner="alice") for _ in range(5)])
    await submit(store, new_job(owner="bob"))
    got = [await store.fetch_jobs("n", ["m"], 1, LEASE, T0, fair=False) for _ in range(6)]
    assert "".join(b[0].owner[0] for b in got) == "aaaaab"


async def test_fair_claims_across_models_and_concurrent_claimers(store: Store) -> None:
    ids = await submit(store, *[new_job(owner=f"o{i % 7}", model=f"m{i % 3}") for i in range(210)])
    claimed: list[str] = []
    for _ in range(20):  # rounds of 30 at once (a claim skips what another holds)
        claims = await asyncio.gather(
            *[store.fetch_jobs(f"node-{i}", ["m0", "m1", "m2"], 4, LEASE, T0) for i in range(30)]
        )
        claimed += [j.id for batch in claims for j in batch]
        if len(claimed) >= 210:
            break
    assert len(claimed) == len(set(claimed)) == 210
    assert set(claimed) == set(ids)


async def test_fair_position_counts_the_turns_before_a_job(store: Store) -> None:
    flood = await submit(store, *[new_job(owner="alice") for _ in range(200)])
    [b1, b2] = await submit(store, new_job(owner="bob"), new_job(owner="bob"))
    [hi] = await submit(store, new_job(owner="carol", priority=1))
    jobs = {j.id: j for j in await store.get_jobs([flood[0], flood[-1], b1, b2, hi])}
    assert await store.queue_position(jobs[hi]) == 0
    assert await store.queue_position(jobs[flood[0]]) == 1
    assert await store.queue_position(jobs[b1]) == 2  # carol's, then alice's first
    assert await store.queue_position(jobs[b2]) == 4  # ... and one more turn each
    assert await store.queue_position(jobs[flood[-1]]) == 1 + 199 + 2
    assert await store.queue_position(jobs[b2], fair=False) == 1 + 200 + 1
    # the claim agrees: b2 is the fifth job out
    out = [(await fetch(store, n=1))[0].id for _ in range(5)]
    assert out[2] == b1 and out[4] == b2


async def test_fair_position_counts_at_most_its_budget(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openbeepboop.server.store import sql_store

    flood = await submit(store, *[new_job(owner="alice") for _ in range(120)])
    [last] = await store.get_jobs([flood[-1]])
    assert await store.queue_position(last) == 119
    monkeypatch.setattr(sql_store, "POSITION_BUDGET", 50)
    assert await store.queue_position(last) == 50  # a floor, counted in 50 rows


async def test_pinned_jobs_go_only_to_their_node_by_name_or_id(store: Store) -> None:
    by_name, by_id, free = await submit(
        store,
        new_job(pin_node="mac", priority=2),
        new_job(pin_node="node-9", priority=1),
        new_job(),
    )
    got = await store.fetch_jobs("node-1", ["m"], 5, LEASE, T0, node_name="pc")
    assert [j.id for j in got] == [free]  # both pinned jobs are passed over
    got = await store.fetch_jobs("node-2", ["m"], 5, LEASE, T0, node_name="mac")
    assert [(j.id, j.pin_node, j.node_id) for j in got] == [(by_name, "mac", "node-2")]
    got = await store.fetch_jobs("node-9", ["m"], 5, LEASE, T0, node_name="other")
    assert [j.id for j in got] == [by_id]


async def test_label_pins_need_every_label(store: Store) -> None:
    both = {"gpu": "a100", "site": "lab2"}
    [pinned] = await submit(store, new_job(pin_labels=both))
    [job] = await store.get_jobs([pinned])
    assert job.pin_labels == both and job.pin_node is None
    assert await store.fetch_jobs("n1", ["m"], 1, LEASE, T0, node_labels={"gpu": "a100"}) == []
    wrong = {"gpu": "a100", "site": "lab1"}
    assert await store.fetch_jobs("n2", ["m"], 1, LEASE, T0, node_labels=wrong) == []
    assert await store.fetch_jobs("n3", ["m"], 1, LEASE, T0) == []  # no labels at all
    more = {"gpu": "a100", "site": "lab2", "os": "linux"}
    [got] = await store.fetch_jobs("n4", ["m"], 1, LEASE, T0, node_name="x", node_labels=more)
    assert got.id == pinned


async def test_a_node_and_label_pin_needs_both(store: Store) -> None:
    [pinned] = await submit(store, new_job(pin_node="mac", pin_labels={"gpu": "m3"}))
    assert await store.fetch_jobs("n1", ["m"], 1, LEASE, T0, "mac", {"gpu": "a100"}) == []
    assert await store.fetch_jobs("n2", ["m"], 1, LEASE, T0, "pc", {"gpu": "m3"}) == []
    [got] = await store.fetch_jobs("n3", ["m"], 1, LEASE, T0, "mac", {"gpu": "m3"})
    assert got.id == pinned


async def test_unpinned_work_behind_pinned_jobs_is_claimed_in_order(store: Store) -> None:
    # jobs pinned elsewhere at the head of the queue do not hold back the rest, and a
    # node still takes unpinned work in priority order alongside its own pinned jobs
    await submit(store, *[new_job(pin_node="away", priority=5) for _ in range(30)])
    mine, low, high = await submit(
        store, new_job(pin_labels={"k": "v"}), new_job(priority=0), new_job(priority=3)
    )
    got = await store.fetch_jobs("n1", ["m"], 2, LEASE, T0, "here", {"k": "v"})
    assert [j.id for j in got] == [high, mine]
    got = await store.fetch_jobs("n1", ["m"], 5, LEASE, T0, "here", {"k": "v"})
    assert [j.id for j in got] == [low]


async def test_queue_heads_give_when_each_models_next_job_was_queued(store: Store) -> None:
    """Model affinity reads when another model's next job was queued: priority, then
    age; jobs pinned to a node, expired, or no longer queued do not count."""
    await submit(store, new_job("a", pin_node="elsewhere"), now=T0 - 50)
    await submit(store, new_job("a", expires_at=T0 + 1), now=T0 - 40)
    await submit(store, new_job("a"), now=T0 - 30)
    await submit(store, new_job("a", priority=1), now=T0 - 10)
    await submit(store, new_job("b"), now=T0 - 20)
    await submit(store, new_job("c"), now=T0 - 5)
    assert await store.queue_heads(["a", "b", "none"], T0 + 2) == {"a": T0 - 10, "b": T0 - 20}
    await fetch(store, ["a"], 1, now=T0 + 2)  # takes the priority-1 job
    await fetch(store, ["b"], 1, now=T0 + 2)
    assert await store.queue_heads(["a", "b", "c"], T0 + 2) == {"a": T0 - 30, "c": T0 - 5}
    assert await store.queue_heads([], T0) == {}


async def test_queue_position_counts_pinned_jobs_ahead_too(store: Store) -> None:
    pinned = new_job(pin_node="mac", priority=2)
    labelled = new_job(pin_labels={"k": "v"}, priority=1)
    outcomes = await store.submit_jobs([pinned, labelled, new_job()], T0, positions=True)
    assert [o.position for o in outcomes] == [0, 1, 2]
    assert [await store.queue_position(o.job) for o in outcomes] == [0, 1, 2]


async def test_concurrent_claimers_take_pinned_jobs_once_and_only_their_own(store: Store) -> None:
    jobs = [new_job(pin_node=f"box-{i % 4}") for i in range(80)]
    ids = await submit(store, *jobs)
    claims = await asyncio.gather(
        *[store.fetch_jobs(f"node-{i}", ["m"], 5, LEASE, T0, f"box-{i % 4}") for i in range(40)]
    )
    claimed = [j for batch in claims for j in batch]
    assert len({j.id for j in claimed}) == len(claimed) == 80 and {j.id for j in claimed} == set(
        ids
    )
    assert all(j.pin_node == f"box-{int(j.node_id.split('-')[1]) % 4}" for j in claimed)


# -- heartbeat -------------------------------------------------------------------------


async def test_heartbeat_extends_live_leases_and_reports_lost_ones(store: Store) -> None:
    await submit(store, new_job())
    [job] = await fetch(store)
    out = await store.heartbeat("node-1", [job.lease_id, "stale"], LEASE, T0 + 30)
    assert (out.extended, out.lost, out.cancelled) == ([job.lease_id], ["stale"], [])
    fresh = await store.get_job(job.id)
    assert fresh is not None and fresh.lease_expires_at == T0 + 30 + LEASE


async def test_heartbeat_reports_cancelled_jobs(store: Store) -> None:
    await submit(store, new_job())
    [job] = await fetch(store)
    await store.cancel_job(job.id, T0 + 1)
    out = await store.heartbeat("node-1", [job.lease_id], LEASE, T0 + 2)
    assert out.cancelled == [job.id]
    assert out.extended == []


# -- results (fencing) -----------------------------------------------------------------


async def test_result_from_current_lease_completes_the_job(store: Store) -> None:
    await submit(store, new_job())
    [job] = await fetch(store)
    [out] = await store.submit_results([NodeResult(job.id, job.lease_id or "", RESULT)], T0 + 1)
    assert out.accepted
    done = await store.get_job(job.id)
    assert done is not None
    assert (done.status, done.result, done.finished_at) == (JobStatus.COMPLETED, RESULT, T0 + 1)


async def test_stale_lease_result_is_refused_and_changes_nothing(store: Store) -> None:
    await submit(store, new_job(max_attempts=5))
    [first] = await fetch(store)
    await store.reap(T0 + LEASE + 1)  # the lease expires; the job is queued again
    [second] = await fetch(store, now=T0 + LEASE + 2)
    assert second.lease_id != first.lease_id
    stale = NodeResult(first.id, first.lease_id or "", RESULT)
    [out] = await store.submit_results([stale], T0 + LEASE + 3)
    assert (out.accepted, out.reason) == (False, "lease_lost")
    job = await store.get_job(first.id)
    assert job is not None
    assert (job.status, job.lease_id, job.result) == (
        JobStatus.IN_PROGRESS,
        second.lease_id,
        None,
    )


async def test_results_are_judged_one_by_one(store: Store) -> None:
    await submit(store, new_job(), new_job())
    a, b = await fetch(store, n=2)
    outs = await store.submit_results(
        [
            NodeResult(a.id, a.lease_id or "", RESULT),
            NodeResult(b.id, "wrong", RESULT),
            NodeResult("job_nope", "x", RESULT),
        ],
        T0,
    )
    assert [(o.accepted, o.reason) for o in outs] == [
        (True, None),
        (False, "lease_lost"),
        (False, "not_found"),
    ]


async def test_result_for_cancelled_job_is_refused(store: Store) -> None:
    await submit(store, new_job())
    [job] = await fetch(store)
    await store.cancel_job(job.id, T0)
    [out] = await store.submit_results([NodeResult(job.id, job.lease_id or "", RESULT)], T0)
    assert (out.accepted, out.reason) == (False, "cancelled")


async def test_permanent_error_fails_the_job_with_the_error(store: Store) -> None:
    await submit(store, new_job())
    [job] = await fetch(store)
    error = {"code": "context_length_exceeded", "message": "too long"}
    await store.submit_results([NodeResult(job.id, job.lease_id or "", error=error)], T0)
    failed = await store.get_job(job.id)
    assert failed is not None
    assert (failed.status, failed.error) == (JobStatus.FAILED, error)


async def test_retryable_error_requeues_until_attempts_run_out(store: Store) -> None:
    [job_id] = await submit(store, new_job(max_attempts=2))
    error = {"code": "rate_limited", "message": "429"}
    for expected in (JobStatus.QUEUED, JobStatus.FAILED):
        [job] = await fetch(store)
        r = NodeResult(job_id, job.lease_id or "", error=error, retryable=True)
        await store.submit_results([r], T0)
        after = await store.get_job(job_id)
        assert after is not None and after.status is expected
    assert after.error == error and after.attempts == 2


async def test_release_requeues_without_using_an_attempt(store: Store) -> None:
    [job_id] = await submit(store, new_job(max_attempts=1))
    [job] = await fetch(store)
    r = NodeResult(job_id, job.lease_id or "", error={"code": "released"}, released=True)
    await store.submit_results([r], T0)
    after = await store.get_job(job_id)
    assert after is not None
    assert (after.status, after.attempts, after.lease_id) == (JobStatus.QUEUED, 0, None)


async def test_release_lease_requeues_under_its_lease_only(store: Store) -> None:
    """A claim whose answer never reached the node goes back as if never made; a lease
    that is no longer the job's (a later claim, a result) releases nothing."""
    [job_id] = await submit(store, new_job(max_attempts=1))
    [job] = await fetch(store)
    assert await store.release_lease(job_id, "not-the-lease") is None
    released = await store.release_lease(job_id, job.lease_id or "")
    assert released is not None
    assert (released.status, released.attempts, released.lease_id, released.node_id) == (
        JobStatus.QUEUED,
        0,
        None,
        None,
    )
    assert await store.release_lease(job_id, job.lease_id or "") is None  # only once
    assert await store.queue_position(released) == 0
    [again] = await fetch(store)  # claimed anew, on its one attempt
    assert (again.id, again.attempts) == (job_id, 1)
    await store.submit_results([NodeResult(job_id, again.lease_id or "", RESULT)], T0)
    assert await store.release_lease(job_id, again.lease_id or "") is None
    done = await store.get_job(job_id)
    assert done is not None and done.status is JobStatus.COMPLETED


async def test_move_job_requeues_on_another_model_under_its_lease(store: Store) -> None:
    """An alias's job moves to its next member: from its lease (the member's error kept)
    or from the queue; the counters and the claims follow the new model."""
    [job_id] = await submit(store, new_job("a", max_attempts=1))
    [job] = await fetch(store, ["a"])
    body = {**job.request, "model": "b"}
    error = {"code": "upstream_error", "message": "boom"}
    assert await store.move_job(job_id, "not-the-lease", "b", body, error) is None
    moved = await store.move_job(job_id, job.lease_id, "b", body, error)
    assert moved is not None
    assert (moved.status, moved.model, moved.attempts, moved.lease_id, moved.node_id) == (
        JobStatus.QUEUED,
        "b",
        0,
        None,
        None,
    )
    assert moved.request["model"] == "b" and moved.error == error
    assert await store.move_job(job_id, job.lease_id, "c", body, None) is None  # only once
    assert await store.stats() == {"b": {"queued": 1}}
    assert await fetch(store, ["a"]) == []
    [again] = await fetch(store, ["b"])
    assert (again.id, again.attempts, again.request["model"]) == (job_id, 1, "b")
    [other] = await submit(store, new_job("a"))  # a queued job moves without a lease
    queued = await store.move_job(other, None, "b", {"model": "b"}, None)
    assert queued is not None and (queued.status, queued.model) == (JobStatus.QUEUED, "b")
    assert await store.move_job(other, None, "c", {"model": "c"}, None) is not None
    outcomes = await store.submit_jobs([new_job("c")], T0 + 1, positions=True)
    assert outcomes[0].position == 1  # the moved job is ahead of it
    assert (await store.stats())["b"] == {"in_progress": 1}


# -- cancel ----------------------------------------------------------------------------


async def test_cancel_queued_and_running_jobs(store: Store) -> None:
    queued, running = await submit(store, new_job(priority=0), new_job(priority=1))
    await fetch(store)
    for job_id in (queued, running):
        job = await store.cancel_job(job_id, T0 + 5)
        assert job is not None and job.status is JobStatus.CANCELLED
    assert await fetch(store) == []


async def test_cancel_final_job_changes_nothing(store: Store) -> None:
    await submit(store, new_job())
    [job] = await fetch(store)
    await store.submit_results([NodeResult(job.id, job.lease_id or "", RESULT)], T0)
    after = await store.cancel_job(job.id, T0 + 1)
    assert after is not None and after.status is JobStatus.COMPLETED


async def test_cancel_unknown_job_is_none(store: Store) -> None:
    assert await store.cancel_job("job_nope", T0) is None


# -- reap ------------------------------------------------------------------------------


async def test_reap_requeues_expired_leases_then_fails_when_exhausted(store: Store) -> None:
    [job_id] = await submit(store, new_job(max_attempts=2))
    now = T0
    for _ in range(2):
        [job] = await fetch(store, now=now)
        assert job.id == job_id
        now += LEASE + 1
        out = await store.reap(now)
    assert out.failed == [job_id]
    job = await store.get_job(job_id)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error is not None and job.error["code"] == "attempts_exhausted"


async def test_reap_leaves_live_leases_alone(store: Store) -> None:
    await submit(store, new_job())
    await fetch(store)
    out = await store.reap(T0 + LEASE - 1)
    assert out.changed == 0


async def test_reap_expires_queued_jobs_past_their_time(store: Store) -> None:
    [job_id] = await submit(store, new_job(expires_at=T0 + 10))
    out = await store.reap(T0 + 11)
    assert out.expired == [job_id]
    job = await store.get_job(job_id)
    assert job is not None and job.status is JobStatus.EXPIRED


async def test_resume_leases_extends_only_after_the_deployment_was_down(store: Store) -> None:
    """Leases live when servers last watched them get the grace after an outage; leases
    that had expired before stay expired; a start while leases are watched changes none."""
    stale, live = await submit(store, new_job(priority=1), new_job(priority=0))
    [old] = await fetch(store, now=T0 - LEASE - 5)  # expired at T0 - 5, before the watch
    [young] = await fetch(store, now=T0)  # expires at T0 + LEASE
    assert (old.id, young.id) == (stale, live)
    await store.watch_leases(T0)
    await store.watch_leases(T0 - 30)  # an older pass (a skewed replica) changes nothing

    quick = await store.resume_leases(T0 + 3, grace=LEASE, down_after=5)
    assert (quick.down, quick.watched_at, quick.extended) == (False, T0, [])

    later = T0 + 3 + 600  # everything stopped for ten minutes
    resumed = await store.resume_leases(later, grace=LEASE, down_after=5)
    assert (resumed.down, resumed.watched_at, resumed.extended) == (True, T0 + 3, [live])
    job = await store.get_job(live)
    assert job is not None and job.lease_expires_at == later + LEASE
    assert (await store.reap(later + 1)).requeued == [stale]
    assert (await store.reap(later + LEASE + 1)).requeued == [live]

    again = await store.resume_leases(later + 2, grace=LEASE, down_after=5)
    assert (again.down, again.watched_at) == (False, later)


async def test_resume_leases_without_a_record_extends_every_lease(store: Store) -> None:
    [job_id] = await submit(store, new_job())
    await fetch(store, now=T0)
    resumed = await store.resume_leases(T0 + 600, grace=10, down_after=5)
    assert (resumed.down, resumed.watched_at, resumed.extended) == (True, None, [job_id])
    job = await store.get_job(job_id)
    assert job is not None and job.lease_expires_at == T0 + 610


# -- counts ----------------------------------------------------------------------------


async def test_count_active_and_stats(store: Store) -> None:
    await submit(store, new_job(owner="a"), new_job(owner="a", model="x"), new_job(owner="b"))
    await fetch(store)
    assert await store.count_active("a") == 2
    stats = await store.stats()
    assert stats == {"m": {"queued": 1, "in_progress": 1}, "x": {"queued": 1}}


async def full_count(store: Store) -> dict[str, dict[str, int]]:
    """Jobs per model and status, counted the slow way: row by row."""
    out: dict[str, dict[str, int]] = {}
    for model in ("m", "x"):
        for job in await store.list_jobs(JobFilter(model=model, limit=1000)):
            by_status = out.setdefault(model, {})
            by_status[job.status.value] = by_status.get(job.status.value, 0) + 1
    return out


async def test_stats_counters_equal_a_full_count_after_a_mixed_lifecycle(store: Store) -> None:
    """Every way a job changes status moves the counters /v1/stats and /metrics read."""
    many = [new_job(model="m" if i % 3 else "x", max_attempts=2) for i in range(30)]
    ids = await submit(store, *many)
    await submit(store, new_job(expires_at=T0 + 5))  # expires queued
    replay = new_job(idempotency_key="k1", request_hash="same")
    await submit(store, replay)
    await submit(store, replay)  # a replay adds nothing
    assert await store.stats() == await full_count(store)
    jobs = await fetch(store, ["m", "x"], n=12)
    done = [NodeResult(j.id, j.lease_id, RESULT) for j in jobs[:4]]
    failed = [NodeResult(j.id, j.lease_id, error={"m": "no"}, retryable=False) for j in jobs[4:6]]
    retried = [
        NodeResult(j.id, j.lease_id, error={"m": "again"}, retryable=True) for j in jobs[6:8]
    ]
    released = [NodeResult(j.id, j.lease_id, released=True) for j in jobs[8:9]]
    await store.submit_results([*done, *failed, *retried, *released], T0 + 1)
    await store.submit_results([NodeResult(jobs[0].id, jobs[0].lease_id, RESULT)], T0 + 1)
    assert await store.stats() == await full_count(store)
    await store.cancel_job(jobs[9].id, T0 + 2)  # running
    await store.cancel_job(ids[-1], T0 + 2)  # queued
    await store.reap(T0 + LEASE + 10)  # the two still leased: queued again; one expires
    again = await fetch(store, ["m", "x"], n=3, now=T0 + LEASE + 11)
    await store.reap(T0 + 3 * LEASE)  # second lease lost: attempts used up, failed
    assert again and await store.stats() == await full_count(store)
    stats = await store.stats()
    assert sum(n for by in stats.values() for n in by.values()) == 32
    assert stats["m"]["completed"] == sum(j.model == "m" for j in jobs[:4])
    assert all(n > 0 for by in stats.values() for n in by.values())  # no empty statuses


async def test_finished_counts_by_step_model_and_status(store: Store) -> None:
    """The overview's throughput: jobs that completed or failed in a window, per step."""
    await submit(store, *[new_job(model="m" if i % 2 else "x") for i in range(6)])
    jobs = await fetch(store, ["m", "x"], n=6)
    ok = [NodeResult(j.id, j.lease_id, RESULT) for j in jobs[:3]]
    bad = [NodeResult(j.id, j.lease_id, error={"m": "no"}, retryable=False) for j in jobs[3:4]]
    await store.submit_results(ok[:2], T0 + 1)
    await store.submit_results([ok[2], *bad], T0 + 12)
    await store.cancel_job(jobs[4].id, T0 + 13)  # cancelled: not counted
    counts = await store.finished_counts(T0, T0 + 20, 10)
    expected: dict[tuple[int, str, str], int] = {}
    for step, result in ((0, ok[0]), (0, ok[1]), (1, ok[2]), (1, bad[0])):
        job = next(j for j in jobs if j.id == result.job_id)
        status = "completed" if result in ok else "failed"
        expected[(step, job.model, status)] = expected.get((step, job.model, status), 0) + 1
    assert {(i, m, s): n for i, m, s, n in counts} == expected
    assert await store.finished_counts(T0 + 12, T0 + 13, 1) != []
    assert await store.finished_counts(T0 + 2, T0 + 12, 5) == []  # the window is [since, until)


# -- nodes and keys --------------------------------------------------------------------


def a_node(node_id: str = "node-1", seen: float = T0) -> Node:
    return Node(node_id, "box", "key_1", [{"name": "m"}], 2, {"gpu": "none"}, "1", T0, seen)


async def test_nodes_register_touch_and_list_by_liveness(store: Store) -> None:
    await store.register_node(a_node("n1"))
    await store.register_node(a_node("n2"))
    assert await store.touch_node("n2", T0 + 100, {"tps": 5})
    assert not await store.touch_node("nope", T0, None)
    live = await store.list_nodes(seen_since=T0 + 50)
    assert [n.id for n in live] == ["n2"]
    assert live[0].stats == {"tps": 5}
    got = await store.get_node("n1")
    assert got is not None and got.models == [{"name": "m"}]


async def test_node_labels_round_trip(store: Store) -> None:
    await store.register_node(replace(a_node("n1"), labels={"gpu": "a100", "site": "lab2"}))
    await store.register_node(a_node("n2"))
    found = {n.id: n.labels for n in await store.list_nodes(0.0)}
    assert found == {"n1": {"gpu": "a100", "site": "lab2"}, "n2": {}}


async def test_a_node_registering_again_replaces_its_stale_rows_only(store: Store) -> None:
    await store.register_node(a_node("run1", seen=T0))
    await store.register_node(a_node("twin", seen=T0 + 90))  # same name, still live
    other = replace(a_node("other", seen=T0), name="other-box")
    await store.register_node(other)
    await store.register_node(a_node("run2", seen=T0 + 100), stale_before=T0 + 40)
    assert await store.get_node("run1") is None
    assert {n.id for n in await store.list_nodes(0.0)} == {"twin", "other", "run2"}


async def test_forget_nodes_not_seen_since(store: Store) -> None:
    for i in range(3):
        await store.register_node(a_node(f"n{i}", seen=T0 + i))
    assert await store.forget_nodes(T0 + 2) == 2
    assert [n.id for n in await store.list_nodes(0.0)] == ["n2"]
    assert await store.forget_nodes(T0 + 2) == 0


async def test_keys_create_lookup_list_revoke(store: Store) -> None:
    issued = new_key(Role.CLIENT, "laptop", now=T0)
    await store.create_key(issued.record)
    found = await store.get_key_by_hash(issued.record.key_hash)
    assert found == issued.record
    assert [k.id for k in await store.list_keys()] == [issued.record.id]
    revoked = await store.revoke_key(issued.record.id, T0 + 1)
    assert revoked is not None and not revoked.active
    assert await store.revoke_key("key_nope", T0) is None


async def test_swarm_revocations_add_list_get_and_revoke_known_keys(store: Store) -> None:
    here = new_key(Role.CLIENT, "swarm key", now=T0)
    other = new_key(Role.NODE, "local", now=T0)
    await store.create_key(here.record)
    await store.create_key(other.record)
    first = SwarmRevocation(here.record.id, T0 + 5, "server-a")
    assert await store.add_revocations([]) == 0
    assert await store.add_revocations([first, first, SwarmRevocation("key_00", T0, "b")]) == 2
    # a known id keeps its first record; the new ones alone are counted
    again = SwarmRevocation(here.record.id, T0 + 9, "server-c")
    assert await store.add_revocations([again, SwarmRevocation("key_01", T0, "")]) == 1
    # by key id (a random id may sort anywhere among these)
    assert await store.list_revocations() == sorted(
        [SwarmRevocation("key_00", T0, "b"), SwarmRevocation("key_01", T0, ""), first],
        key=lambda r: r.key_id,
    )
    assert await store.get_revocation(here.record.id) == first
    assert await store.get_revocation(other.record.id) is None
    # the key kept here that a revocation names is revoked with it, at the swarm's time
    revoked = await store.get_key_by_hash(here.record.key_hash)
    assert revoked is not None and revoked.revoked_at == T0 + 5
    kept = await store.get_key_by_hash(other.record.key_hash)
    assert kept is not None and kept.active
    # a key stored after its revocation is revoked by the next recording
    late = new_key(Role.CLIENT, now=T0)
    await store.create_key(late.record)
    assert await store.add_revocations([SwarmRevocation(late.record.id, T0 + 7, "a")]) == 1
    found = await store.get_key_by_hash(late.record.key_hash)
    assert found is not None and found.revoked_at == T0 + 7


async def test_web_sessions_create_get_expire_delete_prune(store: Store) -> None:
    live = WebSession("h1", "keyhash", "csrf1", T0, T0 + 100)
    old = WebSession("h2", "keyhash", "csrf2", T0 - 200, T0 - 100)
    await store.create_session(live)
    await store.create_session(old)
    assert await store.get_session("h1", T0) == live
    assert await store.get_session("h1", T0 + 100) is None  # expired at its expiry
    assert await store.get_session("h2", T0) is None
    assert await store.prune_sessions(T0) == 1
    assert await store.delete_session("h1") is True
    assert await store.delete_session("h1") is False
    assert await store.get_session("h1", T0) is None


# -- durability ------------------------------------------------------------------------


async def test_data_survives_reopen(store: Store, tmp_path: Path) -> None:
    if not isinstance(store, SqliteStore):
        return  # a server-side database outlives its connections by definition
    [job_id] = await submit(store, new_job())
    await store.close()
    again = SqliteStore(store.path)
    await again.open()
    try:
        assert await again.get_job(job_id) is not None
    finally:
        await again.close()
    await store.open()


async def test_sqlite_fsyncs_only_what_acknowledges_something(tmp_path: Path) -> None:
    """A submit a client is told of and a result a node is told of wait for the disk; a
    lease, a heartbeat and the submit of a synchronous call (its caller hears of the job
    only with the result) do not: the next fsync of the WAL covers them. All of them
    are committed and visible at once, and survive the process."""
    async with opened(SqliteStore(tmp_path / "fsync.db")) as store:
        assert isinstance(store, SqliteStore)
        synced = store.synced_commits
        [quiet] = [o.job.id for o in await store.submit_jobs([new_job()], T0, durable=False)]
        [leased] = await fetch(store)
        await store.heartbeat("node-1", [leased.lease_id], LEASE, T0 + 1)
        assert store.synced_commits == synced  # nothing waited for the disk so far
        seen = await store.get_job(quiet)
        assert seen is not None and seen.status is JobStatus.IN_PROGRESS
        assert seen.lease_expires_at == T0 + 1 + LEASE
        await store.submit_results([NodeResult(quiet, leased.lease_id or "", RESULT)], T0 + 2)
        assert store.synced_commits == synced + 1
        await submit(store, new_job())
        assert store.synced_commits == synced + 2
    async with opened(SqliteStore(tmp_path / "fsync.db")) as again:
        job = await again.get_job(quiet)
        assert job is not None and job.status is JobStatus.COMPLETED


# -- files ---------------------------------------------------------------------------


def stored_file(file_id: str, owner: str = "alice", purpose: str = "batch") -> StoredFile:
    return StoredFile(file_id, owner, purpose, "in.jsonl", 6, T0, lines=2)


async def test_file_parts_read_back_in_order_and_replace(store: Store) -> None:
    await store.put_file_part("file-a", 0, b"abc")
    await store.put_file_part("file-a", 1, b"\x00\xffdef")
    await store.put_file_part("file-a", 1, b"def")  # a rewritten part replaces the old
    created = await store.create_file(stored_file("file-a"))
    assert created.seq > 0
    assert await store.read_file_part("file-a", 0) == b"abc"
    assert await store.read_file_part("file-a", 1) == b"def"
    assert await store.read_file_part("file-a", 2) is None
    assert await store.get_file("file-a") == created
    assert await store.get_file("file-nope") is None


async def test_list_files_filters_and_pages_newest_first(store: Store) -> None:
    made = [await store.create_file(stored_file(f"file-{i}")) for i in range(3)]
    await store.create_file(stored_file("file-out", purpose="batch_output"))
    await store.create_file(stored_file("file-bob", owner="bob"))
    page = await store.list_files("alice", "batch", 2, None)
    assert [f.id for f in page] == ["file-2", "file-1"]
    rest = await store.list_files("alice", "batch", 2, page[-1].seq)
    assert [f.id for f in rest] == [made[0].id]
    assert {f.id for f in await store.list_files(None, None, 10, None)} >= {"file-bob"}


async def test_delete_file_removes_record_and_parts(store: Store) -> None:
    await store.put_file_part("file-d", 0, b"x")
    await store.create_file(stored_file("file-d"))
    assert await store.delete_file("file-d") is True
    assert await store.get_file("file-d") is None
    assert await store.read_file_part("file-d", 0) is None
    assert await store.delete_file("file-d") is False


# -- batches -------------------------------------------------------------------------


def new_batch(batch_id: str = "batch_1", owner: str = "alice") -> Batch:
    return Batch(
        id=batch_id,
        owner=owner,
        endpoint="/v1/chat/completions",
        input_file_id="file-in",
        completion_window="24h",
        status=BatchStatus.VALIDATING,
        created_at=T0,
        expires_at=T0 + 86_400,
        metadata={"run": "7"},
    )


async def test_batch_round_trips_and_saves_with_version_check(store: Store) -> None:
    created = await store.create_batch(new_batch())
    assert created.seq > 0
    got = await store.get_batch("batch_1")
    assert got == created
    assert got is not None
    got.status = BatchStatus.IN_PROGRESS
    got.in_progress_at = T0 + 1
    got.errors = [{"code": "x", "line": 3}]
    got.request_counts = {"total": 2, "completed": 1, "failed": 1}
    saved = await store.save_batch(got)
    assert saved is not None and saved.version == got.version + 1
    assert await store.get_batch("batch_1") == saved
    # A second writer holding the old version loses.
    assert await store.save_batch(got) is None
    assert await store.get_batch("batch_nope") is None


async def test_open_and_listed_batches(store: Store) -> None:
    await store.create_batch(new_batch("batch_a"))
    done = await store.create_batch(new_batch("batch_b"))
    await store.create_batch(new_batch("batch_c", owner="bob"))
    done.status = BatchStatus.COMPLETED
    assert await store.save_batch(done) is not None
    assert [b.id for b in await store.open_batches()] == ["batch_a", "batch_c"]
    mine = await store.list_batches("alice", 10, None)
    assert [b.id for b in mine] == ["batch_b", "batch_a"]
    assert [b.id for b in await store.list_batches("alice", 10, mine[0].seq)] == ["batch_a"]
    assert len(await store.list_batches(None, 10, None)) == 3


async def test_batch_jobs_counts_and_cancel(store: Store) -> None:
    ids = await submit(store, *[new_job(batch_id="batch_1") for _ in range(3)], new_job())
    assert (await store.get_job(ids[0])).batch_id == "batch_1"  # type: ignore[union-attr]
    [running] = await fetch(store)
    assert running.id == ids[0]
    assert await store.batch_counts("batch_1") == {"in_progress": 1, "queued": 2}
    page = await store.batch_jobs("batch_1", 0, 2)
    assert [j.id for j in page] == ids[:2]
    assert [j.id for j in await store.batch_jobs("batch_1", page[-1].seq, 2)] == [ids[2]]
    assert sorted(await store.cancel_batch_jobs("batch_1", T0 + 1)) == sorted(ids[1:3])
    assert await store.batch_counts("batch_1") == {"in_progress": 1, "cancelled": 2}
    assert (await store.get_job(ids[3])).status is JobStatus.QUEUED  # type: ignore[union-attr]


# -- retention -----------------------------------------------------------------------


async def finished_jobs(store: Store) -> dict[str, str]:
    """One job in each status (final ones finished at T0 + 10), by status."""
    ids = await submit(store, *[new_job() for _ in range(6)])
    leased = await fetch(store, n=4)
    done, bad, _running, gone = leased
    ok = NodeResult(done.id, done.lease_id, result=RESULT)
    err = NodeResult(bad.id, bad.lease_id, error={"message": "x"}, retryable=False)
    await store.submit_results([ok, err], T0 + 10)
    await store.cancel_job(gone.id, T0 + 10)
    queued = [i for i in ids if i not in {j.id for j in leased}]
    await store.cancel_job(queued[0], T0 + 10)
    statuses = {j.id: j.status.value for j in await store.get_jobs(ids)}
    assert sorted(statuses.values()) == sorted(
        ["completed", "failed", "in_progress", "cancelled", "cancelled", "queued"]
    )
    return statuses


async def test_prune_jobs_takes_only_final_jobs_older_than_the_cutoff(store: Store) -> None:
    statuses = await finished_jobs(store)
    # finished at T0 + 10: a cutoff at that moment keeps them
    assert await store.count_prunable_jobs(JobStatus.COMPLETED, T0 + 10) == 0
    assert await store.prune_jobs(JobStatus.COMPLETED, T0 + 10, 100) == 0
    assert await store.count_prunable_jobs(JobStatus.CANCELLED, T0 + 11) == 2
    assert await store.prune_jobs(JobStatus.CANCELLED, T0 + 11, 1) == 1  # the limit holds
    assert await store.prune_jobs(JobStatus.CANCELLED, T0 + 11, 100) == 1
    for status in (JobStatus.COMPLETED, JobStatus.FAILED):
        assert await store.prune_jobs(status, T0 + 11, 100) == 1
    # whatever the cutoff, queued and running jobs stay
    for status in (JobStatus.QUEUED, JobStatus.IN_PROGRESS):
        assert await store.prune_jobs(status, T0 + 1e9, 100) == 0
    left = await store.get_jobs(list(statuses))
    assert sorted(j.status.value for j in left) == ["in_progress", "queued"]
    assert await store.stats() == {"m": {"in_progress": 1, "queued": 1}}


async def test_prune_keeps_jobs_of_a_running_batch(store: Store) -> None:
    batch = await store.create_batch(new_batch("batch_r"))
    [job_id] = await submit(store, new_job(batch_id="batch_r"))
    await store.cancel_job(job_id, T0)
    assert await store.count_prunable_jobs(JobStatus.CANCELLED, T0 + 1) == 0
    assert await store.prune_jobs(JobStatus.CANCELLED, T0 + 1, 10) == 0
    assert await store.prune_batches(T0 + 1e9, 10) == 0  # not final: kept
    batch.status, batch.cancelled_at = BatchStatus.CANCELLED, T0 + 5
    assert await store.save_batch(batch) is not None
    assert await store.prune_jobs(JobStatus.CANCELLED, T0 + 1, 10) == 1
    assert await store.count_prunable_batches(T0 + 5) == 0
    assert await store.count_prunable_batches(T0 + 6) == 1
    assert await store.prune_batches(T0 + 6, 10) == 1
    assert await store.get_batch("batch_r") is None


async def test_files_expire_and_batch_files_go_with_their_batches(store: Store) -> None:
    async def put(file_id: str, purpose: str = "batch", expires: float | None = None) -> None:
        await store.put_file_part(file_id, 0, b"abcdef")
        await store.create_file(replace(stored_file(file_id, purpose=purpose), expires_at=expires))

    await put("file-exp", "user_data", expires=T0 + 100)
    await put("file-keep", "user_data")
    await put("file-in")  # new_batch's input
    await put("file-unused")
    await put("file-out", "batch_output")
    batch = await store.create_batch(replace(new_batch("batch_f"), output_file_id="file-out"))
    await put("file-old-in", expires=T0 + 1)  # the input of a running batch: kept
    await store.create_batch(replace(new_batch("batch_g"), input_file_id="file-old-in"))
    assert await store.owner_file_bytes("alice") == 36
    assert await store.owner_file_bytes("nobody") == 0

    assert await store.prunable_files(T0 + 99, 0.0, 10) == []
    assert await store.prunable_files(T0 + 100, 0.0, 10) == ["file-exp"]
    assert await store.prunable_files(T0 + 100, T0 + 1, 10) == ["file-exp", "file-unused"]
    assert await store.prune_file("file-exp", T0 + 100, 0.0) is True
    assert await store.get_file("file-exp") is None
    assert await store.read_file_part("file-exp", 0) is None
    assert await store.prune_file("file-keep", T0 + 1e9, T0 + 1e9) is False  # stays
    assert await store.read_file_part("file-keep", 0) == b"abcdef"

    batch.status, batch.completed_at = BatchStatus.COMPLETED, T0 + 5
    assert await store.save_batch(batch) is not None
    assert await store.prunable_files(T0 + 10, T0 + 1, 10) == ["file-unused"]  # still used
    assert await store.prune_batches(T0 + 10, 10) == 1
    assert await store.prunable_files(T0 + 10, T0 + 1, 10) == [
        "file-in",
        "file-unused",
        "file-out",
    ]
    for file_id in ("file-in", "file-unused", "file-out"):
        assert await store.prune_file(file_id, T0 + 10, T0 + 1) is True
    assert [f.id for f in await store.list_files(None, None, 10, None)] == [
        "file-old-in",
        "file-keep",
    ]


async def test_file_expiry_round_trips(store: Store) -> None:
    await store.put_file_part("file-e", 0, b"x")
    made = await store.create_file(replace(stored_file("file-e"), expires_at=T0 + 3600))
    assert made.expires_at == T0 + 3600
    assert await store.get_file("file-e") == made


# -- assistant templates -----------------------------------------------------------------


async def test_templates_put_replace_list_delete(store: Store) -> None:
    streams = [{"provider": "local", "settings": {"model": "m"}, "messages": []}]
    first = await store.put_template(Template("alice", "helper", streams, T0, T0, "v1"))
    assert await store.get_template("alice", "helper") == first
    replaced = await store.put_template(
        Template("alice", "helper", [*streams, *streams], T0 + 5, T0 + 5, "v2")
    )
    assert (replaced.created_at, replaced.updated_at) == (T0, T0 + 5)
    assert (replaced.description, len(replaced.streams)) == ("v2", 2)
    await store.put_template(Template("bob", "helper", streams, T0, T0))
    await store.put_template(Template("alice", "aardvark", streams, T0, T0))
    assert [t.name for t in await store.list_templates("alice")] == ["aardvark", "helper"]
    assert len(await store.list_templates(None)) == 3
    assert await store.get_template("carol", "helper") is None
    assert await store.delete_template("alice", "helper") is True
    assert await store.delete_template("alice", "helper") is False
    assert (await store.get_template("bob", "helper")) is not None


# -- rate limits -------------------------------------------------------------------------


async def test_hit_counters_count_per_window(store: Store) -> None:
    second, minute = "k1/50/1/second", "k1/600/1/minute"
    assert await store.hit_counters({second: T0, minute: T0 - 40}) == {
        second: (1, T0),
        minute: (1, T0 - 40),
    }
    assert await store.hit_counters({second: T0}) == {second: (2, T0)}
    assert await store.hit_counters({"k2/50/1/second": T0}) == {"k2/50/1/second": (1, T0)}
    # a late hit stamped with an earlier window counts in the current one
    assert await store.hit_counters({second: T0 - 1}) == {second: (3, T0)}
    assert await store.hit_counters({second: T0 + 1, minute: T0 - 40}) == {
        second: (1, T0 + 1),
        minute: (2, T0 - 40),
    }
    assert await store.hit_counters({}) == {}


async def test_hit_counters_are_atomic_under_concurrency(store: Store) -> None:
    names = {"k/a": T0, "k/b": T0}
    counts = await asyncio.gather(*(store.hit_counters(names) for _ in range(40)))
    for name in names:
        assert sorted(c[name][0] for c in counts) == list(range(1, 41))


# -- response cache ---------------------------------------------------------------------


async def _complete(store: Store, job_id: str, result: dict[str, Any], now: float) -> None:
    [leased] = [j for j in await fetch(store, now=now) if j.id == job_id]
    [outcome] = await store.submit_results(
        [NodeResult(job_id, leased.lease_id, result=result)], now
    )
    assert outcome.accepted


async def test_cache_keeps_the_answer_of_a_completed_job_with_a_cache_key(store: Store) -> None:
    [kept, other] = await submit(store, new_job(cache_key="k1"), new_job(text="no key"))
    assert await store.cache_lookup(["k1"], T0) == {}  # nothing until it completes
    await _complete(store, kept, RESULT, T0 + 1)
    await _complete(store, other, {"other": True}, T0 + 1)
    assert await store.cache_lookup(["k1", "k2"], T0) == {"k1": RESULT}
    held = await store.cache_summary()
    assert (held.entries, held.hits) == (1, 0)
    assert held.bytes == len(json.dumps(RESULT, separators=(",", ":")))
    # made at T0 + 1: a lookup wanting answers from after that finds nothing (expired)
    assert await store.cache_lookup(["k1"], T0 + 2) == {}
    job = await store.get_job(kept)
    assert job is not None and job.cache_key == "k1" and not job.cached


async def test_cache_a_cached_result_is_stored_completed_and_never_queued(store: Store) -> None:
    [outcome] = await store.submit_jobs([new_job(cached_result=RESULT)], T0, positions=True)
    job = outcome.job
    assert (job.status, job.cached, job.result, job.finished_at) == (
        JobStatus.COMPLETED,
        True,
        RESULT,
        T0,
    )
    stored = await store.get_job(job.id)
    assert stored is not None and stored.cached and stored.result == RESULT
    assert stored.status is JobStatus.COMPLETED and stored.attempts == 0
    assert await fetch(store) == []  # no node ever gets it
    assert (await store.stats())["m"] == {"completed": 1}
    assert await store.count_active("alice") == 0


async def test_cache_a_refreshed_answer_replaces_the_old_one(store: Store) -> None:
    [first] = await submit(store, new_job(cache_key="k"))
    await _complete(store, first, {"n": 1}, T0 + 1)
    [second] = await submit(store, new_job(cache_key="k", text="again"), now=T0 + 2)
    await _complete(store, second, {"n": 2}, T0 + 3)
    assert await store.cache_lookup(["k"], T0) == {"k": {"n": 2}}
    assert (await store.cache_summary()).entries == 1


async def test_cache_used_trim_and_clear(store: Store) -> None:
    ids = await submit(store, *[new_job(cache_key=f"k{i}", text=str(i)) for i in range(4)])
    for i, job_id in enumerate(ids):
        await _complete(store, job_id, {"answer": "x" * 100, "i": i}, T0 + i)
    size = (await store.cache_summary()).bytes // 4
    await store.cache_used({"k0": 3, "k1": 1}, T0 + 10)  # k0, k1 now the most recent
    assert (await store.cache_summary()).hits == 4
    # nothing made before T0: the size bound alone takes the least recently used (k2, k3)
    assert await store.cache_trim(T0 - 1, max_bytes=2 * size) == 2
    assert set(await store.cache_lookup([f"k{i}" for i in range(4)], 0.0)) == {"k0", "k1"}
    assert await store.cache_trim(T0 + 0.5, max_bytes=10 * size) == 1  # k0 made at T0
    assert set(await store.cache_lookup(["k0", "k1"], 0.0)) == {"k1"}
    assert await store.cache_clear("other-model") == 0
    assert await store.cache_clear() == 1
    assert await store.cache_summary() == CacheSummary(0, 0, 0)


async def test_cache_deleting_a_job_forgets_the_answer_it_made(store: Store) -> None:
    [kept, other] = await submit(store, new_job(cache_key="a"), new_job(cache_key="b", text="b"))
    await _complete(store, kept, RESULT, T0 + 1)
    await _complete(store, other, RESULT, T0 + 1)
    assert await store.delete_job(kept)
    assert set(await store.cache_lookup(["a", "b"], 0.0)) == {"b"}
    assert not await store.delete_job(kept)  # gone already
