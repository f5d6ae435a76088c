#!/usr/bin/env python3
"""Batch runner benchmark: `Client.run_batched` of 2,000 chat requests through a real
server process and one real echo node process (`delay_ms` 0, 64 slots), on loopback.

For each setting of `num_workers` x `max_outstanding` it runs a fresh 2,000-request run
(its own name, a state file in a temporary directory) and reports requests/s, from the
call to its return: bulk submits, long-polls, the state file's writes and the results
returned in input order. Then the same call again, which finds the finished run and
returns its results from the state file (nothing sent). For comparison, the same 2,000
requests without the runner: `create_many` (bulk) then `jobs.wait_all`. Figures are
medians of `--rounds`.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_runs.py [--requests 2000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [(4, 1000), (1, 1000), (4, 200)]  # (num_workers, max_outstanding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import tests.conftest  # noqa: F401  (tests.nodes needs it imported first)
    from tests.nodes import echo_model, new_server, with_node

    from openbeepboop.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    os.environ["OPENBEEPBOOP_STATE_DIR"] = str(tmp / "runs")
    server = new_server(tmp / "server")
    try:
        with (
            with_node(server, tmp / "node", [echo_model(0, concurrency=64)]),
            Client(server.url, server.keys["client_key"]) as client,
        ):
            prompts = [f"question {i}" for i in range(args.requests)]
            client.run_batched(prompts[:200], model="echo", name="warm-up")
            for workers, window in SETTINGS:
                rates, again = [], []
                for n in range(args.rounds):
                    name = f"w{workers}-o{window}-{n}"
                    kwargs = {"num_workers": workers, "max_outstanding": window}
                    began = time.perf_counter()
                    outcome = client.run_batched(prompts, model="echo", name=name, **kwargs)
                    rates.append(args.requests / (time.perf_counter() - began))
                    assert outcome.completed == args.requests
                    began = time.perf_counter()
                    client.run_batched(prompts, model="echo", name=name, **kwargs)
                    again.append(time.perf_counter() - began)
                print(
                    f"num_workers={workers} max_outstanding={window}: "
                    f"{statistics.median(rates):.0f} requests/s "
                    f"(rounds: {', '.join(f'{r:.0f}' for r in rates)}); "
                    f"the finished run again: {statistics.median(again) * 1000:.0f} ms"
                )
            bodies = [
                {"model": "echo", "messages": [{"role": "user", "content": p}]} for p in prompts
            ]
            rates = []
            for _ in range(args.rounds):
                began = time.perf_counter()
                client.jobs.wait_all(client.chat.completions.create_many(bodies))
                rates.append(args.requests / (time.perf_counter() - began))
            rate = statistics.median(rates)
            print(f"without the runner (create_many, wait_all): {rate:.0f} requests/s")
    finally:
        server.kill(signal.SIGTERM)


if __name__ == "__main__":
    main()
