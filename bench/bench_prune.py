#!/usr/bin/env python3
"""Retention under load: 100,000 finished jobs older than the setting are pruned by the
server's background pruner while clients and a node keep the queue busy.

What it measures, against a real `openbeepboop-server start` (SQLite, the default
durable mode):

1. The history: ``--history`` (100,000) jobs submitted, run and completed 40 days ago,
   written straight into the database before the server starts (with a result of
   ``--result-bytes`` each, so that they take room as real results do).
2. ``before``: the server with the pruner off (``prune_interval_seconds=0``); rounds of
   ``--round-jobs`` single jobs (one job per submit call, one per fetch; the harness of
   bench_queue.py), jobs/s per round.
3. ``during``: the server restarted with the pruner on (its first pass
   ``--prune-after`` seconds after start); the same rounds run back to back while a
   reader watches how many old jobs are left. Rounds that lie mostly inside the pruning
   window count as ``during``; rounds after it as ``after``.
4. The database before and after: file size, pages, free pages (the file shrinks: new
   databases use ``auto_vacuum=INCREMENTAL`` and the pruner gives pages back).

Figure of merit: median jobs/s ``during`` pruning against the median of ``before`` and
``after`` (goal: within 10 %). The machine is shared and noisy: compare medians, and
see the spread printed beside them.

Run: ``python3 bench/bench_prune.py`` (about two minutes); ``--json-out FILE`` keeps
every figure. Exits 1 when the goal is missed or a round loses a job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bench_queue as bq  # the harness: a sibling script (this directory is on sys.path)
from openbeepboop.server.models import NewJob, NodeResult
from openbeepboop.server.store.sqlite import SqliteStore

DAY = 86_400.0
CHUNK = 5000


async def write_history(path: Path, count: int, result_bytes: int) -> float:
    """`count` completed jobs, finished 40 days ago; returns the seconds it took."""
    started = time.monotonic()
    then = time.time() - 40 * DAY
    result = {**bq.RESULT, "padding": "x" * result_bytes}
    store = SqliteStore(path)
    await store.open()
    try:
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            jobs = [
                NewJob(
                    owner="history",
                    endpoint="/v1/chat/completions",
                    model="old-model",
                    request=bq._chat(start + i),
                    request_hash="h",
                )
                for i in range(n)
            ]
            await store.submit_jobs(jobs, then)
            leased = await store.fetch_jobs("old-node", ["old-model"], n, 60.0, then)
            results = [NodeResult(j.id, j.lease_id, result=result) for j in leased]
            await store.submit_results(results, then + 1)
    finally:
        await store.close()
    return time.monotonic() - started


def db_figures(path: Path) -> dict[str, int]:
    """Size on disk (with the WAL) and page counts of a SQLite database."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        vacuum = db.execute("PRAGMA auto_vacuum").fetchone()[0]
    wal = path.with_name(path.name + "-wal")
    return {
        "file_bytes": path.stat().st_size,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        "pages": pages,
        "free_pages": free,
        "page_size": page_size,
        "auto_vacuum": vacuum,
    }


class Watcher:
    """Counts the old jobs left, every `every` seconds, on a read-only connection; keeps
    when the count first fell and when it reached zero."""

    def __init__(self, path: Path, every: float = 0.5) -> None:
        self.path, self.every = path, every
        self.first: int | None = None
        self.began: float | None = None
        self.ended: float | None = None
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        cutoff = time.time() - 30 * DAY  # an index range (jobs_finished), not a scan
        sql = f"SELECT count(*) FROM jobs WHERE status = 'completed' AND finished_at < {cutoff}"
        try:
            while not self._stop.is_set():
                left = db.execute(sql).fetchone()[0]
                now = time.monotonic()
                self.samples.append((now, left))
                if self.first is None:
                    self.first = left
                elif self.began is None and left < self.first:
                    self.began = self.samples[-2][0]
                if self.began is not None and left == 0 and self.ended is None:
                    self.ended = now
                time.sleep(self.every)
        finally:
            db.close()

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def one_round(server: bq.Server, node_id: str, jobs: int) -> dict[str, Any]:
    load = bq.Load(
        url=server.url,
        client_key=server.keys["client_key"],
        node_key=server.keys["node_key"],
        node_id=node_id,
        jobs=jobs,
        batched=False,
        client_concurrency=32,
        node_concurrency=16,
        submit_batch=1,
        fetch_batch=1,
    )
    began, mark, cpu = time.monotonic(), bq.Mark(), server.cpu_seconds()
    out = bq.run_throughput(load, 2)
    out["began"], out["ended"] = began, time.monotonic()
    out["server_cpu_s"] = server.cpu_seconds() - cpu
    out["machine"] = mark.since()
    return out


def rounds_while(
    server: bq.Server, node_id: str, jobs: int, more: Any, limit: int = 200
) -> list[dict[str, Any]]:
    got = []
    while more(got) and len(got) < limit:
        got.append(one_round(server, node_id, jobs))
        r = got[-1]
        print(
            f"  round {len(got)}: {r['jobs_per_s']:.0f} jobs/s, server CPU "
            f"{r['server_cpu_s']:.1f} s, CPU pressure {r['machine']['cpu_pressure_pct']:.0f} %",
            flush=True,
        )
    return got


def overlap(r: dict[str, Any], began: float, ended: float) -> float:
    """The share of round `r` that lies inside [began, ended]."""
    inside = min(r["ended"], ended) - max(r["began"], began)
    return max(0.0, inside) / (r["ended"] - r["began"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=100_000, help="old finished jobs")
    parser.add_argument("--result-bytes", type=int, default=1000, help="padding per result")
    parser.add_argument("--round-jobs", type=int, default=1500, help="jobs per measured round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds before pruning")
    parser.add_argument("--prune-after", type=float, default=4.0, help="first pass, s")
    parser.add_argument("--batch-rows", type=int, default=500, help="prune_batch_rows")
    parser.add_argument("--share", type=float, default=0.1, help="prune_share")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="obb-bench-prune-"))
    server = bq.Server(root / "data", bq._free_port())
    report: dict[str, Any] = {"history": args.history, "round_jobs": args.round_jobs}
    report.update(share=args.share, batch_rows=args.batch_rows)
    try:
        server.setup()
        db = server.data_dir / "openbeepboop.db"
        print(f"writing {args.history} finished jobs, 40 days old ...", flush=True)
        report["history_write_s"] = asyncio.run(write_history(db, args.history, args.result_bytes))
        report["db_before"] = db_figures(db)
        print(f"database: {report['db_before']}", flush=True)

        server.env = {"OPENBEEPBOOP_PRUNE_INTERVAL_SECONDS": "0"}
        server.start()
        node_id = asyncio.run(bq.register_node(server.url, server.keys["node_key"], "bench"))
        print("before (pruner off):", flush=True)
        one_round(server, node_id, args.round_jobs)  # warm-up
        before = rounds_while(server, node_id, args.round_jobs, lambda g: len(g) < args.rounds)
        server.stop()

        server.env = {
            "OPENBEEPBOOP_PRUNE_INTERVAL_SECONDS": str(args.prune_after),
            "OPENBEEPBOOP_PRUNE_BATCH_ROWS": str(args.batch_rows),
            "OPENBEEPBOOP_PRUNE_SHARE": str(args.share),
        }
        server.start()
        node_id = asyncio.run(bq.register_node(server.url, server.keys["node_key"], "bench"))
        print("during pruning, then after:", flush=True)
        with Watcher(db) as watch:
            tail = [0]

            def more(got: list[dict[str, Any]]) -> bool:
                if watch.ended is None:
                    return True
                tail[0] += got[-1]["began"] > watch.ended if got else 0
                return tail[0] < args.rounds

            rounds = rounds_while(server, node_id, args.round_jobs, more)
        server.stop()
        report["db_after"] = db_figures(db)
        if watch.began is None or watch.ended is None:
            print("the pruner did not finish", file=sys.stderr)
            return 1
        report["prune_seconds"] = watch.ended - watch.began
        report["pruned"] = watch.first
        during = [r for r in rounds if overlap(r, watch.began, watch.ended) >= 0.5]
        after = [r for r in rounds if r["began"] >= watch.ended]
        report["rounds"] = {"before": before, "during": during, "after": after}
        ok = all(r["complete"] for r in [*before, *rounds])
        rates = {k: [r["jobs_per_s"] for r in v] for k, v in report["rounds"].items()}
        base = statistics.median(rates["before"] + rates["after"])
        during_rate = statistics.median(rates["during"]) if rates["during"] else float("nan")
        report["jobs_per_s"] = {k: statistics.median(v) for k, v in rates.items() if v}
        report["ratio"] = during_rate / base
        print_summary(report, rates)
        ok = ok and bool(rates["during"]) and report["ratio"] >= 0.9
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2, default=str))
        return 0 if ok else 1
    finally:
        server.stop()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_summary(report: dict[str, Any], rates: dict[str, list[float]]) -> None:
    b, a = report["db_before"], report["db_after"]
    print()
    print(f"pruned {report['pruned']} jobs in {report['prune_seconds']:.1f} s")
    for name, values in rates.items():
        spread = ", ".join(f"{v:.0f}" for v in values)
        med = statistics.median(values) if values else float("nan")
        print(f"  {name:<7} median {med:7.0f} jobs/s  ({len(values)} rounds: {spread})")
    print(f"  during / (before and after): {report['ratio']:.3f}")
    mib = 1 << 20
    print(
        f"database file {b['file_bytes'] / mib:.1f} MiB -> {a['file_bytes'] / mib:.1f} MiB; "
        f"pages {b['pages']} -> {a['pages']}; free pages {b['free_pages']} -> "
        f"{a['free_pages']} (auto_vacuum={a['auto_vacuum']})"
    )


if __name__ == "__main__":
    sys.exit(main())
