#!/usr/bin/env python3
"""Position and ETA: how close a queued job's `estimated_start_at` comes to its start.

A server and `--nodes` echo node processes (each `--concurrency` slots, every job taking
`--delay-ms`) drain a queue of `--jobs` jobs at a steady rate. First `--warmup` jobs run
(bulk-submitted), so that the model's pace is measured; then the jobs are submitted one
at a time, asynchronously: each 202 answer carries the job's estimate. While they drain,
every `--sample-every` seconds `GET /v1/jobs/{id}` samples `--samples` of the jobs still
queued. Once all are done, each job's actual start (`started_at`, read from the server's
database to the microsecond) is set against each prediction:

    error = |predicted wait - actual wait| / actual wait

where a wait runs from the moment of the prediction (the submit, or the sample) to the
start. Figures: the median and p90 of that error, at submit, while queued, and over all
predictions; the drain rate; how many predictions were null (none should be once the
warm-up ran). Goal: median under 20 %.

Run: ``python3 bench/bench_eta.py`` (``--jobs 1000 --nodes 2 --concurrency 4
--delay-ms 200``).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_nodes import Cluster  # this script's directory is on sys.path

MESSAGES = [{"role": "user", "content": "x"}]
MIN_WAIT = 0.5  # predictions made less than this before the start are left out (noise)


def started_at(db: Path, ids: list[str], timeout: float) -> dict[str, float]:
    """Each job's start once all of them completed."""
    deadline = time.monotonic() + timeout
    marks = ",".join("?" * len(ids))
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            found = conn.execute(
                f"SELECT id, started_at, status FROM jobs WHERE id IN ({marks})", ids
            ).fetchall()
        if len(found) == len(ids) and all(row[2] == "completed" for row in found):
            return {str(row[0]): float(row[1]) for row in found}
        time.sleep(0.5)
    raise RuntimeError(f"the jobs were not done within {timeout:g} s")


def warm_up(cluster: Cluster, count: int, timeout: float) -> None:
    if count <= 0:
        return
    r = cluster.http.post("/v1/jobs", json={"jobs": [{"body": body()} for _ in range(count)]})
    r.raise_for_status()
    started_at(
        cluster.root / "server" / "openbeepboop.db", [j["id"] for j in r.json()["data"]], timeout
    )


def body() -> dict[str, Any]:
    return {"model": "echo", "messages": MESSAGES}


def submit_all(cluster: Cluster, count: int) -> list[tuple[str, float, float | None]]:
    """(job id, when, its estimated start) of each job, from its 202 answer."""
    out = []
    for _ in range(count):
        before = time.time()
        r = cluster.http.post(
            "/v1/chat/completions", json=body(), headers={"Prefer": "respond-async"}
        )
        after = time.time()
        r.raise_for_status()
        job = r.json()
        out.append((str(job["id"]), (before + after) / 2, job["estimated_start_at"]))
    return out


def sample(
    cluster: Cluster, ids: list[str], every: float, per_round: int, rng: random.Random
) -> list[tuple[str, float, float | None]]:
    """(job id, when, its estimated start) of jobs sampled while queued, until none is.
    One key's jobs start in the order submitted: a job seen started, and every job
    before it, leave the jobs to sample."""
    queued = list(ids)
    out: list[tuple[str, float, float | None]] = []
    while queued:
        time.sleep(every)
        left = -1
        for index in sorted(rng.sample(range(len(queued)), min(per_round, len(queued)))):
            before = time.time()
            job = cluster.http.get(f"/v1/jobs/{queued[index]}").json()
            after = time.time()
            if job["status"] == "queued":
                out.append((queued[index], (before + after) / 2, job["estimated_start_at"]))
            else:
                left = index
        queued = queued[left + 1 :]
        if queued and cluster.http.get(f"/v1/jobs/{queued[-1]}").json()["status"] != "queued":
            break
    return out


def errors(
    predictions: list[tuple[str, float, float | None]], starts: dict[str, float]
) -> dict[str, Any]:
    rel = []
    nulls = 0
    for job_id, at, estimate in predictions:
        actual = starts[job_id] - at
        if actual < MIN_WAIT:
            continue
        if estimate is None:
            nulls += 1
            continue
        rel.append(abs((estimate - at) - actual) / actual)
    rel.sort()
    if not rel:
        return {"predictions": 0, "null": nulls}
    return {
        "predictions": len(rel),
        "null": nulls,
        "median_error_pct": round(100 * statistics.median(rel), 1),
        "p90_error_pct": round(100 * rel[int(0.9 * (len(rel) - 1))], 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            for i in range(args.nodes):
                model = {
                    "name": "echo",
                    "backend": "echo",
                    "delay_ms": args.delay_ms,
                    "concurrency": args.concurrency,
                }
                cluster.add_node(f"echo-{i}", [model])
            cluster.wait_for_model("echo", nodes=args.nodes)
            warm_up(cluster, args.warmup, args.timeout)
            submitted = submit_all(cluster, args.jobs)
            ids = [j for j, _, _ in submitted]
            sampled = sample(cluster, ids, args.sample_every, args.samples, rng)
            starts = started_at(cluster.root / "server" / "openbeepboop.db", ids, args.timeout)
        finally:
            cluster.close()
    first, last = min(starts.values()), max(starts.values())
    return {
        "drain_jobs_per_second": round((len(starts) - 1) / (last - first), 1),
        "at_submit": errors(submitted, starts),
        "while_queued": errors(sampled, starts),
        "all": errors(submitted + sampled, starts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=200)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=50, help="jobs sampled per round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    setup = {
        k: getattr(args, k)
        for k in ("jobs", "nodes", "concurrency", "delay_ms", "warmup", "sample_every", "samples")
    }
    print(json.dumps({"setup": setup, "results": run(args)}, indent=2))


if __name__ == "__main__":
    main()
