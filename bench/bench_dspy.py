#!/usr/bin/env python3
"""Calls per second of DSPy's two routes to the server (docs/recipes.md), on an echo node
(no model time: what each route itself costs).

- ``http``: ``dspy.LM("openai/echo", api_base=.../v1, api_key=...)``, one synchronous
  request per call;
- ``jobs``: ``jobs_lm("echo", ...)``, each call a job (submit with an idempotency key,
  long-poll until done);
- ``jobs re-run``: the same calls again with the same run name, every job already done
  (what a restarted evaluation pays per finished call).

Each route makes ``--calls`` distinct calls (``lm(prompt)``, DSPy's cache off), one at a
time and from ``--threads`` threads at once (as ``dspy.Evaluate(num_threads=...)`` does).
One server, one echo node (concurrency 64), all on loopback.

Run: ``python3 bench/bench_dspy.py [--calls 400] [--threads 16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nodes import Cluster


def rate(call: Callable[[str], Any], prompts: list[str], threads: int) -> float:
    """Calls per second of `call` over `prompts`, from `threads` threads."""
    start = time.perf_counter()
    if threads == 1:
        for p in prompts:
            call(p)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(call, prompts))
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price list fetch
    import dspy

    from openbeepboop.integrations.dspy import jobs_lm

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.add_node("echo", [{"name": "echo", "backend": "echo", "concurrency": 64}])
            cluster.wait_for_model("echo")
            key = cluster.keys["client_key"]
            http = dspy.LM("openai/echo", api_base=cluster.url + "/v1", api_key=key, cache=False)
            for threads in (1, args.threads):
                n = args.calls if threads > 1 else args.calls // 4
                tag = uuid.uuid4().hex[:8]
                prompts = [f"call {tag} {i}" for i in range(n)]
                http(prompts[0] + " warm-up")
                row = {"http": rate(http, prompts, threads)}
                jobs = jobs_lm("echo", base_url=cluster.url, api_key=key, run=f"bench-{tag}")
                jobs(prompts[0] + " warm-up")
                row["jobs"] = rate(jobs, prompts, threads)
                row["jobs re-run"] = rate(jobs, prompts, threads)
                jobs.engine.close()
                results[f"{threads} thread{'s' if threads > 1 else ''}"] = row
        finally:
            cluster.close()
    print(f"{'':<12}" + "".join(f"{k:>14}" for k in ("http", "jobs", "jobs re-run")))
    for label, row in results.items():
        print(f"{label:<12}" + "".join(f"{v:>11.1f}/s " for v in row.values()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
