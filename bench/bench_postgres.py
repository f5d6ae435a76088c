#!/usr/bin/env python3
"""Queue throughput on PostgreSQL with one and two server replicas, against SQLite.

The harness is bench_queue.py's, unchanged: the same load generator processes (clients
and node workers on minimal keep-alive HTTP), the same scenarios, the same checks that
every job was accepted exactly once. What differs is the store:

- ``sqlite x1``: one server, SQLite (WAL, ``synchronous=FULL``, group commit);
- ``postgres x1``: one server on a fresh PostgreSQL database;
- ``postgres x2``: two server processes on that database; client connection i and node
  worker i go to replica i % 2, so every job is typically submitted through one replica
  and fetched, then answered, through either. Dispatch latency here is measured across
  replicas: the node's long-poll waits on replica 0, the submit goes to replica 1 (the
  wake-up travels by LISTEN/NOTIFY).

Besides jobs/s it reports the CPU the servers and PostgreSQL spent per job (from /proc).
On a machine with few cores the load generator, the replicas and PostgreSQL share them:
read the CPU per job as well as the rate.

Run: ``python3 bench/bench_postgres.py`` (PostgreSQL at OBB_BENCH_POSTGRES_URL, default
postgres@127.0.0.1:5432 with trust auth; a database ``obb_bench_<random>`` is created
and dropped per configuration). ``--json-out FILE`` keeps every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import bench_queue as bq  # the harness: a sibling script (this directory is on sys.path)


def admin_url() -> str:
    return os.environ.get("OBB_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


CONFIGS = (("sqlite", 1), ("postgres", 1), ("postgres", 2))


def _postgres_cpu_seconds() -> float:
    """User + system CPU seconds of every PostgreSQL process on this machine."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name.startswith("postgres"):
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(admin_url())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def _database(kind: str) -> Iterator[dict[str, str]]:
    """The server environment of one configuration (a fresh PostgreSQL database)."""
    if kind == "sqlite":
        yield {}
        return
    name = "obb_bench_" + secrets.token_hex(4)
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        url = urlunsplit(urlsplit(admin_url())._replace(path="/" + name))
        yield {"OPENBEEPBOOP_DATABASE_URL": url}
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def _replicas(kind: str, count: int, root: Path) -> Iterator[list[bq.Server]]:
    with _database(kind) as env:
        servers = [bq.Server(root / f"replica{i}", bq._free_port(), env=env) for i in range(count)]
        try:
            servers[0].setup()
            for server in servers:
                server.data_dir.mkdir(parents=True, exist_ok=True)
                server.keys = servers[0].keys
                server.start()
            yield servers
        finally:
            for server in servers:
                server.stop()


def _throughput(
    servers: list[bq.Server], node_id: str, args: argparse.Namespace, batched: bool
) -> dict[str, Any]:
    jobs = args.batched_jobs if batched else args.single_jobs
    keys = servers[0].keys

    def load(n: int) -> bq.Load:
        return bq.Load(
            url=servers[0].url,
            urls=tuple(s.url for s in servers),
            client_key=keys["client_key"],
            node_key=keys["node_key"],
            node_id=node_id,
            jobs=n,
            batched=batched,
            client_concurrency=args.batch_clients if batched else args.clients,
            node_concurrency=args.batch_workers if batched else args.workers,
            submit_batch=args.submit_batch,
            fetch_batch=args.fetch_batch,
        )

    bq.run_throughput(load(max(1, jobs // 10)), 2)  # warm-up
    runs = []
    for _ in range(args.reps):
        bq._wait_quiet(args.quiet_wait)
        cpu0 = sum(s.cpu_seconds() for s in servers)
        pg0 = _postgres_cpu_seconds()
        run = bq.run_throughput(load(jobs), 2)
        accepted = max(1, run["accepted"])
        run["servers_cpu_ms_per_job"] = (
            1000 * (sum(s.cpu_seconds() for s in servers) - cpu0) / accepted
        )
        run["postgres_cpu_ms_per_job"] = 1000 * (_postgres_cpu_seconds() - pg0) / accepted
        runs.append(run)
        print(
            f"    {'batched' if batched else 'single '}: {run['jobs_per_s']:8,.0f} jobs/s "
            f"({run['accepted']}/{jobs}; servers {run['servers_cpu_ms_per_job']:.2f} ms CPU/job, "
            f"postgres {run['postgres_cpu_ms_per_job']:.2f})",
            flush=True,
        )
    rates = [r["jobs_per_s"] for r in runs]
    return {
        "median_jobs_per_s": statistics.median(rates),
        "min_jobs_per_s": min(rates),
        "max_jobs_per_s": max(rates),
        "servers_cpu_ms_per_job": statistics.median(r["servers_cpu_ms_per_job"] for r in runs),
        "postgres_cpu_ms_per_job": statistics.median(r["postgres_cpu_ms_per_job"] for r in runs),
        "complete": all(r["complete"] for r in runs),
        "runs": runs,
    }


def run_config(kind: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="obb-bench-pg-"))
    try:
        with _replicas(kind, count, root) as servers:
            keys = servers[0].keys
            node_id = asyncio.run(bq.register_node(servers[0].url, keys["node_key"], "bench"))
            out: dict[str, Any] = {}
            for scenario in args.only:
                if scenario in ("single", "batched"):
                    out[scenario] = _throughput(servers, node_id, args, scenario == "batched")
            if "latency" in args.only:
                out["latency"] = bq._run_loop(
                    bq.run_latency(
                        servers[0].url,
                        keys["client_key"],
                        keys["node_key"],
                        node_id,
                        args.latency_samples,
                        args.settle_ms / 1000,
                        client_url=servers[-1].url,
                    )
                )
            return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print("\n| store | replicas | one job per call | batched | dispatch latency p50 / p99 |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        kind, count = name.split(" x")
        cells = []
        for scenario in ("single", "batched"):
            s = r.get(scenario)
            cells.append(
                "-"
                if s is None
                else f"{s['median_jobs_per_s']:,.0f} jobs/s ({s['min_jobs_per_s']:,.0f}-"
                f"{s['max_jobs_per_s']:,.0f}); {s['servers_cpu_ms_per_job']:.2f} + "
                f"{s['postgres_cpu_ms_per_job']:.2f} ms CPU/job"
                + ("" if s["complete"] else " INCOMPLETE")
            )
        lat = r.get("latency")
        cells.append("-" if lat is None else f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} ms")
        print(f"| {kind} | {count} | " + " | ".join(cells) + " |")
    print("\n(CPU/job: server processes + PostgreSQL processes, medians)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--only", default="single,batched,latency", help="scenarios, comma-separated")
    p.add_argument("--configs", default="sqlite x1,postgres x1,postgres x2", help="which setups")
    p.add_argument("--reps", type=int, default=3, help="measured runs per scenario [3]")
    p.add_argument("--quiet-wait", type=float, default=10, help="wait for a quiet machine [10 s]")
    p.add_argument("--single-jobs", type=int, default=4000, help="jobs per single run [4000]")
    p.add_argument("--batched-jobs", type=int, default=30000, help="jobs per batched run")
    p.add_argument("--clients", type=int, default=32, help="client connections [32]")
    p.add_argument("--workers", type=int, default=32, help="node worker connections [32]")
    p.add_argument("--submit-batch", type=int, default=1000, help="jobs per bulk submit")
    p.add_argument("--fetch-batch", type=int, default=500, help="max_jobs per batched fetch")
    p.add_argument("--batch-clients", type=int, default=2, help="bulk submitters [2]")
    p.add_argument("--batch-workers", type=int, default=4, help="batched node workers [4]")
    p.add_argument("--latency-samples", type=int, default=300, help="latency repetitions")
    p.add_argument("--settle-ms", type=float, default=15, help="fetch head start [15 ms]")
    p.add_argument("--json-out", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    started = time.strftime("%Y-%m-%d %H:%M")
    for name in args.configs:
        kind, count = name.split(" x")
        print(f"{name}:", flush=True)
        results[name] = run_config(kind, int(count), args)
    print_table(results)
    print(f"({started}, {os.cpu_count()} CPUs, load average now {os.getloadavg()[0]:.2f})")
    if args.json_out:
        args.json_out.write_text(json.dumps({"started": started, "results": results}, indent=2))
    ok = all(s.get("complete", True) for r in results.values() for s in r.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
