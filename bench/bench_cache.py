#!/usr/bin/env python3
"""The response cache (docs/cache.md): what a hit costs, and a warm re-run of a batch.

One rig, as bench/bench_openai.py builds it: the mock OpenAI server
(tests/mock_openai.py, zero delay), a real ``openbeepboop-server start`` (SQLite,
durable defaults) and one ``openbeepboop-node run`` whose model ``mock-gpt`` calls the
mock through the ``openai`` backend.

1. Hit latency, one synchronous request at a time with the ``openai`` SDK, the paths
   alternating in rounds (medians, so that machine noise hits all alike):

   - ``direct``: the SDK calls the mock itself;
   - ``obb-hit``: the same request (``temperature=0``) through OpenBeepBoop, answered
     from the cache (warmed by one call first; each answer is checked);
   - ``obb-miss``: the same request with ``cache: "skip"`` (``extra_body``): the queue
     round trip to the node and the mock, for scale.

   Goal: the hit adds below 2 ms over ``direct`` (p50).

2. A batch of ``--batch`` distinct ``temperature=0`` requests submitted in bulk with the
   client library and waited for: once cold (every request runs on the node), then again
   (every request answered from the cache at submit), the same requests. Each run's
   wall time and requests/s, and the second run's hit count from ``/v1/stats``.

Run::

    .venv/bin/python bench/bench_cache.py                  # about a minute
    .venv/bin/python bench/bench_cache.py --requests 1000 --batch 1000 --json-out out.json

It prints a markdown table and exits 1 if the goal is missed. Every process it starts is
stopped at the end (logs in a temporary directory; ``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_openai import MODEL, Procs, pct, start_mock, start_obb

GOAL_ADDED_MS = 2.0


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def timed(call: Callable[[], Any], check: Callable[[Any], bool]) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        answer = call()
        elapsed = time.perf_counter() - start
        if not check(answer):
            raise RuntimeError(f"unexpected answer: {answer}")
        return elapsed

    return once


def hit_latency(mock_url: str, obb_url: str, key: str, requests: int, rounds: int) -> Any:
    import openai

    text = "the same question, asked again and again"
    direct = openai.OpenAI(base_url=mock_url + "/v1", api_key="sk-mock", max_retries=0)
    obb = openai.OpenAI(base_url=obb_url + "/v1", api_key=key, max_retries=0)

    def same(answer: Any) -> bool:
        return bool(answer.choices[0].message.content == text)

    def raw_hit() -> Any:
        raw = obb.chat.completions.with_raw_response.create(
            model=MODEL, messages=_ask(text), temperature=0
        )
        if raw.headers.get("x-openbeepboop-cache") != "hit":
            raise RuntimeError(f"not a hit: {raw.headers.get('x-openbeepboop-cache')}")
        return raw.parse()

    paths: dict[str, Callable[[], float]] = {
        "direct": timed(
            lambda: direct.chat.completions.create(
                model="mock-upstream", messages=_ask(text), temperature=0
            ),
            same,
        ),
        "obb-hit": timed(raw_hit, same),
        "obb-miss": timed(
            lambda: obb.chat.completions.create(
                model=MODEL, messages=_ask(text), temperature=0, extra_body={"cache": "skip"}
            ),
            same,
        ),
    }
    obb.chat.completions.create(model=MODEL, messages=_ask(text), temperature=0)  # warm
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for once in paths.values():
        for _ in range(20):
            once()
    per_round = max(1, requests // rounds)
    for _ in range(rounds):
        for name, once in paths.items():
            samples[name].extend(once() for _ in range(per_round))
    base = statistics.median(samples["direct"]) * 1000
    figures = {}
    for name, got in samples.items():
        p50 = statistics.median(got) * 1000
        figures[name] = {
            "n": len(got),
            "p50_ms": round(p50, 3),
            "p90_ms": round(pct(got, 90), 3),
            "p99_ms": round(pct(got, 99), 3),
            "added_p50_ms": round(p50 - base, 3),
        }
    return figures


def batch_rerun(obb_url: str, key: str, size: int) -> dict[str, Any]:
    import httpx

    from openbeepboop.client import Client

    tag = f"{time.time_ns()}"
    requests = [
        {"model": MODEL, "messages": _ask(f"question {i} of run {tag}"), "temperature": 0}
        for i in range(size)
    ]
    out: dict[str, Any] = {"requests": size}
    with Client(base_url=obb_url, api_key=key) as client:
        for run in ("cold", "warm"):
            hits_before = _hits(httpx, obb_url, key)
            start = time.perf_counter()
            jobs = client.chat.completions.create_many(requests)
            done = client.jobs.wait_all(jobs, timeout=600)
            elapsed = time.perf_counter() - start
            texts = [j.result.choices[0].message.content for j in done]
            if texts != [r["messages"][0]["content"] for r in requests]:
                raise RuntimeError(f"{run}: answers do not match their requests")
            out[run] = {
                "seconds": round(elapsed, 3),
                "requests_per_s": round(size / elapsed, 1),
                "cached": sum(j.cached for j in done),
                "hits_counted": _hits(httpx, obb_url, key) - hits_before,
            }
    out["speedup"] = round(out["cold"]["seconds"] / out["warm"]["seconds"], 1)
    return out


def _hits(httpx: Any, url: str, key: str) -> int:
    stats = httpx.get(url + "/v1/stats", headers={"Authorization": f"Bearer {key}"}).json()
    return int(stats["cache"]["hits"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="per path (latency)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1000, help="requests in the batch")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    procs = Procs(root)
    try:
        mock_url = start_mock(procs)
        obb_url, key = start_obb(procs, root, mock_url)
        latency = hit_latency(mock_url, obb_url, key, args.requests, args.rounds)
        batch = batch_rerun(obb_url, key, args.batch)
    finally:
        procs.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    lines = [
        "| path | n | p50 ms | p90 ms | p99 ms | added p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in latency.items():
        lines.append(
            f"| {name} | {f['n']} | {f['p50_ms']} | {f['p90_ms']} | {f['p99_ms']} "
            f"| {f['added_p50_ms']} |"
        )
    lines += [
        "",
        "| batch run | requests | seconds | requests/s | answered from the cache |",
        "|---|---|---|---|---|",
    ]
    for run in ("cold", "warm"):
        b = batch[run]
        lines.append(
            f"| {run} | {batch['requests']} | {b['seconds']} | {b['requests_per_s']} "
            f"| {b['cached']} |"
        )
    print("\n".join(lines))
    added = latency["obb-hit"]["added_p50_ms"]
    ok = added < GOAL_ADDED_MS and batch["warm"]["cached"] == batch["requests"]
    print(
        f"\nhit adds {added} ms p50 over a direct call (goal < {GOAL_ADDED_MS} ms); "
        f"warm re-run {batch['speedup']}x faster than cold: {'ok' if ok else 'MISSED'}"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps({"latency": latency, "batch": batch}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
