#!/usr/bin/env python3
"""Fair share under a flood: three client keys on one model served by echo nodes with a
fixed per-job delay.

Key A floods ``--jobs`` jobs (bulk ``POST /v1/jobs`` of ``--chunk`` jobs at
``--flood-rate`` jobs/s, four times what the fleet drains; all at the same priority as
everyone's); keys B and C each submit one job a second (one ``POST /v1/jobs`` each, at
seeded random intervals of 0.5-1.5 s so that they do not beat in step with the fleet's
fixed delay). Each setting of ``fair_share`` (false: oldest first, the "before"; true:
the "after") gets a fresh server and fleet, in the same invocation, and three phases:

1. ``empty``: B and C alone for ``--seconds``: their wait on an idle fleet.
2. ``solo``: A's flood begins, B and C quiet, for ``--solo`` seconds: the fleet's
   throughput when A has it all.
3. ``flood``: B and C submit again for ``--seconds`` while A's backlog lasts.

Figures: B's and C's queue wait (``started_at - created_at``, read from the database:
the job object rounds them to seconds) and turnaround (``finished_at - created_at``),
p50 and p95, empty and under the flood; how many of A's jobs were claimed while a job
of B or C waited (``ahead``), and how long it waited for the fleet's next claim of
anything (``next claim``: the part of its wait no claim order can save); A's throughput
during the flood window against the fleet's (``solo``) minus what B and C took (goal:
>= 90 %), and how many of A's jobs were done by the window's end.

Behind a full fleet a newcomer waits at least until a slot frees: every ``delay /
slots`` seconds on average (1 / the fleet's throughput) if the slots free evenly. So A's
first ``nodes x concurrency`` jobs are queued one at a time, evenly over one delay, and
the rest of the flood is paced: a bulk insert of thousands holds the server for a moment,
the slots that free meanwhile are filled by one claim together, and with a fixed delay
they free together again every delay from then on. Such clumps still form from any
stall of the machine and never split again while every job takes the same time;
``--jitter-ms`` gives each job 0 to that many milliseconds more (echo's
``token_delay_ms`` over a random number of words), which lets them dissolve.

Run: ``python3 bench/bench_fair_share.py`` (about four minutes); ``--fair true`` for one
setting; ``--store postgres`` for PostgreSQL (``OBB_BENCH_POSTGRES_URL``, default
postgres@127.0.0.1:5432, trust auth; a database is created and dropped per run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from bench_nodes import Cluster  # this script's directory is on sys.path

MODEL = "echo"
JobTimes = tuple[float, float | None, float | None]  # created_at, started_at, finished_at


def admin_url() -> str:
    return os.environ.get("OBB_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ (the server, node and CLI processes inherit it) meanwhile."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def database(store: str) -> Iterator[dict[str, str]]:
    """The server environment for `store`: nothing for SQLite, a fresh PostgreSQL
    database (dropped afterwards) for postgres."""
    if store == "sqlite":
        yield {}
        return
    import asyncpg

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    name = "obb_fairbench_" + secrets.token_hex(4)
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield {
            "OPENBEEPBOOP_DATABASE_URL": urlunsplit(urlsplit(admin_url())._replace(path="/" + name))
        }
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Jobs:
    """Reads job timestamps straight from the server's database (the job object rounds
    them to whole seconds): SQLite read-only, or PostgreSQL."""

    def __init__(self, cluster: Cluster, env: dict[str, str]) -> None:
        self.url = env.get("OPENBEEPBOOP_DATABASE_URL")
        self.path = cluster.root / "server" / "openbeepboop.db"

    def _query(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self.url is None:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            ) as conn:
                return [tuple(r) for r in conn.execute(sql, args).fetchall()]
        import asyncpg

        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.url)
            try:
                numbered = sql
                for i in range(len(args)):
                    numbered = numbered.replace("?", f"${i + 1}", 1)
                return [tuple(r) for r in await conn.fetch(numbered, *args)]
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as thread:  # callers may run in an event loop
            return thread.submit(asyncio.run, run()).result()

    def times(self, ids: Sequence[str]) -> dict[str, JobTimes]:
        found: dict[str, JobTimes] = {}
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            marks = ",".join("?" * len(part))
            sql = f"SELECT id, created_at, started_at, finished_at FROM jobs WHERE id IN ({marks})"
            for row in self._query(sql, part):
                found[str(row[0])] = (float(row[1]), _opt(row[2]), _opt(row[3]))
        return found

    def finished(self, owner: str, since: float, until: float) -> int:
        sql = "SELECT count(*) FROM jobs WHERE owner = ? AND finished_at >= ? AND finished_at < ?"
        return int(self._query(sql, [owner, since, until])[0][0])

    def ahead(self, owner: str, created: float, started: float) -> int:
        """How many of `owner`'s jobs were claimed while a job queued at `created` waited."""
        sql = "SELECT count(*) FROM jobs WHERE owner = ? AND started_at > ? AND started_at < ?"
        return int(self._query(sql, [owner, created, started])[0][0])

    def next_claim(self, after: float) -> float:
        """When the fleet's first claim after `after` took its jobs."""
        return float(
            self._query("SELECT min(started_at) FROM jobs WHERE started_at >= ?", [after])[0][0]
        )


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass
class Key:
    """A client key, the ids of the jobs it submitted, and how long they take: each job's
    message has 0 to `jitter` words, each a millisecond of echo's `token_delay_ms`."""

    name: str
    secret: str
    id: str
    jitter: int = 0
    rng: random.Random = field(default_factory=random.Random)
    ids: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        words = self.rng.randint(0, self.jitter) if self.jitter else 1
        return {"model": MODEL, "messages": [{"role": "user", "content": " ".join("x" * words)}]}


def make_key(cluster: Cluster, name: str, args: argparse.Namespace) -> Key:
    """A client key made the way an admin makes one (`keys create`)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openbeepboop.cli.server",
            "keys",
            "create",
            "--role",
            "client",
            "--name",
            name,
            "--data-dir",
            str(cluster.root / "server"),
            "--json",
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    made = json.loads(out.stdout)
    rng = random.Random(f"{args.seed}/{name}")
    return Key(name, made["key"], made["id"], args.jitter_ms, rng)


async def submit(http: httpx.AsyncClient, key: Key, count: int) -> list[str]:
    r = await http.post(
        "/v1/jobs",
        json={"jobs": [{"body": key.body()} for _ in range(count)]},
        headers={"Authorization": f"Bearer {key.secret}"},
    )
    r.raise_for_status()
    return [str(j["id"]) for j in r.json()["data"]]


async def trickle(
    http: httpx.AsyncClient, key: Key, seconds: float, rng: random.Random
) -> list[str]:
    """One job at a time, about one a second (uniform 0.5-1.5 s apart), for `seconds`."""
    ids: list[str] = []
    end = time.monotonic() + seconds
    await asyncio.sleep(rng.uniform(0.0, 1.0))
    while time.monotonic() < end:
        ids += await submit(http, key, 1)
        await asyncio.sleep(rng.uniform(0.5, 1.5))
    return ids


async def ramp(http: httpx.AsyncClient, key: Key, args: argparse.Namespace) -> None:
    """A's first `nodes x concurrency` jobs, one at a time, evenly over one delay: each
    is claimed alone, so the slots start, and then free, one by one."""
    slots, delay = args.nodes * args.concurrency, args.delay_ms / 1000
    start = time.monotonic()
    for i in range(min(slots, args.jobs)):
        await asyncio.sleep(max(0.0, start + i * delay / slots - time.monotonic()))
        key.ids += await submit(http, key, 1)


async def flood(http: httpx.AsyncClient, key: Key, args: argparse.Namespace) -> None:
    """The rest of A's jobs in bulk requests of `--chunk`, at `--flood-rate` jobs/s (0:
    back to back)."""
    start, sent = time.monotonic(), len(key.ids)
    while len(key.ids) < args.jobs:
        if args.flood_rate:
            due = start + (len(key.ids) - sent) / args.flood_rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        key.ids += await submit(http, key, min(args.chunk, args.jobs - len(key.ids)))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def spread(values: Sequence[float]) -> dict[str, float]:
    """p50 and p95 in milliseconds."""
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p95_ms": float("nan")}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p95_ms": round(percentile(values, 95) * 1000, 1),
    }


def waits(
    jobs: Jobs, ids: Sequence[str], timeout: float, flooder: str = ""
) -> dict[str, dict[str, Any]]:
    """Wait and turnaround of `ids` once all finished (or `timeout` passed: the ones left
    count with what they waited so far, a lower bound). With `flooder`: how many of its
    jobs were claimed while each waited (`ahead`), and how long each waited for the
    fleet's next claim after it was queued (`next_claim`: what no claim order can save)."""
    deadline = time.monotonic() + timeout
    while True:
        found = jobs.times(ids)
        if all(t[2] is not None for t in found.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    now = time.time()
    wait = [(t[1] if t[1] is not None else now) - t[0] for t in found.values()]
    turn = [(t[2] if t[2] is not None else now) - t[0] for t in found.values()]
    unfinished = sum(1 for t in found.values() if t[2] is None)
    out: dict[str, dict[str, Any]] = {
        "wait": spread(wait),
        "turnaround": spread(turn),
        "unfinished": {"n": unfinished},
    }
    if flooder:
        started = [t for t in found.values() if t[1] is not None]
        ahead = [float(jobs.ahead(flooder, t[0], t[1] or 0.0)) for t in started]
        out["ahead"] = {"n": len(ahead), "p50": statistics.median(ahead), "max": max(ahead)}
        out["next_claim"] = spread([jobs.next_claim(t[0]) - t[0] for t in started])
    return out


def add_nodes(cluster: Cluster, args: argparse.Namespace) -> None:
    model = {
        "name": MODEL,
        "backend": "echo",
        "delay_ms": args.delay_ms,
        "concurrency": args.concurrency,
        "token_delay_ms": 1 if args.jitter_ms else 0,
    }
    for i in range(args.nodes):
        cluster.add_node(f"echo-{i}", [model])
    cluster.wait_for_model(MODEL, nodes=args.nodes)


async def phases(
    cluster: Cluster, jobs: Jobs, keys: dict[str, Key], args: argparse.Namespace
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    a, b, c = keys["A"], keys["B"], keys["C"]
    async with httpx.AsyncClient(base_url=cluster.url, timeout=600) as http:
        empty_b, empty_c = await asyncio.gather(
            trickle(http, b, args.seconds, rng), trickle(http, c, args.seconds, rng)
        )
        await asyncio.sleep(args.delay_ms / 1000 + 1)  # the last of them finish
        flood_start = time.time()
        await ramp(http, a, args)
        flooding = asyncio.create_task(flood(http, a, args))
        if not args.flood_rate:
            await flooding
        solo_from = time.time() + args.delay_ms / 1000  # every slot taken by then
        await asyncio.sleep(max(0.0, solo_from + args.solo - time.time()))
        window_from = time.time()
        flood_b, flood_c = await asyncio.gather(
            trickle(http, b, args.seconds, rng), trickle(http, c, args.seconds, rng)
        )
        window_to = time.time()
        await flooding
        submitted = time.time()
    solo = jobs.finished(a.id, solo_from, window_from) / (window_from - solo_from)
    took = jobs.finished(b.id, window_from, window_to) + jobs.finished(c.id, window_from, window_to)
    a_rate = jobs.finished(a.id, window_from, window_to) / (window_to - window_from)
    others = took / (window_to - window_from)
    a_done = jobs.finished(a.id, 0.0, window_to)
    result: dict[str, Any] = {
        "A_submit_seconds": round(submitted - flood_start, 2),
        "fleet_jobs_per_s_solo": round(solo, 1),
        "A_jobs_per_s_window": round(a_rate, 1),
        "BC_jobs_per_s_window": round(others, 2),
        "A_share_of_rest": round(a_rate / (solo - others), 3),
        "A_done_at_window_end": a_done,
        "A_backlog_at_window_end": args.jobs - a_done,
    }
    timeout = args.drain_timeout
    result["empty"] = waits(jobs, empty_b + empty_c, timeout)
    result["flood"] = waits(jobs, flood_b + flood_c, timeout, a.id)
    result["flood_B"] = waits(jobs, flood_b, 0)
    result["flood_C"] = waits(jobs, flood_c, 0)
    result["p95_wait_ratio"] = round(
        result["flood"]["wait"]["p95_ms"] / result["empty"]["wait"]["p95_ms"], 2
    )
    result["p95_turnaround_ratio"] = round(
        result["flood"]["turnaround"]["p95_ms"] / result["empty"]["turnaround"]["p95_ms"], 3
    )
    return result


def run(args: argparse.Namespace, fair: bool) -> dict[str, Any]:
    with database(args.store) as db_env, tempfile.TemporaryDirectory() as tmp:
        env = {
            **db_env,
            "OPENBEEPBOOP_FAIR_SHARE": "true" if fair else "false",
            "OPENBEEPBOOP_CACHE_POLICY": "off",
        }
        with environment(env):
            cluster = Cluster(Path(tmp))
            try:
                keys = {name: make_key(cluster, name, args) for name in "ABC"}
                add_nodes(cluster, args)
                result = asyncio.run(phases(cluster, Jobs(cluster, env), keys, args))
            finally:
                cluster.close()
    return {"fair_share": fair, **result}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "fair  | B+C wait p50/p95 ms: empty -> flood (x p95) | A claimed ahead p50 | "
        "next claim p95 ms | turnaround p95 ms: empty -> flood | A jobs/s vs fleet-B-C | A done",
    ]
    for r in results:
        e, f = r["empty"], r["flood"]
        lines.append(
            f"{str(r['fair_share']).lower():5} | "
            f"{e['wait']['p50_ms']}/{e['wait']['p95_ms']} -> "
            f"{f['wait']['p50_ms']}/{f['wait']['p95_ms']} (x{r['p95_wait_ratio']}) | "
            f"{f['ahead']['p50']:g} | {f['next_claim']['p95_ms']} | "
            f"{e['turnaround']['p95_ms']} -> {f['turnaround']['p95_ms']} | "
            f"{r['A_jobs_per_s_window']} vs {r['fleet_jobs_per_s_solo']}-"
            f"{r['BC_jobs_per_s_window']} ({r['A_share_of_rest']:.1%}) | "
            f"{r['A_done_at_window_end']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="A's flood")
    parser.add_argument("--seconds", type=float, default=30, help="B's and C's window, per phase")
    parser.add_argument("--chunk", type=int, default=100, help="A's jobs per bulk submit")
    parser.add_argument(
        "--flood-rate", type=float, default=1000, help="A's jobs/s after the ramp (0: at once)"
    )
    parser.add_argument("--solo", type=float, default=5, help="A alone: the fleet's throughput")
    parser.add_argument("--nodes", type=int, default=2, help="echo node processes")
    parser.add_argument("--concurrency", type=int, default=128, help="slots per node")
    parser.add_argument("--delay-ms", type=float, default=1000, help="each job's echo delay")
    parser.add_argument(
        "--jitter-ms", type=int, default=0, help="each job also takes 0 to this many ms"
    )
    parser.add_argument("--fair", choices=["both", "false", "true"], default="both")
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--drain-timeout", type=float, default=120, help="for B's and C's jobs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    settings = {"both": [False, True], "false": [False], "true": [True]}[args.fair]
    results = [run(args, fair) for fair in settings]
    setup = {k: v for k, v in vars(args).items() if k != "json_out"}
    print(table(results))
    if args.json_out:
        args.json_out.write_text(json.dumps({"setup": setup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
