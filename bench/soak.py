#!/usr/bin/env python3
"""Soak: a server and echo nodes under steady load for minutes; does anything grow?

What it runs, all real processes on loopback: `openbeepboop-server start` (SQLite in a
temporary data dir by default; ``--database-url`` for PostgreSQL) and ``--nodes`` echo
nodes (``openbeepboop-node run``, ``--concurrency`` slots each, ``--delay-ms`` per job).

1. Capacity: for ``--measure-seconds`` (20) in all, closed-loop clients send
   synchronous chat completions (each waits for its answer, then sends the next), 8,
   then 16, then 32 of them (``--clients``); the best completions per second is the
   capacity (more clients than that only queue up). ``--rate`` skips this.
2. Soak: for ``--minutes`` (10), open-loop arrivals at ``--load`` (0.5) times the capacity:
   one synchronous completion every 1/rate seconds, whatever the answers' pace, as users
   would send them. Meanwhile a scraper reads ``/metrics`` and ``/v1/stats`` every 5 s,
   as Prometheus and a dashboard would.
3. Every ``--interval`` seconds (30) one row: completions in the window, errors, p50
   and p99 latency of the completions answered in it, the scrape's p50, RSS and open
   file descriptors of the server and of the nodes (summed), and the database's size
   (SQLite: the file, its WAL and shared memory; PostgreSQL: pg_database_size).

Verdict, comparing the end with the beginning (the first row is the baseline: caches,
pools and the WAL have warmed up by then): server and nodes RSS grew < 10 %; their fds
are flat (within +10); p99 is flat (the last three rows' median p99 is within 1.5x,
or 5 ms, of the first three's); no request failed; every answer was the echo of its
question. The database grows with the jobs it keeps (nothing prunes them here); the
table shows by how much. Exit status 1 when the verdict fails.

Run: ``python3 bench/soak.py`` (about 11 minutes), ``--minutes 60`` for longer,
``--minutes 1 --interval 10`` for a quick look; ``--json-out FILE`` keeps every figure.
The load generator runs in this process, on the same machine: on a small machine it
competes with the server and nodes for CPU (its share is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import tomli_w

SCRAPE_SECONDS = 5.0
MAX_IN_FLIGHT = 2000  # open loop, but not without bound if the server stalls


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes -----------------------------------------------------------------------


class Cluster:
    """A server and echo nodes in a directory, and how to measure them."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        self.env = {**os.environ, "OPENBEEPBOOP_RATE_LIMIT": ""}
        if database_url:
            self.env["OPENBEEPBOOP_DATABASE_URL"] = database_url
        out = subprocess.run(
            [
                *(sys.executable, "-m", "openbeepboop.cli.server", "setup"),
                *("--non-interactive", "--data-dir", str(root / "server"), "--json"),
            ],
            capture_output=True,
            check=True,
            text=True,
            env=self.env,
        )
        self.setup = json.loads(out.stdout)
        self.keys = {k: v for k, v in self.setup.items() if k.endswith("_key")}
        self.server = self._spawn(
            [
                *("openbeepboop.cli.server", "start", "--data-dir", str(root / "server")),
                *("--port", str(self.port)),
            ],
            "server.log",
        )
        self.nodes: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            if self.server.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"the server did not start; see {root / 'server.log'}")

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.root / log).open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", *args], stdout=out, stderr=out, env=self.env
            )

    def add_node(self, name: str, concurrency: int, delay_ms: float) -> None:
        config = {
            "server": {"url": self.url, "api_key": self.keys["node_key"]},
            "node": {"name": name, "state_dir": str(self.root / name)},
            "models": [
                {"name": "echo", "backend": "echo", "concurrency": concurrency}
                | ({"delay_ms": delay_ms} if delay_ms else {})
            ],
        }
        path = self.root / f"{name}.toml"
        path.write_text(tomli_w.dumps(config))
        self.nodes.append(
            self._spawn(["openbeepboop.cli.node", "run", "--config", str(path)], f"{name}.log")
        )

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        auth = {"Authorization": f"Bearer {self.keys['client_key']}"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = httpx.get(self.url + "/v1/models", headers=auth, timeout=5).json()["data"]
            if any(m["id"] == "echo" and m["nodes"] >= count for m in data):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{count} echo node(s) did not come up; see {self.root}")

    def database_bytes(self) -> int:
        if not self.database_url:
            db = Path(self.setup["database"])
            files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
            return sum(f.stat().st_size for f in files if f.exists())
        import asyncpg

        async def size() -> int:
            conn = await asyncpg.connect(self.database_url)
            try:
                return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
            finally:
                await conn.close()

        return asyncio.run(size())

    def close(self) -> None:
        for p in [*self.nodes, self.server]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.nodes, self.server]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- load --------------------------------------------------------------------------------


@dataclass
class Window:
    """What one interval saw."""

    minute: float
    completions: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    scrape_p50_ms: float = 0.0
    server_rss_mib: float = 0.0
    nodes_rss_mib: float = 0.0
    server_fds: int = 0
    nodes_fds: int = 0
    db_mib: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    scrapes: list[float] = field(default_factory=list, repr=False)


class Load:
    """Synchronous chat completions, their latencies and failures."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=512),
        )
        self.window = Window(0.0)
        self.in_flight = 0
        self.sent = 0
        self.first_error = ""

    async def one(self) -> None:
        self.in_flight += 1
        self.sent += 1
        text = f"soak {self.sent}"
        body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
        start = time.perf_counter()
        try:
            r = await self.http.post("/v1/chat/completions", json=body)
            ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
            if not ok and not self.first_error:
                self.first_error = f"{r.status_code} {r.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            ok = False
            self.first_error = self.first_error or repr(exc)
        finally:
            self.in_flight -= 1
        if ok:
            self.window.latencies.append(time.perf_counter() - start)
            self.window.completions += 1
        else:
            self.window.errors += 1

    async def closed_loop(self, clients: int, seconds: float) -> float:
        """Completions per second of `clients` that each send the next when answered."""
        stop = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < stop:
                await self.one()

        self.window = Window(0.0)
        start = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return self.window.completions / (time.monotonic() - start)

    async def open_loop(self, rate: float, seconds: float) -> None:
        """One request every 1/rate seconds (on schedule, however answers come)."""
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        n = 0
        while True:
            due = start + n / rate
            now = time.monotonic()
            if due - start >= seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            n += 1
            if self.in_flight >= MAX_IN_FLIGHT:
                self.window.errors += 1  # the server fell that far behind: counted
                continue
            task = asyncio.create_task(self.one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)

    async def scrape(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            for path in ("/metrics", "/v1/stats"):
                r = await self.http.get(path)
                if r.status_code != 200:
                    self.window.errors += 1
            self.window.scrapes.append(time.perf_counter() - start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SCRAPE_SECONDS)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def soak(
    cluster: Cluster, load: Load, rate: float, minutes: float, interval: float
) -> list[Window]:
    rows: list[Window] = []
    stop = asyncio.Event()
    start = time.monotonic()
    load.window = Window(0.0)
    driver = asyncio.create_task(load.open_loop(rate, minutes * 60))
    scraper = asyncio.create_task(load.scrape(stop))
    print(
        f"{'min':>5} {'done':>6} {'err':>4} {'p50 ms':>7} {'p99 ms':>7} {'scrape':>7} "
        f"{'srv MiB':>8} {'nodes MiB':>9} {'srv fd':>6} {'node fd':>7} {'db MiB':>7}",
        flush=True,
    )
    while not driver.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(driver), interval)
        w, load.window = load.window, Window(0.0)
        w.minute = round((time.monotonic() - start) / 60, 2)
        w.p50_ms = round(percentile(w.latencies, 0.50) * 1000, 1)
        w.p99_ms = round(percentile(w.latencies, 0.99) * 1000, 1)
        w.scrape_p50_ms = round(percentile(w.scrapes, 0.5) * 1000, 1)
        w.server_rss_mib = round(rss_bytes(cluster.server.pid) / 2**20, 1)
        w.nodes_rss_mib = round(sum(rss_bytes(p.pid) for p in cluster.nodes) / 2**20, 1)
        w.server_fds = open_fds(cluster.server.pid)
        w.nodes_fds = sum(open_fds(p.pid) for p in cluster.nodes)
        w.db_mib = round(await asyncio.to_thread(cluster.database_bytes) / 2**20, 1)
        rows.append(w)
        print(
            f"{w.minute:5.1f} {w.completions:6d} {w.errors:4d} {w.p50_ms:7.1f} "
            f"{w.p99_ms:7.1f} {w.scrape_p50_ms:7.1f} {w.server_rss_mib:8.1f} "
            f"{w.nodes_rss_mib:9.1f} {w.server_fds:6d} {w.nodes_fds:7d} {w.db_mib:7.1f}",
            flush=True,
        )
    stop.set()
    await scraper
    return rows


def verdict(rows: list[Window], first_error: str) -> tuple[bool, list[str]]:
    """Each check with its figures, and whether all passed (module docstring)."""
    if len(rows) < 2:
        return False, ["too short: fewer than two rows"]
    first, last = rows[0], rows[-1]
    head = statistics.median(w.p99_ms for w in rows[:3])
    tail = statistics.median(w.p99_ms for w in rows[-3:])
    errors = sum(w.errors for w in rows)
    checks = [
        (
            last.server_rss_mib < first.server_rss_mib * 1.10,
            f"server RSS {first.server_rss_mib} -> {last.server_rss_mib} MiB "
            f"({(last.server_rss_mib / first.server_rss_mib - 1) * 100:+.1f} %, limit +10 %)",
        ),
        (
            last.nodes_rss_mib < first.nodes_rss_mib * 1.10,
            f"nodes RSS {first.nodes_rss_mib} -> {last.nodes_rss_mib} MiB "
            f"({(last.nodes_rss_mib / first.nodes_rss_mib - 1) * 100:+.1f} %, limit +10 %)",
        ),
        (
            max(w.server_fds for w in rows) <= first.server_fds + 10
            and max(w.nodes_fds for w in rows) <= first.nodes_fds + 10,
            f"fds server {first.server_fds} -> max {max(w.server_fds for w in rows)}, "
            f"nodes {first.nodes_fds} -> max {max(w.nodes_fds for w in rows)} (limit +10)",
        ),
        (
            tail <= max(1.5 * head, head + 5),
            f"p99 {head} ms (first three rows) -> {tail} ms (last three; limit 1.5x or +5 ms)",
        ),
        (errors == 0, f"errors {errors}" + (f" (first: {first_error})" if errors else "")),
    ]
    return all(ok for ok, _ in checks), [("ok   " if ok else "FAIL ") + s for ok, s in checks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds per row")
    parser.add_argument("--rate", type=float, help="requests/s (default: measured x --load)")
    parser.add_argument("--load", type=float, default=0.5, help="share of the capacity")
    parser.add_argument("--measure-seconds", type=float, default=20.0)
    parser.add_argument("--clients", default="8,16,32", help="capacity: closed-loop clients")
    parser.add_argument("--nodes", type=int, default=2, help="echo node processes")
    parser.add_argument("--concurrency", type=int, default=32, help="slots per node")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="echo: wait per job")
    parser.add_argument("--database-url", default="", help="PostgreSQL (default: SQLite)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="obb-soak-") as tmp:
        cluster = Cluster(Path(tmp), args.database_url)
        try:
            for i in range(args.nodes):
                cluster.add_node(f"echo-{i}", args.concurrency, args.delay_ms)
            cluster.wait_for_nodes(args.nodes)
            return asyncio.run(run(cluster, args))
        finally:
            cluster.close()


async def run(cluster: Cluster, args: argparse.Namespace) -> int:
    load = Load(cluster.url, cluster.keys["client_key"])
    own_cpu = time.process_time()
    try:
        capacity = None
        if args.rate is None:
            tried = [int(n) for n in args.clients.split(",")]
            each = args.measure_seconds / len(tried)
            found = {n: await load.closed_loop(n, each) for n in tried}
            capacity = max(found.values())
            print(
                "capacity: "
                + ", ".join(f"{n} clients {rate:.0f}/s" for n, rate in found.items())
                + f": {capacity:.0f} completions/s"
            )
        rate = args.rate or capacity * args.load
        print(
            f"soak: {rate:.0f} requests/s for {args.minutes:g} min, "
            f"{args.nodes} echo node(s) x {args.concurrency} slots, "
            f"{'PostgreSQL' if args.database_url else 'SQLite'}",
            flush=True,
        )
        server_cpu = cpu_seconds(cluster.server.pid)
        started = time.monotonic()
        rows = await soak(cluster, load, rate, args.minutes, args.interval)
        elapsed = time.monotonic() - started
    finally:
        await load.http.aclose()
    ok, lines = verdict(rows, load.first_error)
    busy = {
        "server": (cpu_seconds(cluster.server.pid) - server_cpu) / elapsed,
        "load generator": (time.process_time() - own_cpu) / elapsed,
    }
    print("cpu (cores busy): " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
    print("verdict: " + ("PASS" if ok else "FAIL"))
    for line in lines:
        print("  " + line)
    if args.json_out:
        out = {
            "capacity": capacity,
            "rate": rate,
            "args": {k: v for k, v in vars(args).items() if k != "json_out"},
            "cpus": os.cpu_count(),
            "cpu": busy,
            "rows": [
                {k: v for k, v in asdict(w).items() if k not in ("latencies", "scrapes")}
                for w in rows
            ],
            "verdict": {"pass": ok, "checks": lines},
        }
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
