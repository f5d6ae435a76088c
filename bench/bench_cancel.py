#!/usr/bin/env python3
"""Cancel latency: how long after a client's cancel a node stops a running generation.

A server and one node process on loopback; the node serves each model with
concurrency 1 and heartbeats 20 s apart (a third of the 60 s lease), so that only its
cancel watch (`/internal/queue/watch`) can stop a job in time. Each try:

1. job A: a long streamed generation; wait until its first tokens have arrived (the
   generation is under way), or for a model that pushes nothing, until it started;
2. job B (one token) queued behind it: it can only start once the node dropped A;
3. cancel A, then time, from the moment the cancel call returned:
   - `dropped`: B's `started` event (the node dropped A and leased B);
   - `free`: B's `end` event: B ran to its end on the same model, so A's generation
     had stopped (for llama.cpp: its thread saw the stop and gave the context back).

Models: the bundled Gemma 3 270M through the llama_cpp backend, and the echo backend
streaming one word every 20 ms (`echo`) or silent for 60 s before answering whole
(`echo-whole`). Figures: p50 and p99 of each, over `--tries` tries (default 20).

Run: ``python3 bench/bench_cancel.py`` (all), ``--only gemma``, ``--tries 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w

from bench_nodes import Cluster  # this script's directory is on sys.path
from openbeepboop.client import AsyncClient, AsyncJob

STORY = "Write a very long story about a lighthouse keeper and the sea, chapter by chapter."
MODELS: dict[str, dict[str, Any]] = {
    "gemma": {"backend": "llama_cpp", "n_ctx": 2048, "max_tokens": 1500},
    "echo": {"backend": "echo", "token_delay_ms": 20},
    "echo-whole": {"backend": "echo", "delay_ms": 60_000},
}
FIRST_TOKENS = 5  # tokens of A seen before the cancel (a model that streams)


def add_node(cluster: Cluster, names: list[str]) -> None:
    models = [{"name": n, "concurrency": 1, **MODELS[n]} for n in names]
    config = {
        "server": {"url": cluster.url, "api_key": cluster.keys["node_key"]},
        "node": {
            "name": "cancel-node",
            "state_dir": str(cluster.root / "node"),
            "heartbeat_seconds": 30,
        },
        "models": models,
    }
    path = cluster.root / "node.toml"
    path.write_text(tomli_w.dumps(config))
    cluster._spawn(
        ["openbeepboop.cli.node", "run", "--config", str(path)], dict(os.environ), "node.log"
    )


async def under_way(job: AsyncJob, tokens: int) -> None:
    """Until `tokens` tokens of `job` arrived (0: until it started)."""
    seen = 0
    async for event in job.events():
        if event["type"] == "started" and tokens == 0:
            return
        if event["type"] in ("token", "delta"):
            seen += 1
            if seen >= tokens:
                return
        elif event["type"] in ("end", "failed", "cancelled"):
            return


async def timeline(job: AsyncJob, to_the_end: bool) -> dict[str, float]:
    """When `job`'s `started` (and, `to_the_end`, its final) event arrives."""
    seen: dict[str, float] = {}
    async for event in job.events():
        if event["type"] == "started":
            seen["started"] = time.perf_counter()
            if not to_the_end:
                return seen
        elif event["type"] in ("end", "failed", "cancelled"):
            seen[event["type"]] = time.perf_counter()
            return seen
    return seen


async def one_try(client: AsyncClient, model: str, seed: int) -> dict[str, float] | None:
    """One cancel; None when A finished before it could be cancelled."""
    streams = "delay_ms" not in MODELS[model]
    messages = [{"role": "user", "content": STORY if model == "gemma" else STORY * 20}]
    a = await client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0.8, seed=seed
    )
    await asyncio.wait_for(under_way(a, FIRST_TOKENS if streams else 0), 120)
    if not streams:
        await asyncio.sleep(0.2)  # the job is under way, silently
    if model != "gemma":  # echo answers with the prompt: a short one
        messages = [{"role": "user", "content": "Say hi."}]
    # on llama.cpp, A's prompt again: its tokens are still in the context (no prefill),
    # so B's time is A's stop plus about one decode step
    b = await client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    following = asyncio.create_task(timeline(b, to_the_end=streams))
    await asyncio.sleep(0.05)  # B's event stream is open
    before = time.perf_counter()
    await a.cancel()
    returned = time.perf_counter()
    seen = await asyncio.wait_for(following, 120)
    if not streams:
        await b.cancel()  # it would be silent for as long as A
    if a.status != "cancelled" or "started" not in seen:
        return None
    row = {"call": returned - before, "dropped": seen["started"] - returned}
    if "end" in seen:
        row["free"] = seen["end"] - returned
    return row


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the node process and its children (the model's worker
    process, where llama.cpp generates) used so far, from /proc (Linux)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if entry.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def quiet_after(pid: int, since: float, window: float = 0.1, busy: float = 0.25) -> float:
    """Seconds from `since` until the node (with its workers) went quiet: the start of the first
    `window` in which it used less than `busy` of a CPU (a generation keeps its threads
    busy, near 2 CPUs here; CPU time comes in 10 ms ticks, so the node's own loops show
    up as a tick now and then). Good to about `window`."""
    samples = [(time.perf_counter(), cpu_seconds(pid))]
    while True:
        await asyncio.sleep(0.01)
        samples.append((time.perf_counter(), cpu_seconds(pid)))
        now, used = samples[-1]
        start = next(i for i, (t, _) in enumerate(samples) if t >= now - window)
        t0, used0 = samples[start]
        if now - t0 >= window * 0.9 and used - used0 < busy * (now - t0):
            return t0 - since
        if now - since > 60:
            return now - since


async def stop_try(client: AsyncClient, model: str, seed: int, pid: int) -> float | None:
    """A's generation cancelled with nothing queued behind it: seconds from the cancel's
    answer until the node process stopped using the CPU (the generation thread
    ended); None when A finished first."""
    messages = [{"role": "user", "content": STORY}]
    a = await client.chat.completions.create(
        model=model, messages=messages, stream=True, temperature=0.8, seed=seed
    )
    await asyncio.wait_for(under_way(a, FIRST_TOKENS), 120)
    await a.cancel()
    returned = time.perf_counter()
    quiet = await quiet_after(pid, returned)
    return quiet if a.status == "cancelled" else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_model(client: AsyncClient, model: str, tries: int, pid: int) -> dict[str, Any]:
    await one_try(client, model, 0)  # warm-up
    rows: list[dict[str, float]] = []
    seed, discarded = 1, 0  # discarded: A ended before its cancel
    while len(rows) < tries:
        row = await one_try(client, model, seed)
        seed += 1
        if row is not None:
            rows.append(row)
        else:
            discarded += 1
    if model == "gemma":  # the CPU says when the generation thread stopped
        quiet: list[float] = []
        while len(quiet) < tries:
            await asyncio.sleep(0.5)  # what the last try left running has ended
            got = await stop_try(client, model, seed, pid)
            seed += 1
            if got is not None:
                quiet.append(got)
            else:
                discarded += 1
        for row, got in zip(rows, quiet, strict=True):
            row["quiet"] = got
    out: dict[str, Any] = {"model": model, "tries": tries, "discarded": discarded}
    for key in ("dropped", "free", "quiet", "call"):
        values = [r[key] * 1000 for r in rows if key in r]
        if not values:
            continue
        out[key] = {
            "p50_ms": round(statistics.median(values), 1),
            "p90_ms": round(percentile(values, 0.9), 1),
            "p99_ms": round(percentile(values, 0.99), 1),
            "max_ms": round(max(values), 1),
        }
    return out


async def run(models: list[str], tries: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            add_node(cluster, models)
            for model in models:
                cluster.wait_for_model(model)
            client = AsyncClient(cluster.url, cluster.keys["client_key"])
            try:
                pid = cluster.procs[-1].pid  # the node, started last
                return [await bench_model(client, m, tries, pid) for m in models]
            finally:
                await client.close()
        finally:
            cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    models = [args.only] if args.only else ["echo", "echo-whole", "gemma"]
    load = os.getloadavg()
    rows = asyncio.run(run(models, args.tries))
    for row in rows:
        d, f = row["dropped"], row.get("free")
        done = f" -> next job done p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms;" if f else ""
        print(
            f"{row['model']}: cancel -> job dropped p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms;"
            f"{done} ({row['tries']} tries, cancel call p50 {row['call']['p50_ms']} ms)"
        )
        if "quiet" in row:
            q = row["quiet"]
            print(
                f"  {row['model']}: cancel -> node CPU quiet (generation stopped) "
                f"p50 {q['p50_ms']} ms, p99 {q['p99_ms']} ms"
            )
    print(f"load average before the run: {load[0]:.2f} on {os.cpu_count()} CPUs")
    if args.json_out:
        args.json_out.write_text(json.dumps({"load": load, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
