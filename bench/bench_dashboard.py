#!/usr/bin/env python3
"""The dashboard's cost to the queue: one-job-per-call throughput without viewers and
with 10 viewers on the Overview, side by side in one run.

A viewer is what a browser tab on the Overview costs the server: a logged-in session
(the `/login` form, its cookie) holding `GET /overview/events` open and reading every
event (the counts' HTML fragment and the charts' points, every 2 s). The viewers run in
their own process. Rounds alternate, without and with viewers (each "with" round starts
its viewers, waits until every one has had its first counts, and stops them after), so
a slow spell of the machine falls on both; the headline is the median of each round's
ratio (with / without, the two runs side by side), which a machine whose load drifts
during the run (a shared one) moves less than the ratio of the two medians. Each round
is bench_queue.py's `single` scenario (clients POST /v1/chat/completions with `Prefer:
respond-async`, node workers fetch and submit one job per call).

First, the viewers' own cost, apart from the noise of a throughput run: the server's
CPU time per second while idle, `--idle-seconds` without and then with the viewers.

Run: ``python3 bench/bench_dashboard.py`` (about two minutes); ``--viewers``,
``--rounds``, ``--single-jobs`` as in bench_queue.py. Exits 1 when throughput with viewers
is below 95 % of throughput without them, or a run lost a job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

import bench_queue as bq  # the harness: a sibling script (this directory is on sys.path)

TARGET_RATIO = 0.95


# -- viewers ---------------------------------------------------------------------------


async def _login(http: aiohttp.ClientSession, url: str, key: str) -> None:
    async with http.get(url + "/login") as r:
        page = await r.text()
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    form = {"csrf_token": token, "api_key": key, "next": "/"}
    async with http.post(url + "/login", data=form, allow_redirects=False) as r:
        if r.status != 303:
            raise RuntimeError(f"login failed: {r.status} {await r.text()}")


async def _view(url: str, key: str, ready: asyncio.Event, counts: list[int], i: int) -> None:
    """One tab: log in, then read the overview's events until cancelled."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies of an IP address (127.0.0.1) too
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        await _login(http, url, key)
        async with http.get(url + "/overview/events", timeout=aiohttp.ClientTimeout()) as r:
            r.raise_for_status()
            buffer = b""
            async for chunk in r.content.iter_any():
                *events, buffer = (buffer + chunk).split(b"\n\n")
                counts[i] += sum(e.startswith(b"event: counts") for e in events)
                if all(counts):
                    ready.set()


async def _viewers(url: str, key: str, n: int, ready: Any, stop: Any, out: Any) -> None:
    counts = [0] * n
    all_ready = asyncio.Event()
    tasks = [asyncio.create_task(_view(url, key, all_ready, counts, i)) for i in range(n)]
    await asyncio.wait_for(all_ready.wait(), 30)
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
        failed = [t for t in tasks if t.done()]
        if failed:
            raise RuntimeError(f"a viewer stopped: {failed[0].exception()!r}")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.put(sum(counts))


def _viewer_proc(url: str, key: str, n: int, ready: Any, stop: Any, out: Any) -> None:
    asyncio.run(_viewers(url, key, n, ready, stop, out))


@contextlib.contextmanager
def viewers(url: str, key: str, n: int) -> Any:
    """`n` logged-in viewers on the Overview's event stream (in their own process) for
    the block; yields a dict that gets `events`: how many counts events they read."""
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_viewer_proc, args=(url, key, n, ready, stop, out), daemon=True)
    proc.start()
    seen: dict[str, int] = {}
    try:
        if not ready.wait(60):
            raise RuntimeError("the viewers did not get their first counts in time")
        yield seen
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            seen["events"] = out.get(timeout=10)
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# -- the run ---------------------------------------------------------------------------


def _round(server: bq.Server, args: argparse.Namespace, node_id: str) -> dict[str, Any]:
    load = bq.Load(
        url=server.url,
        client_key=server.keys["client_key"],
        node_key=server.keys["node_key"],
        node_id=node_id,
        jobs=args.single_jobs,
        batched=False,
        client_concurrency=args.clients,
        node_concurrency=args.workers,
        submit_batch=1,
        fetch_batch=1,
    )
    bq._wait_quiet(args.quiet_wait)
    cpu0 = server.cpu_seconds()
    run = bq.run_throughput(load, 2)
    run["server_cpu_ms_per_job"] = 1000 * (server.cpu_seconds() - cpu0) / max(1, run["accepted"])
    return run


def idle_cost(server: bq.Server, args: argparse.Namespace) -> dict[str, float]:
    """The server's CPU while idle, without and with the viewers (ms per second): what
    the viewers cost, apart from the noise of a throughput run."""
    out: dict[str, float] = {}
    for side in ("without", "with"):
        with contextlib.ExitStack() as stack:
            if side == "with":
                stack.enter_context(viewers(server.url, server.keys["client_key"], args.viewers))
            time.sleep(2)  # the sampler's first read (an hour of throughput) is done
            cpu0, t0 = server.cpu_seconds(), time.monotonic()
            time.sleep(args.idle_seconds)
            out[side] = 1000 * (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    with bq._server(args) as server:
        node_id = asyncio.run(bq.register_node(server.url, server.keys["node_key"], "bench"))
        key = server.keys["client_key"]
        idle = idle_cost(server, args)
        print(
            f"  idle server CPU: {idle['without']:.1f} ms/s without viewers, "
            f"{idle['with']:.1f} ms/s with {args.viewers}",
            flush=True,
        )
        with viewers(server.url, key, args.viewers):  # warm-up, both ways, not counted
            _round(server, argparse.Namespace(**{**vars(args), "quiet_wait": 0}), node_id)
        for i in range(args.rounds):
            for side in ("without", "with") if i % 2 == 0 else ("with", "without"):
                if side == "with":
                    with viewers(server.url, key, args.viewers) as seen:
                        result = _round(server, args, node_id)
                    result["viewer_events"] = seen.get("events", 0)
                else:
                    result = _round(server, args, node_id)
                rounds[side].append(result)
                print(
                    f"  {side:7} viewers: {result['jobs_per_s']:7,.0f} jobs/s, server "
                    f"{result['server_cpu_ms_per_job']:.3f} ms CPU/job"
                    + (f", {result['viewer_events']} counts events read" if side == "with" else ""),
                    flush=True,
                )
    without = statistics.median(r["jobs_per_s"] for r in rounds["without"])
    with_ = statistics.median(r["jobs_per_s"] for r in rounds["with"])
    pairs = [
        w["jobs_per_s"] / wo["jobs_per_s"]
        for w, wo in zip(rounds["with"], rounds["without"], strict=True)
        if wo["jobs_per_s"]
    ]
    return {
        "paired_ratios": pairs,
        "median_paired_ratio": statistics.median(pairs) if pairs else 0.0,
        "viewers": args.viewers,
        "idle_server_cpu_ms_per_s": idle,
        "median_without": without,
        "median_with": with_,
        "ratio": with_ / without if without else 0.0,
        "cpu_ms_per_job": {
            side: statistics.median(r["server_cpu_ms_per_job"] for r in runs)
            for side, runs in rounds.items()
        },
        "complete": all(r["complete"] for side in rounds.values() for r in side),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--viewers", type=int, default=10, help="overview viewers [10]")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each kind [5]")
    p.add_argument("--single-jobs", type=int, default=6000, help="jobs per round [6000]")
    p.add_argument("--clients", type=int, default=32, help="concurrent client tasks [32]")
    p.add_argument("--workers", type=int, default=32, help="concurrent node workers [32]")
    p.add_argument("--quiet-wait", type=float, default=5, help="wait for a quiet machine [5 s]")
    p.add_argument(
        "--idle-seconds", type=float, default=20, help="idle CPU measurement, each way [20]"
    )
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json-out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    started = time.monotonic()
    report = run(args)
    met = report["complete"] and report["median_paired_ratio"] >= TARGET_RATIO
    print(
        f"one job per call: {report['median_without']:,.0f} jobs/s without viewers, "
        f"{report['median_with']:,.0f} with {report['viewers']} (medians of "
        f"{len(report['rounds']['with'])} rounds: {100 * report['ratio']:.1f} %); "
        f"median of the rounds' paired ratios {100 * report['median_paired_ratio']:.1f} % "
        f"({', '.join(f'{100 * r:.0f}' for r in report['paired_ratios'])}; "
        f"target >= {100 * TARGET_RATIO:.0f} %) {'met' if met else 'NOT MET'}"
        + ("" if report["complete"] else " (a run lost jobs)")
        + f"; {time.monotonic() - started:.0f} s"
    )
    cpu = report["cpu_ms_per_job"]
    print(
        f"server CPU per job (medians): {cpu['without']:.3f} ms without viewers, "
        f"{cpu['with']:.3f} ms with ({100 * (cpu['with'] / cpu['without'] - 1):+.1f} %)"
    )
    idle = report["idle_server_cpu_ms_per_s"]
    print(
        f"idle server CPU: {idle['without']:.1f} ms/s without viewers, {idle['with']:.1f} "
        f"ms/s with {report['viewers']} ({idle['with'] - idle['without']:+.1f} ms/s: "
        f"{(idle['with'] - idle['without']) / 10:.2f} % of one core)"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
