#!/usr/bin/env python3
"""Model affinity: one node whose two models take turns (`exclusive_models`: one loaded
at a time, as on a GPU that holds one model's weights), fed a mixed queue.

The echo backend stands in for the models: each job takes `--delay-ms`, and each switch
from one model to the other pays `--load-ms` (echo's `load_ms`, the time to read the
weights again). `--jobs` jobs, each of model a or b at random (seeded), are queued in one
bulk submit; the node drains them. Run twice in the same invocation, each on a fresh
server: with affinity (`affinity_max_wait_seconds`, default 30 s) and without (0). Figures:
model switches the node made, wall time from the submit to the last job done, and how
long after the submit the other model (the one whose first job started last) got its
first job started: the wait affinity imposes, which its bound caps.

Run: ``python3 bench/bench_affinity.py`` (``--jobs 200 --delay-ms 100 --load-ms 500``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from bench_nodes import Cluster  # this script's directory is on sys.path

AFFINITY_ENV = "OPENBEEPBOOP_AFFINITY_MAX_WAIT_SECONDS"


def add_node(cluster: Cluster, delay_ms: float, load_ms: float) -> Path:
    models = [
        {"name": name, "backend": "echo", "delay_ms": delay_ms, "load_ms": load_ms}
        for name in ("a", "b")
    ]
    config = {
        "server": {"url": cluster.url, "api_key": cluster.keys["node_key"]},
        "node": {
            "name": "affinity-node",
            "state_dir": str(cluster.root / "node"),
            "poll_seconds": 5,
            "exclusive_models": True,
        },
        "models": models,
    }
    path = cluster.root / "node.toml"
    path.write_text(tomli_w.dumps(config))
    cluster._spawn(
        ["openbeepboop.cli.node", "run", "--config", str(path)], dict(os.environ), "node.log"
    )
    return cluster.root / "node.log"


def switches(log: Path) -> int:
    return log.read_text(errors="replace").count('event="model switched"')


def drained(db: Path, ids: list[str], timeout: float) -> list[tuple[str, float, float]]:
    """(model, started_at, finished_at) of each job once all completed."""
    deadline = time.monotonic() + timeout
    marks = ",".join("?" * len(ids))
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            found = conn.execute(
                f"SELECT model, started_at, finished_at, status FROM jobs WHERE id IN ({marks})",
                ids,
            ).fetchall()
        if len(found) == len(ids) and all(row[3] == "completed" for row in found):
            return [(str(row[0]), float(row[1]), float(row[2])) for row in found]
        time.sleep(0.2)
    raise RuntimeError(f"the jobs were not done within {timeout:g} s")


def run(args: argparse.Namespace, affinity: float) -> dict[str, Any]:
    os.environ[AFFINITY_ENV] = str(affinity)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            log = add_node(cluster, args.delay_ms, args.load_ms)
            cluster.wait_for_model("a")
            cluster.wait_for_model("b")
            time.sleep(0.5)  # the node's startup loads are behind it
            before = switches(log)
            rng = random.Random(args.seed)
            jobs = [
                {
                    "body": {
                        "model": rng.choice("ab"),
                        "messages": [{"role": "user", "content": "x"}],
                    }
                }
                for _ in range(args.jobs)
            ]
            started = time.time()
            answer = cluster.http.post("/v1/jobs", json={"jobs": jobs})
            answer.raise_for_status()
            ids = [str(j["id"]) for j in answer.json()["data"]]
            times = drained(cluster.root / "server" / "openbeepboop.db", ids, args.timeout)
            return {
                "affinity_max_wait_seconds": affinity,
                "switches": switches(log) - before,
                "seconds": round(max(t[2] for t in times) - started, 2),
                "other_model_first_start_seconds": round(
                    max(min(t[1] for t in times if t[0] == m) for m in "ab") - started, 2
                ),
            }
        finally:
            cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=100)
    parser.add_argument("--load-ms", type=float, default=500)
    parser.add_argument("--bound", type=float, default=30.0, help="affinity_max_wait_seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    results = [run(args, args.bound), run(args, 0.0)]
    setup = {k: getattr(args, k) for k in ("jobs", "delay_ms", "load_ms", "seed")}
    print(json.dumps({"setup": setup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
