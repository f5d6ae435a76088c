"""The store's `add_counters` verb (quotas: core/quotas.py), on every store, with the
contract fixtures of tests/test_store_contract.py."""

from __future__ import annotations

import asyncio

from openbeepboop.server.store.base import Store
from tests.test_store_contract import T0, store  # noqa: F401 (the fixture)

JOBS, TOKENS = "quota:jobs:lab", "quota:tokens:lab"


async def test_add_counters_add_per_window(store: Store) -> None:  # noqa: F811
    assert await store.add_counters({JOBS: (T0, 3), TOKENS: (T0, 0)}) == {
        JOBS: (3, T0),
        TOKENS: (0, T0),
    }
    assert await store.add_counters({JOBS: (T0, 2)}) == {JOBS: (5, T0)}
    assert await store.add_counters({JOBS: (T0, -4)}) == {JOBS: (1, T0)}  # taken back
    assert await store.add_counters({JOBS: (T0, -9)}) == {JOBS: (0, T0)}  # never below 0
    assert await store.add_counters({TOKENS: (T0, 1200)}) == {TOKENS: (1200, T0)}
    # a later window starts over at the amount
    assert await store.add_counters({JOBS: (T0 + 3600, 7)}) == {JOBS: (7, T0 + 3600)}
    # an amount stamped with an earlier window is dropped: that window is over
    assert await store.add_counters({JOBS: (T0, -7)}) == {JOBS: (7, T0 + 3600)}
    assert await store.add_counters({JOBS: (T0, 5)}) == {JOBS: (7, T0 + 3600)}
    assert await store.add_counters({}) == {}


async def test_add_counters_share_the_table_with_hit_counters_by_name(
    store: Store,  # noqa: F811
) -> None:
    assert await store.hit_counters({"k1/50/1/second": T0}) == {"k1/50/1/second": (1, T0)}
    assert await store.add_counters({JOBS: (T0, 2)}) == {JOBS: (2, T0)}
    assert await store.hit_counters({"k1/50/1/second": T0}) == {"k1/50/1/second": (2, T0)}


async def test_add_counters_are_atomic_under_concurrency(store: Store) -> None:  # noqa: F811
    amounts = {JOBS: (T0, 2), TOKENS: (T0, 5)}
    counts = await asyncio.gather(*(store.add_counters(amounts) for _ in range(30)))
    assert sorted(c[JOBS][0] for c in counts) == list(range(2, 61, 2))
    assert sorted(c[TOKENS][0] for c in counts) == list(range(5, 151, 5))
