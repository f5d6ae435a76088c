#!/usr/bin/env python3
"""Queue throughput and dispatch-latency benchmark over real HTTP.

What it measures, against a real `openbeepboop-server start` process in its default
durable mode (SQLite in WAL mode, `synchronous=FULL`, one group-commit writer; every
response is sent only after its COMMIT):

1. ``single``: end-to-end jobs/s with one job per call. Client tasks POST
   ``/v1/chat/completions`` with ``Prefer: respond-async``; node workers POST
   ``/internal/queue/fetch`` (``max_jobs=1``, long-poll) and ``/internal/queue/submit``
   with one result each. Clients and workers run concurrently; the figure is
   jobs / (last accepted result - first submit sent). Target >= 1,000 jobs/s.
2. ``batched``: the same with bulk calls: ``POST /v1/jobs`` with ``{"jobs": [...]}``,
   fetch with a large ``max_jobs``, one submit per fetched batch. Target >= 5,000 jobs/s.
3. ``latency``: one node waits in a long-poll fetch (``wait=30``); a client submits one
   job; the figure is the time from the submit response returning to the fetch response
   returning, over many repetitions (p50/p90/p99). Target p99 <= 20 ms.

How: the script makes a temporary data dir (``openbeepboop-server setup
--non-interactive --json``), starts the server with ``OPENBEEPBOOP_RATE_LIMIT=""`` (no
per-key rate limits), waits for ``GET /health``, registers a node for model ``echo``,
runs the scenarios, and stops the server with SIGTERM. The load generator runs on uvloop
with one keep-alive connection per client task or node worker; its HTTP client is a
minimal HTTP/1.1 one parsed by httptools (``--http aiohttp`` cross-checks with aiohttp,
which costs more CPU per request than the server does and so competes with it on a
small machine). By default the client side and the node side of the throughput
scenarios run in two separate processes (``--procs 1`` runs both in this one). Each
throughput scenario runs one short warm-up, then ``--reps`` measured runs; the median is
reported. Every run also prints the server's CPU time per job (from /proc, robust to a
noisy machine), the load generator's, and what the machine was doing meanwhile: CPU
pressure (PSI: some runnable task waited for a CPU) and hypervisor steal.

Run: ``python3 bench/bench_queue.py`` (one to two minutes with the defaults; it exits 1
if a target is missed); ``--help`` lists the knobs; ``--json-out FILE`` writes every
figure as JSON, including per-call latencies. Every accepted-result count is checked: a
run that loses or refuses a job is reported as incomplete, not fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from math import nan
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httptools
import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is an optional speed-up
    uvloop = None

MODEL = "echo"
RESULT = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
TARGETS = {"single": 1000.0, "batched": 5000.0, "latency_p99_ms": 20.0}


# -- the server ----------------------------------------------------------------------


class Mark:
    """What the machine was doing: CPU pressure (PSI: the share of time in which some
    runnable task waited for a CPU) and steal (time the hypervisor gave our virtual CPUs
    to someone else), between this mark and `since()`."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.pressure_us = _read_pressure_us()
        self.cpu_ticks = _read_cpu_ticks()

    def since(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.at)
        pressure = 100 * (_read_pressure_us() - self.pressure_us) / 1e6 / wall
        ticks = [b - a for a, b in zip(self.cpu_ticks, _read_cpu_ticks(), strict=False)]
        if len(ticks) < 8 or not sum(ticks[:8]):
            return {"cpu_pressure_pct": pressure, "steal_pct": nan, "machine_busy_pct": nan}
        total = sum(ticks[:8])  # user nice system idle iowait irq softirq steal
        return {
            "cpu_pressure_pct": pressure,
            "steal_pct": 100 * ticks[7] / total,
            # all CPUs, everything but idle and steal: the server and the load generator
            # account for their share; the rest is other work on the machine
            "machine_busy_pct": 100 * (total - ticks[3] - ticks[4] - ticks[7]) / total,
        }


def _wait_quiet(limit: float) -> None:
    """Wait (at most `limit` seconds) for a one-second window in which the machine is
    nearly idle: under 2% steal and under 10% busy. The run is reported either way."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        mark = Mark()
        time.sleep(1)
        seen = mark.since()
        if not (seen["steal_pct"] >= 2 or seen["machine_busy_pct"] >= 10):  # NaN: no /proc
            return


def _read_pressure_us() -> float:
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return nan


def _read_cpu_ticks() -> list[int]:
    """The machine-wide `cpu` line of /proc/stat: user nice system idle iowait irq
    softirq steal ..."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER_CMD: list[str] = []  # set from --server-cmd


def _server_cmd() -> list[str]:
    if SERVER_CMD:
        return SERVER_CMD
    exe = shutil.which("openbeepboop-server")
    return [exe] if exe else [sys.executable, "-m", "openbeepboop.cli.server"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A server process on a fresh data dir, with the keys `setup` printed."""

    data_dir: Path
    port: int
    keys: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. OPENBEEPBOOP_DATABASE_URL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def setup(self) -> None:
        out = subprocess.run(
            [
                *_server_cmd(),
                "setup",
                "--non-interactive",
                "--json",
                "--data-dir",
                str(self.data_dir),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
        ).stdout
        self.keys = json.loads(out)

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "OPENBEEPBOOP_RATE_LIMIT": "", "OPENBEEPBOOP_NODE_RATE_LIMIT": ""}
        env.update(self.env)
        cmd = [*_server_cmd(), "start", "--data-dir", str(self.data_dir)]
        cmd += ["--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        asyncio.run(self._wait_healthy(time.monotonic() + timeout))

    async def _wait_healthy(self, deadline: float) -> None:
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"server not healthy in time:\n{self.log_path.read_text()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid) if self.proc else float("nan")


# -- HTTP: one keep-alive connection per task ------------------------------------------


class RawHttp(asyncio.Protocol):
    """A minimal HTTP/1.1 client on one keep-alive connection, one request at a time.

    Plain HTTP over TCP, parsed by httptools (what uvicorn uses); it exists because a
    general-purpose client costs more CPU per request than the server on this scale, and
    the load generator shares the machine with the server."""

    def __init__(self, host: str, port: int) -> None:
        self._host = f"{host}:{port}".encode()
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, url: str) -> RawHttp:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(host, port), host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        body, self._chunks = b"".join(self._chunks), []
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def post(self, path: str, headers: dict[str, str], body: Any, ok: int = 200) -> Any:
        assert self._transport is not None and self._waiter is None
        data = orjson.dumps(body)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self._host, head, len(data), data)
        )
        status, raw = await self._waiter
        if status != ok:
            raise RuntimeError(f"POST {path} -> {status}: {raw[:300]!r}")
        return orjson.loads(raw)

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class AioHttp:
    """The same interface on aiohttp (`--http aiohttp`), to cross-check RawHttp."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=120)
        )

    @classmethod
    async def open(cls, url: str) -> AioHttp:
        return cls(url)

    async def post(self, path: str, headers: dict[str, str], body: Any, ok: int = 200) -> Any:
        data = orjson.dumps(body)
        async with self._session.post(self._url + path, data=data, headers=headers) as r:
            raw = await r.read()
            if r.status != ok:
                raise RuntimeError(f"POST {path} -> {r.status}: {raw[:300]!r}")
            return orjson.loads(raw)

    async def close(self) -> None:
        await self._session.close()


Http = RawHttp | AioHttp
CLIENTS: dict[str, type[RawHttp] | type[AioHttp]] = {"raw": RawHttp, "aiohttp": AioHttp}


def _headers(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **extra}


async def register_node(url: str, node_key: str, name: str) -> str:
    http = await AioHttp.open(url)
    try:
        body = {"name": name, "models": [{"name": MODEL}], "capacity": 1000}
        out = await http.post("/internal/nodes/register", _headers(node_key), body)
        return str(out["node_id"])
    finally:
        await http.close()


def _chat(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}]}


# -- the load: client side and node side -----------------------------------------------


@dataclass(frozen=True)
class Load:
    """One throughput run, as both sides see it."""

    url: str
    client_key: str
    node_key: str
    node_id: str
    jobs: int
    batched: bool
    client_concurrency: int
    node_concurrency: int
    submit_batch: int
    fetch_batch: int
    http: str = "raw"
    fetch_wait: float = 1.0
    deadline_s: float = 300.0
    urls: tuple[str, ...] = ()  # several replicas: connection i goes to urls[i % n]

    def url_for(self, i: int) -> str:
        return self.urls[i % len(self.urls)] if self.urls else self.url


async def run_clients(load: Load) -> dict[str, Any]:
    """Submit `load.jobs` jobs; report when the first was sent and the last acknowledged."""
    next_job = 0
    first_sent: float | None = None
    last_acked = 0.0
    submitted = 0
    took: list[float] = []
    headers = _headers(load.client_key, Prefer="respond-async")
    bulk_headers = _headers(load.client_key)
    conns = [await CLIENTS[load.http].open(load.url_for(i)) for i in range(load.client_concurrency)]

    async def one_client(http: Http) -> None:
        nonlocal next_job, first_sent, last_acked, submitted
        while next_job < load.jobs:
            start = next_job
            n = min(load.submit_batch if load.batched else 1, load.jobs - start)
            next_job += n
            sent = time.monotonic()
            if first_sent is None:
                first_sent = sent
            if load.batched:
                body = {"jobs": [{"body": _chat(start + i)} for i in range(n)]}
                out = await http.post("/v1/jobs", bulk_headers, body, ok=202)
                submitted += len(out["data"])
            else:
                await http.post("/v1/chat/completions", headers, _chat(start), ok=202)
                submitted += 1
            last_acked = time.monotonic()
            took.append(last_acked - sent)

    try:
        await asyncio.gather(*(one_client(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return {
        "first_sent": first_sent,
        "last_acked": last_acked,
        "submitted": submitted,
        "latency_ms": {"submit": _summary(took)},
    }


async def run_nodes(load: Load, started: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fetch and answer jobs until `load.jobs` results were accepted (or the deadline)."""
    accepted = refused = fetches = empty = 0
    last_accepted = 0.0
    done = False
    deadline = time.monotonic() + load.deadline_s
    took: dict[str, list[float]] = {"fetch": [], "result": []}
    headers = _headers(load.node_key)
    fetch_body = {
        "node_id": load.node_id,
        "models": [MODEL],
        "max_jobs": load.fetch_batch if load.batched else 1,
        "wait": load.fetch_wait,
    }
    conns = [await CLIENTS[load.http].open(load.url_for(i)) for i in range(load.node_concurrency)]

    async def worker(http: Http) -> None:
        nonlocal accepted, refused, fetches, empty, last_accepted, done
        while not done and time.monotonic() < deadline:
            sent = time.monotonic()
            jobs = (await http.post("/internal/queue/fetch", headers, fetch_body))["jobs"]
            fetches += 1
            if not jobs:
                empty += 1
                continue
            took["fetch"].append(time.monotonic() - sent)
            results = [
                {"job_id": j["id"], "lease_id": j["lease_id"], "result": RESULT} for j in jobs
            ]
            body = {"node_id": load.node_id, "results": results}
            sent = time.monotonic()
            out = await http.post("/internal/queue/submit", headers, body)
            took["result"].append(time.monotonic() - sent)
            ok = sum(1 for r in out["results"] if r["accepted"])
            accepted += ok
            refused += len(results) - ok
            if ok:
                last_accepted = time.monotonic()
            if accepted >= load.jobs:
                done = True

    try:
        workers = [asyncio.create_task(worker(c)) for c in conns]
        if started is not None:
            await asyncio.sleep(0.2)  # let the first fetches reach the server
            started()
        await asyncio.gather(*workers)
    finally:
        for c in conns:
            await c.close()
    return {
        "accepted": accepted,
        "refused": refused,
        "fetches": fetches,
        "empty_fetches": empty,
        "last_accepted": last_accepted,
        "latency_ms": {name: _summary(values) for name, values in took.items()},
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    """p50 / p99 / max of call durations, in ms (non-empty fetches only)."""
    if not seconds:
        return {}
    ms = [s * 1000 for s in seconds]
    return {"p50": _pct(ms, 50), "p99": _pct(ms, 99), "max": max(ms)}


def _run_loop(coro: Any) -> Any:
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


def _client_proc(load: Load, go: Any, out: Any) -> None:
    go.wait()
    start = time.process_time()
    res = _run_loop(run_clients(load))
    res["cpu_s"] = time.process_time() - start
    out.put(("clients", res))


def _node_proc(load: Load, ready: Any, out: Any) -> None:
    start = time.process_time()
    res = _run_loop(run_nodes(load, started=ready.set))
    res["cpu_s"] = time.process_time() - start
    out.put(("nodes", res))


def run_throughput(load: Load, procs: int) -> dict[str, Any]:
    """One run: node side first (parked in long-polls), then the clients."""
    if procs >= 2:
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
        nodes = ctx.Process(target=_node_proc, args=(load, ready, out), daemon=True)
        clients = ctx.Process(target=_client_proc, args=(load, go, out), daemon=True)
        nodes.start()
        clients.start()
        if not ready.wait(60):
            raise RuntimeError("node process did not start")
        go.set()
        got: dict[str, Any] = {}
        deadline = time.monotonic() + load.deadline_s + 30
        while len(got) < 2:
            with contextlib.suppress(queue.Empty):
                side, res = out.get(timeout=0.5)
                got[side] = res
                continue
            dead = [p.name for p in (nodes, clients) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in (nodes, clients):
                    p.kill()
                raise RuntimeError(f"load process failed: {dead or 'timeout'}")
        nodes.join(10)
        clients.join(10)
        c, n = got["clients"], got["nodes"]
        loadgen_cpu = c["cpu_s"] + n["cpu_s"]
    else:

        async def both() -> tuple[dict[str, Any], dict[str, Any]]:
            started = asyncio.Event()
            node_task = asyncio.create_task(run_nodes(load, started=started.set))
            await started.wait()
            c = await run_clients(load)
            return c, await node_task

        cpu = time.process_time()
        c, n = _run_loop(both())
        loadgen_cpu = time.process_time() - cpu
    elapsed = n["last_accepted"] - c["first_sent"]
    complete = n["accepted"] == load.jobs and n["refused"] == 0
    return {
        "jobs": load.jobs,
        "accepted": n["accepted"],
        "refused": n["refused"],
        "complete": complete,
        "seconds": elapsed,
        "jobs_per_s": n["accepted"] / elapsed if elapsed > 0 else 0.0,
        "submit_phase_s": c["last_acked"] - c["first_sent"],
        "fetches": n["fetches"],
        "empty_fetches": n["empty_fetches"],
        "loadgen_cpu_ms_per_job": 1000 * loadgen_cpu / max(1, n["accepted"]),
        "call_latency_ms": {**c["latency_ms"], **n["latency_ms"]},
    }


# -- dispatch latency ------------------------------------------------------------------


async def run_latency(
    url: str,
    client_key: str,
    node_key: str,
    node_id: str,
    samples: int,
    settle: float,
    http: str = "raw",
    client_url: str | None = None,
) -> dict[str, Any]:
    """Submit-response-returned -> long-poll-fetch-returned, `samples` times (the submit
    goes to `client_url` when given: another replica than the one the fetch waits on)."""
    lat_ms: list[float] = []
    from_send_ms: list[float] = []
    headers = _headers(node_key)
    c_headers = _headers(client_key, Prefer="respond-async")
    fetch_body = {"node_id": node_id, "models": [MODEL], "max_jobs": 1, "wait": 30}
    node_http = await CLIENTS[http].open(url)
    client_http = await CLIENTS[http].open(client_url or url)

    async def fetch() -> tuple[list[dict[str, Any]], float]:
        jobs = (await node_http.post("/internal/queue/fetch", headers, fetch_body))["jobs"]
        return jobs, time.perf_counter()

    try:
        warmup = min(20, samples)
        for i in range(samples + warmup):
            fetching = asyncio.create_task(fetch())
            await asyncio.sleep(settle)  # the fetch is parked on the server by now
            sent = time.perf_counter()
            await client_http.post("/v1/chat/completions", c_headers, _chat(i), ok=202)
            returned = time.perf_counter()
            jobs, fetched = await fetching
            if len(jobs) != 1:
                raise RuntimeError(f"latency fetch returned {len(jobs)} jobs")
            job = jobs[0]
            result = {"job_id": job["id"], "lease_id": job["lease_id"], "result": RESULT}
            body = {"node_id": node_id, "results": [result]}
            await node_http.post("/internal/queue/submit", headers, body)
            if i >= warmup:
                lat_ms.append((fetched - returned) * 1000)
                from_send_ms.append((fetched - sent) * 1000)
    finally:
        await node_http.close()
        await client_http.close()
    return {
        "samples": len(lat_ms),
        "p50_ms": _pct(lat_ms, 50),
        "p90_ms": _pct(lat_ms, 90),
        "p99_ms": _pct(lat_ms, 99),
        "max_ms": max(lat_ms),
        "min_ms": min(lat_ms),
        "from_submit_sent_p50_ms": _pct(from_send_ms, 50),
        "from_submit_sent_p99_ms": _pct(from_send_ms, 99),
    }


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- driver ----------------------------------------------------------------------------


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="obb-bench-", dir=args.data_root))
    server = Server(root / "data", args.port or _free_port())
    try:
        server.setup()
        server.start()
        print(f"server pid {server.proc.pid if server.proc else '?'} on {server.url}", flush=True)
        yield server
    finally:
        code = server.stop()
        if code not in (0, None, -signal.SIGTERM):
            print(f"warning: server exited with {code}; log: {server.log_path}", file=sys.stderr)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _throughput(
    server: Server, args: argparse.Namespace, node_id: str, batched: bool
) -> dict[str, Any]:
    jobs = args.batched_jobs if batched else args.single_jobs

    def load(n: int) -> Load:
        return Load(
            url=server.url,
            client_key=server.keys["client_key"],
            node_key=server.keys["node_key"],
            node_id=node_id,
            jobs=n,
            batched=batched,
            client_concurrency=args.batch_clients if batched else args.clients,
            node_concurrency=args.batch_workers if batched else args.workers,
            submit_batch=args.submit_batch,
            fetch_batch=args.fetch_batch,
            http=args.http,
        )

    run_throughput(load(max(1, jobs // 10)), args.procs)  # warm-up, not counted
    runs = []
    for _ in range(args.reps):
        _wait_quiet(args.quiet_wait)
        cpu0, t0, mark = server.cpu_seconds(), time.monotonic(), Mark()
        run = run_throughput(load(jobs), args.procs)
        wall = time.monotonic() - t0
        server_cpu = server.cpu_seconds() - cpu0
        run["server_cpu_pct"] = 100 * server_cpu / max(1e-9, min(wall, run["seconds"]))
        run["server_cpu_ms_per_job"] = 1000 * server_cpu / max(1, run["accepted"])
        run.update(mark.since())
        runs.append(run)
        print(
            f"  {'batched' if batched else 'single'}: {run['jobs_per_s']:8,.0f} jobs/s "
            f"({run['accepted']}/{jobs} in {run['seconds']:.2f} s; server "
            f"{run['server_cpu_pct']:.0f}% CPU, {run['server_cpu_ms_per_job']:.3f} ms/job; "
            f"load generator {run['loadgen_cpu_ms_per_job']:.3f} ms/job; "
            f"machine {run['machine_busy_pct']:.0f}% busy, CPU pressure "
            f"{run['cpu_pressure_pct']:.0f}%, steal {run['steal_pct']:.0f}%)",
            flush=True,
        )
    rates = [r["jobs_per_s"] for r in runs]
    return {
        "median_jobs_per_s": statistics.median(rates),
        "median_server_cpu_ms_per_job": statistics.median(r["server_cpu_ms_per_job"] for r in runs),
        "min_jobs_per_s": min(rates),
        "max_jobs_per_s": max(rates),
        "steal_pct_range": (min(r["steal_pct"] for r in runs), max(r["steal_pct"] for r in runs)),
        "complete": all(r["complete"] for r in runs),
        "runs": runs,
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "python": sys.version.split()[0],
        "config": {k: v for k, v in vars(args).items() if k != "json_out"},
        "scenarios": {},
    }
    mark = Mark()
    with _server(args) as server:
        node_id = asyncio.run(register_node(server.url, server.keys["node_key"], "bench-node"))
        scenarios = report["scenarios"]
        if "single" in args.only:
            scenarios["single"] = _throughput(server, args, node_id, batched=False)
        if "batched" in args.only:
            scenarios["batched"] = _throughput(server, args, node_id, batched=True)
        if "latency" in args.only:
            cpu0, t0, lat_mark = server.cpu_seconds(), time.monotonic(), Mark()
            lat = _run_loop(
                run_latency(
                    server.url,
                    server.keys["client_key"],
                    server.keys["node_key"],
                    node_id,
                    args.latency_samples,
                    args.settle_ms / 1000,
                    args.http,
                )
            )
            lat["server_cpu_pct"] = 100 * (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
            lat.update(lat_mark.since())
            scenarios["latency"] = lat
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["machine"].update(mark.since())
    return report


def print_table(report: dict[str, Any]) -> bool:
    rows: list[tuple[str, str, str, str]] = []
    met_all = True
    sc = report["scenarios"]
    for name, label in (("single", "one job per call"), ("batched", "batched")):
        if name in sc:
            s = sc[name]
            met = s["complete"] and s["median_jobs_per_s"] >= TARGETS[name]
            met_all &= met
            figure = (
                f"{s['median_jobs_per_s']:,.0f} jobs/s (median; "
                f"{s['min_jobs_per_s']:,.0f}-{s['max_jobs_per_s']:,.0f}; "
                f"steal {s['steal_pct_range'][0]:.0f}-{s['steal_pct_range'][1]:.0f}%)"
            )
            figure += "" if s["complete"] else " INCOMPLETE"
            rows.append((label, figure, f">= {TARGETS[name]:,.0f} jobs/s", _yes(met)))
    if "latency" in sc:
        s = sc["latency"]
        met = s["p99_ms"] <= TARGETS["latency_p99_ms"]
        met_all &= met
        figure = f"p50 {s['p50_ms']:.2f} / p90 {s['p90_ms']:.2f} / p99 {s['p99_ms']:.2f} ms"
        rows.append(("dispatch latency", figure, "p99 <= 20 ms", _yes(met)))
    table = [("scenario", "figure", "target", "met?"), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    m = report["machine"]
    print(
        f"machine: {m['cpus']} CPUs, load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end; CPUs {m['machine_busy_pct']:.0f}% busy (this bench "
        f"included); some task waited for a CPU {m['cpu_pressure_pct']:.0f}% of the time (PSI); "
        f"hypervisor steal {m['steal_pct']:.0f}%"
    )
    return met_all


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--only", default="single,batched,latency", help="scenarios to run, comma-separated"
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions of throughput runs [3]")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=15,
        help="before each measured run, wait up to this many seconds for a second without "
        "hypervisor steal or other load (0: do not wait) [15]",
    )
    p.add_argument("--single-jobs", type=int, default=6000, help="jobs per single run [6000]")
    p.add_argument("--clients", type=int, default=32, help="concurrent client tasks [32]")
    p.add_argument("--workers", type=int, default=32, help="concurrent node workers [32]")
    p.add_argument("--batched-jobs", type=int, default=60000, help="jobs per batched run [60000]")
    p.add_argument("--submit-batch", type=int, default=1000, help="jobs per bulk submit [1000]")
    p.add_argument("--fetch-batch", type=int, default=500, help="max_jobs per batched fetch [500]")
    p.add_argument("--batch-clients", type=int, default=2, help="concurrent bulk submitters [2]")
    p.add_argument("--batch-workers", type=int, default=4, help="concurrent batched workers [4]")
    p.add_argument("--latency-samples", type=int, default=400, help="latency repetitions [400]")
    p.add_argument("--settle-ms", type=float, default=15, help="fetch head start [15 ms]")
    p.add_argument(
        "--procs",
        type=int,
        default=2,
        choices=(1, 2),
        help="load processes: 2 = clients and nodes apart, 1 = both in this one [2]",
    )
    p.add_argument(
        "--http",
        choices=sorted(CLIENTS),
        default="raw",
        help="load generator's HTTP client: raw (httptools, lean) or aiohttp [raw]",
    )
    p.add_argument("--port", type=int, default=0, help="server port [a free one]")
    p.add_argument(
        "--server-cmd",
        default="",
        help="the server command to run instead of openbeepboop-server (shell words)",
    )
    p.add_argument("--data-root", default=None, help="where the temp data dir goes [$TMPDIR]")
    p.add_argument("--keep", action="store_true", help="keep the data dir and server log")
    p.add_argument("--json-out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    SERVER_CMD[:] = shlex.split(args.server_cmd)
    report = run_all(args)
    met = print_table(report)
    report["all_targets_met"] = met
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
