#!/usr/bin/env python3
"""Claim cost against queue length: one job per claim with 100 and with 100,000 queued
jobs from 50 keys, in the same run, on SQLite and on PostgreSQL, with the fair claim
(``fair=True``) and oldest first (``fair=False``).

Through the store (no HTTP): a real SQLite file and a real PostgreSQL database (created
and dropped here), each holding two models, ``short`` (``--short`` queued jobs) and
``long`` (``--long``), spread evenly over ``--keys`` client keys (made as an admin makes
them). The long queue is written with the store's bulk ``submit_jobs``. Only the claims
are timed (``fetch_jobs(..., max_jobs=1)``, as a node with one free slot asks); after
each, the claimed job is replaced by a new one of the same key (the submits are timed
apart), and the claimed jobs are completed every ``BLOCK`` claims, untimed, so that both
queues keep their length and no running jobs pile up. The four kinds (fair or not,
short or long) take turns every ``BLOCK`` claims, so that the machine's noise falls on
all alike; a repetition is ``--calls`` claims of each, the figure the median claims/s of
``--reps`` repetitions, and the ratio long / short (goal: >= 0.9).

``--via http`` (or ``both``) measures through a real server too: ``POST
/internal/queue/fetch`` with ``max_jobs`` 1 and no wait, as a node with one free slot,
on SQLite; the queues are written before the server starts, each repetition starts it
with ``fair_share`` false, then true, on the same database; claimed jobs are replaced
through ``POST /v1/jobs`` (the keys in turn) and completed through the node protocol.

Run: ``python3 bench/bench_claim_cost.py`` (about a minute; ``--via both``: under two);
``--store sqlite`` for SQLite alone. PostgreSQL at ``OBB_BENCH_POSTGRES_URL`` (default
postgres@127.0.0.1:5432, trust auth).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import bench_queue as bq  # the server process and a lean HTTP client (a sibling script)
from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.keys import IssuedKey
from openbeepboop.server.models import NewJob, NodeResult, Role
from openbeepboop.server.store.base import Store

CHUNK = 5000  # jobs per bulk submit while filling
BLOCK = 25  # claims in a row of one kind (fair or not, short or long queue)
RESULT = {"object": "chat.completion", "choices": []}
LEASE = 600.0
DB_FILE = "openbeepboop.db"  # the server's name for its SQLite file
Config = tuple[bool, str]  # (fair, model)
CONFIGS: list[Config] = [(fair, model) for fair in (False, True) for model in ("short", "long")]


def admin_url() -> str:
    return os.environ.get("OBB_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def new_job(owner: str, model: str) -> NewJob:
    return NewJob(
        owner=owner,
        endpoint="/v1/chat/completions",
        model=model,
        request={"model": model, "messages": [{"role": "user", "content": "x"}]},
        request_hash="bench",
    )


@contextlib.asynccontextmanager
async def opened(kind: str, root: Path) -> AsyncIterator[Store]:
    """A migrated store: the SQLite file in `root`, or a new PostgreSQL database dropped
    on the way out."""
    if kind == "sqlite":
        from openbeepboop.server.store.sqlite import SqliteStore

        store: Store = SqliteStore(root / DB_FILE)
        await store.open()
        try:
            yield store
        finally:
            await store.close()
        return
    import asyncpg

    from openbeepboop.server.store.postgres import PostgresStore

    name = "obb_claimbench_" + secrets.token_hex(4)
    admin = await asyncpg.connect(admin_url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        store = PostgresStore(urlunsplit(urlsplit(admin_url())._replace(path="/" + name)))
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def make_keys(store: Store, count: int) -> list[IssuedKey]:
    ring = KeyRing(store)
    return [await ring.create(Role.CLIENT, f"bench-{i}") for i in range(count)]


async def fill(store: Store, model: str, owners: list[str], count: int) -> float:
    """Queue `count` jobs of `model`, the owners in turn, in bulk; the seconds it took."""
    started = time.perf_counter()
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        jobs = [new_job(owners[(start + i) % len(owners)], model) for i in range(n)]
        await store.submit_jobs(jobs, time.time())
    return time.perf_counter() - started


class Side(Protocol):
    """What a measurement claims through: the store itself, or a server over HTTP."""

    async def claim(self, model: str, fair: bool) -> list[Any]:
        """Claim one job of `model` (the jobs claimed; `fair` where the side chooses)."""

    async def replace(self, model: str, claimed: list[Any]) -> None:
        """Queue as many new jobs of `model` as were claimed."""

    async def complete(self, claimed: list[Any]) -> None:
        """Complete claimed jobs."""


class StoreSide:
    """Claims with the store's `fetch_jobs`; each claimed job is replaced by a new one of
    the same key."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def claim(self, model: str, fair: bool) -> list[Any]:
        return await self.store.fetch_jobs("bench-node", [model], 1, LEASE, time.time(), fair=fair)

    async def replace(self, model: str, claimed: list[Any]) -> None:
        await self.store.submit_jobs([new_job(j.owner, model) for j in claimed], time.time(), False)

    async def complete(self, claimed: list[Any]) -> None:
        results = [NodeResult(j.id, j.lease_id, result=RESULT) for j in claimed]
        await self.store.submit_results(results, time.time())


class HttpSide:
    """Claims as a node with one free slot (`POST /internal/queue/fetch`, `max_jobs` 1,
    no wait); replaces through `POST /v1/jobs`, the keys in turn; completes through
    `/internal/queue/submit`. Its `fair` is the server's setting."""

    def __init__(
        self, node: bq.RawHttp, client: bq.RawHttp, node_key: str, node_id: str, secrets: list[str]
    ) -> None:
        self.node, self.client = node, client
        self.node_headers = bq._headers(node_key)
        self.node_id = node_id
        self.clients = itertools.cycle([bq._headers(s) for s in secrets])

    async def claim(self, model: str, fair: bool) -> list[Any]:
        body = {"node_id": self.node_id, "models": [model], "max_jobs": 1, "wait": 0}
        jobs: list[Any] = (await self.node.post("/internal/queue/fetch", self.node_headers, body))[
            "jobs"
        ]
        return jobs

    async def replace(self, model: str, claimed: list[Any]) -> None:
        body = {"jobs": [{"body": new_job("", model).request} for _ in claimed]}
        await self.client.post("/v1/jobs", next(self.clients), body, ok=202)

    async def complete(self, claimed: list[Any]) -> None:
        results = [
            {"job_id": j["id"], "lease_id": j["lease_id"], "result": RESULT} for j in claimed
        ]
        body = {"node_id": self.node_id, "results": results}
        await self.node.post("/internal/queue/submit", self.node_headers, body)


async def measure(side: Side, model: str, fair: bool, calls: int) -> tuple[float, float]:
    """Seconds spent in `calls` one-job claims, and in the submits that replace each
    claimed job at once (the queue keeps its length); all are completed at the end,
    untimed."""
    claiming = replacing = 0.0
    claimed: list[Any] = []
    for _ in range(calls):
        started = time.perf_counter()
        jobs = await side.claim(model, fair)
        claiming += time.perf_counter() - started
        if not jobs:
            raise RuntimeError(f"the {model} queue ran dry")
        claimed += jobs
        started = time.perf_counter()
        await side.replace(model, jobs)
        replacing += time.perf_counter() - started
    await side.complete(claimed)
    return claiming, replacing


Rates = dict[Config, list[tuple[float, float]]]  # per config: (claims/s, submits/s) per rep


async def interleaved(
    side: Side, configs: list[Config], calls: int
) -> dict[Config, tuple[float, float]]:
    """Claims/s (and replacing submits/s) of each config over `calls` claims each, the
    configs taking turns every `BLOCK` claims, so that a noisy second of the machine hits
    them all alike."""
    blocks = max(1, calls // BLOCK)
    spent = {c: (0.0, 0.0) for c in configs}
    for _ in range(blocks):
        for fair, model in configs:
            claiming, replacing = await measure(side, model, fair, BLOCK)
            before = spent[fair, model]
            spent[fair, model] = (before[0] + claiming, before[1] + replacing)
    n = blocks * BLOCK
    return {c: (n / spent[c][0], n / spent[c][1]) for c in configs}


def summary(rates: Rates) -> dict[str, Any]:
    """Per claim kind: median claims/s of the short and the long queue, their ratio; and
    the same of the submits that replaced the claimed jobs."""
    out: dict[str, Any] = {}
    for fair in (False, True):
        short = [r[0] for r in rates[fair, "short"]]
        long = [r[0] for r in rates[fair, "long"]]
        submit_short = statistics.median(r[1] for r in rates[fair, "short"])
        submit_long = statistics.median(r[1] for r in rates[fair, "long"])
        out["fair" if fair else "oldest_first"] = {
            "short_per_s": round(statistics.median(short)),
            "long_per_s": round(statistics.median(long)),
            "ratio": round(statistics.median(long) / statistics.median(short), 3),
            "ratio_per_rep": [round(lo / sh, 3) for sh, lo in zip(short, long, strict=True)],
            "short_all": [round(r) for r in short],
            "long_all": [round(r) for r in long],
            "submit_short_per_s": round(submit_short),
            "submit_long_per_s": round(submit_long),
            "submit_ratio": round(submit_long / submit_short, 3),
        }
    return out


async def bench_store(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Through the store: the four configs interleaved in every repetition."""
    with tempfile.TemporaryDirectory() as tmp:
        async with opened(kind, Path(tmp)) as store:
            owners = [k.record.id for k in await make_keys(store, args.keys)]
            fill_seconds = await fill(store, "long", owners, args.long)
            await fill(store, "short", owners, args.short)
            side = StoreSide(store)
            await interleaved(side, CONFIGS, BLOCK)  # warm-up
            rates: Rates = {c: [] for c in CONFIGS}
            for _ in range(args.reps):
                for c, rate in (await interleaved(side, CONFIGS, args.calls)).items():
                    rates[c].append(rate)
    return {"store": kind, "via": "store", "fill_seconds": round(fill_seconds, 1), **summary(rates)}


async def bench_http(args: argparse.Namespace) -> dict[str, Any]:
    """Through a real server on SQLite: the queues are written before it starts; each
    repetition starts it with `fair_share` false, then true, on the same database."""
    with tempfile.TemporaryDirectory() as tmp:
        server = bq.Server(Path(tmp) / "server", bq._free_port())
        await asyncio.to_thread(server.setup)
        async with opened("sqlite", server.data_dir) as store:
            made = await make_keys(store, args.keys)
            owners = [k.record.id for k in made]
            fill_seconds = await fill(store, "long", owners, args.long)
            await fill(store, "short", owners, args.short)
        rates: Rates = {c: [] for c in CONFIGS}
        for rep in range(args.reps + 1):  # the first: a warm-up, not counted
            for fair in (False, True):
                server.env = {"OPENBEEPBOOP_FAIR_SHARE": str(fair).lower()}
                await asyncio.to_thread(server.start)
                try:
                    node_id = await bq.register_node(server.url, server.keys["node_key"], "bench")
                    node, client = (
                        await bq.RawHttp.open(server.url),
                        await bq.RawHttp.open(server.url),
                    )
                    side = HttpSide(
                        node, client, server.keys["node_key"], node_id, [k.secret for k in made]
                    )
                    configs = [(fair, "short"), (fair, "long")]
                    measured = await interleaved(side, configs, args.calls if rep else BLOCK)
                    await node.close()
                    await client.close()
                finally:
                    await asyncio.to_thread(server.stop)
                if rep:
                    for c, rate in measured.items():
                        rates[c].append(rate)
    return {
        "store": "sqlite",
        "via": "http",
        "fill_seconds": round(fill_seconds, 1),
        **summary(rates),
    }


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"claims/s, one job per claim, median of {args.reps} x {args.calls} "
        f"({args.short:,} vs {args.long:,} queued from {args.keys} keys)",
        "store    | via   | claim        | short | long  | long/short | replacing submits/s "
        "short -> long",
    ]
    for row in rows:
        for name in ("oldest_first", "fair"):
            r = row[name]
            lines.append(
                f"{row['store']:8} | {row['via']:5} | {name:12} | {r['short_per_s']:5} | "
                f"{r['long_per_s']:5} | {r['ratio']:10} | {r['submit_short_per_s']} -> "
                f"{r['submit_long_per_s']} ({r['submit_ratio']})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["both", "sqlite", "postgres"], default="both")
    parser.add_argument("--via", choices=["store", "http", "both"], default="store")
    parser.add_argument("--short", type=int, default=100, help="jobs queued in the short queue")
    parser.add_argument("--long", type=int, default=100_000, help="jobs queued in the long queue")
    parser.add_argument("--keys", type=int, default=50, help="client keys owning them")
    parser.add_argument("--calls", type=int, default=500, help="claims per measurement")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (the median is kept)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    rows: list[dict[str, Any]] = []
    if args.via in ("store", "both"):
        rows += [asyncio.run(bench_store(kind, args)) for kind in kinds]
    if args.via in ("http", "both"):
        rows.append(asyncio.run(bench_http(args)))
    print(table(rows, args))
    if args.json_out:
        args.json_out.write_text(
            json.dumps({"setup": vars(args) | {"json_out": None}, "results": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
