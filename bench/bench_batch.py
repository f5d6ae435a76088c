#!/usr/bin/env python3
"""Batch API benchmark: a 50,000-line batch (OpenAI's per-file maximum) through a real
server process and real echo node processes, driven with the official ``openai`` SDK.

Each round starts a fresh server (temporary data dir, default durable SQLite mode, no
rate limits) and measures, one phase after the other:

1. ``upload``: ``files.create(purpose="batch")`` of the whole file; the server checks
   every line (JSON, custom_id, url, the body as the endpoint would) as it streams in.
2. ``create → in_progress``: ``batches.create`` until the server's batch driver has turned
   every line into a job (server timestamps, read from its database afterwards).
3. ``run``: echo node processes (started only now, ``delay_ms`` 0, 64 slots each as in
   bench_nodes.py) run the 50,000 jobs; jobs/s from the first job started to the last
   finished (from the jobs' own timestamps). This is node throughput, not the batch API.
4. ``finalize``: ``finalizing_at → completed_at`` (the output file built from the jobs),
   then ``files.content`` of the output file, checked: one line per request, every
   custom_id exactly once, every line a 200.
5. ``memory``: the server's RSS before and after, and its peak (VmHWM, reset through
   ``/proc/<pid>/clear_refs`` before each phase so the peak is per phase), against the
   input file's size. The server streams files in 1 MiB parts: peaks must stay bounded.

Then, on the same server, a 50,000-line upload whose LAST line is wrong: it must be
refused with a 400 naming line 50000, and leave nothing stored (``files.list()`` and
the database's file parts are unchanged).

Also reported: the server's CPU seconds per phase (from /proc: robust on a busy machine)
and the machine's CPU pressure meanwhile (PSI). Linux only (/proc). The server and nodes
run whatever ``openbeepboop`` this Python imports (set PYTHONPATH to measure another tree).

Run: ``.venv/bin/python bench/bench_batch.py`` (3 rounds, about 10 minutes on 2 cores;
figures are medians). ``--lines 10000,50000`` compares sizes (does the peak grow with
the file?), ``--rounds``, ``--nodes``, ``--concurrency``, ``--settle S`` (idle S seconds,
then read RSS again), ``--no-bad``, ``--json-out FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import tomli_w

URL = "/v1/chat/completions"
SYSTEM = "You are a concise assistant. Answer in one short sentence, no lists."
TOPICS = ("rivers", "volcanoes", "bridges", "comets", "forests", "deserts", "glaciers")
MIB = 1 << 20


def custom_id(i: int) -> str:
    return f"request-{i:05d}"


def batch_input(lines: int, bad_last: bool = False) -> bytes:
    """A JSONL batch file of chat requests, each body about 200 bytes (system + user)."""
    out = []
    for i in range(lines):
        topic = TOPICS[i % len(TOPICS)]
        body: dict[str, Any] = {
            "model": "echo",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Question {i}: name one fact about {topic}."},
            ],
            "max_tokens": 64,
        }
        if bad_last and i == lines - 1:
            body["mesages"] = body.pop("messages")  # misspelt: messages is required
        line = {"custom_id": custom_id(i), "method": "POST", "url": URL, "body": body}
        out.append(json.dumps(line, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


# -- processes -------------------------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    return {**env, "OPENBEEPBOOP_RATE_LIMIT": "", "PYTHONUNBUFFERED": "1"}


class Cluster:
    """A server process and its node processes in a temporary directory; `close` always
    stops them (SIGTERM, then SIGKILL)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        data = root / "server"
        out = subprocess.run(
            [
                *(sys.executable, "-m", "openbeepboop.cli.server", "setup"),
                *("--non-interactive", "--data-dir", str(data), "--json"),
            ],
            capture_output=True,
            check=True,
            text=True,
            env=_env(),
        )
        self.keys = json.loads(out.stdout)
        self.db = data / "openbeepboop.db"
        self.server = self._spawn(
            [
                *("openbeepboop.cli.server", "start", "--data-dir", str(data)),
                *("--port", str(self.port)),
            ],
            "server.log",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.server.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"the server did not start; see {root / 'server.log'}")
            time.sleep(0.1)
        self.client = openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=self.keys["client_key"],
            max_retries=0,
            timeout=600,
        )

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.root / log).open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args], stdout=out, stderr=out, env=_env()
            )
        self.procs.append(proc)
        return proc

    def add_node(self, name: str, concurrency: int) -> None:
        config = {
            "server": {"url": self.url, "api_key": self.keys["node_key"]},
            "node": {"name": name, "state_dir": str(self.root / name), "poll_seconds": 5},
            "models": [
                {"name": "echo", "backend": "echo", "delay_ms": 0, "concurrency": concurrency}
            ],
        }
        path = self.root / f"{name}.toml"
        path.write_text(tomli_w.dumps(config))
        self._spawn(["openbeepboop.cli.node", "run", "--config", str(path)], f"{name}.log")

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the server's database directly (read-only; WAL lets it while it runs)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        self.client.close()
        self._stop()

    def _stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


# -- memory ----------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used: robust to a busy machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pressure_s() -> float:
    """Seconds in which some runnable task waited for a CPU (PSI), since boot."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rpartition("total=")[2]) / 1e6
    except OSError:
        return float("nan")


def rss_mib(pid: int) -> float:
    return _status_kib(pid)["VmRSS"] / 1024


@contextmanager
def phase(pid: int, into: dict[str, float], name: str) -> Iterator[None]:
    """The process's peak RSS (VmHWM, MiB) and CPU seconds during the block: the
    high-water mark is reset first (`echo 5 > /proc/PID/clear_refs`), so it is this
    block's own."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    cpu = cpu_s(pid)
    try:
        yield
    finally:
        into[f"peak_{name}_mib"] = _status_kib(pid)["VmHWM"] / 1024
        into[f"cpu_{name}_s"] = cpu_s(pid) - cpu


class Sampler:
    """RSS every 20 ms, timestamped, to split a phase by server-side timestamps."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.samples.append((time.time(), rss_mib(self.pid)))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def max_between(self, start: float, end: float) -> float:
        inside = [rss for at, rss in self.samples if start <= at <= end]
        return max(inside, default=float("nan"))


# -- one round -------------------------------------------------------------------------


def wait_status(cluster: Cluster, batch_id: str, wanted: set[str], every: float) -> Any:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        batch = cluster.client.batches.retrieve(batch_id)
        if batch.status in wanted:
            return batch
        if batch.status in ("failed", "expired", "cancelled"):
            raise RuntimeError(f"batch {batch_id} is {batch.status}: {batch.errors}")
        time.sleep(every)
    raise RuntimeError(f"batch {batch_id} never reached {wanted}")


def one_round(
    lines: int, nodes: int, concurrency: int, bad: bool, settle: float = 0
) -> dict[str, Any]:
    data = batch_input(lines)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        cluster = Cluster(Path(tmp))
        pid = cluster.server.pid
        sampler = Sampler(pid)
        peaks: dict[str, float] = {}
        started, pressure = time.monotonic(), cpu_pressure_s()
        try:
            client = cluster.client
            client.files.list()  # warm: the first request's imports and caches
            rss_before = rss_mib(pid)

            with phase(pid, peaks, "upload"):
                t0 = time.perf_counter()
                upload = client.files.create(file=("input.jsonl", data), purpose="batch")
                upload_s = time.perf_counter() - t0
            assert upload.bytes == len(data), upload

            with phase(pid, peaks, "queue"):
                batch = client.batches.create(
                    input_file_id=upload.id, endpoint=URL, completion_window="24h"
                )
                wait_status(cluster, batch.id, {"in_progress", "finalizing", "completed"}, 0.1)

            with phase(pid, peaks, "run_finalize"):
                t_nodes = time.time()
                for i in range(nodes):
                    cluster.add_node(f"echo-{i}", concurrency)
                done = wait_status(cluster, batch.id, {"completed"}, 0.25)
            counts = done.request_counts
            assert counts is not None and (counts.completed, counts.failed) == (lines, 0), done
            assert done.output_file_id is not None and done.error_file_id is None, done

            with phase(pid, peaks, "download"):
                t0 = time.perf_counter()
                output = client.files.content(done.output_file_id).content
                download_s = time.perf_counter() - t0
            rows = output.splitlines()
            ids = [json.loads(row)["custom_id"] for row in rows]
            assert len(rows) == lines, f"{len(rows)} output lines, expected {lines}"
            assert sorted(ids) == [custom_id(i) for i in range(lines)], "custom_ids differ"
            assert all(b'"status_code":200' in row for row in rows)
            rss_after = rss_mib(pid)

            created, in_progress, finalizing, completed = cluster.query(
                "SELECT created_at, in_progress_at, finalizing_at, completed_at "
                "FROM batches WHERE id = ?",
                batch.id,
            )[0]
            first_start, last_end = cluster.query(
                "SELECT min(started_at), max(finished_at) FROM jobs WHERE batch_id = ?", batch.id
            )[0]
            row: dict[str, Any] = {
                "lines": lines,
                "input_mib": len(data) / MIB,
                "output_mib": len(output) / MIB,
                "upload_s": upload_s,
                "queue_s": in_progress - created,
                "run_s": last_end - first_start,
                "jobs_per_s": lines / (last_end - first_start),
                "nodes_start_to_done_s": last_end - t_nodes,
                "finalize_s": completed - finalizing,
                "download_s": download_s,
                "rss_before_mib": rss_before,
                "rss_after_mib": rss_after,
                **peaks,
                "sampled_peak_run_mib": sampler.max_between(first_start, finalizing),
                "sampled_peak_finalize_mib": sampler.max_between(finalizing, completed + 0.05),
            }
            row["server_cpu_per_job_ms"] = 1000 * peaks["cpu_run_finalize_s"] / lines
            row["cpu_pressure_pct"] = (
                100 * (cpu_pressure_s() - pressure) / (time.monotonic() - started)
            )
            row["peak_mib"] = max(v for k, v in peaks.items() if k.startswith("peak_"))
            row["growth_mib"] = row["peak_mib"] - rss_before
            row["growth_per_input"] = row["growth_mib"] / row["input_mib"]
            if settle:
                time.sleep(settle)  # e.g. past the 60 s finished job texts are kept
                row["rss_settled_mib"] = rss_mib(pid)
            if bad:
                row.update(bad_upload(cluster, lines))
            return row
        finally:
            sampler.stop()
            cluster.close()


def bad_upload(cluster: Cluster, lines: int) -> dict[str, Any]:
    """A file whose last line is wrong: refused, naming that line, nothing kept."""
    data = batch_input(lines, bad_last=True)
    client = cluster.client
    before = sorted(f.id for f in client.files.list())
    parts_before = cluster.query("SELECT count(*) FROM file_parts")[0][0]
    t0 = time.perf_counter()
    try:
        client.files.create(file=("bad.jsonl", data), purpose="batch")
    except openai.BadRequestError as exc:
        seconds = time.perf_counter() - t0
        message = exc.message
    else:
        raise AssertionError("an upload with a wrong last line was accepted")
    assert f"line {lines}:" in message, message
    after = sorted(f.id for f in client.files.list())
    assert after == before, f"files changed: {before} -> {after}"
    parts_after = cluster.query("SELECT count(*) FROM file_parts")[0][0]
    orphans = cluster.query(
        "SELECT count(*) FROM file_parts WHERE file_id NOT IN (SELECT id FROM files)"
    )[0][0]
    assert parts_after == parts_before and orphans == 0, (parts_before, parts_after, orphans)
    return {"bad_upload_s": seconds, "bad_upload_message": message}


# -- report ----------------------------------------------------------------------------

FIGURES = [
    ("input file", "input_mib", "{:.1f} MiB"),
    ("upload (`files.create`, every line checked)", "upload_s", "{:.2f} s"),
    ("`batches.create` → `in_progress` (lines become jobs)", "queue_s", "{:.2f} s"),
    ("run: echo nodes, first job started → last finished", "run_s", "{:.2f} s"),
    ("run: node throughput", "jobs_per_s", "{:,.0f} jobs/s"),
    ("`finalizing_at` → `completed_at` (output file written)", "finalize_s", "{:.2f} s"),
    ("download output (`files.content`)", "download_s", "{:.2f} s"),
    ("output file", "output_mib", "{:.1f} MiB"),
    ("wrong last line: upload refused (400)", "bad_upload_s", "{:.2f} s"),
    ("server CPU, upload", "cpu_upload_s", "{:.2f} s"),
    ("server CPU, create → in_progress", "cpu_queue_s", "{:.2f} s"),
    ("server CPU per job, run + finalize", "server_cpu_per_job_ms", "{:.2f} ms"),
    ("server CPU, download", "cpu_download_s", "{:.2f} s"),
    ("CPU pressure during the round (PSI some)", "cpu_pressure_pct", "{:.0f} %"),
    ("server RSS before (idle, warm)", "rss_before_mib", "{:.0f} MiB"),
    ("server peak RSS, upload", "peak_upload_mib", "{:.0f} MiB"),
    ("server peak RSS, create → in_progress", "peak_queue_mib", "{:.0f} MiB"),
    ("server peak RSS, run + finalize", "peak_run_finalize_mib", "{:.0f} MiB"),
    ("… sampled during run only", "sampled_peak_run_mib", "{:.0f} MiB"),
    ("… sampled during finalize only", "sampled_peak_finalize_mib", "{:.0f} MiB"),
    ("server peak RSS, download", "peak_download_mib", "{:.0f} MiB"),
    ("server RSS after", "rss_after_mib", "{:.0f} MiB"),
    ("server RSS after `--settle` seconds idle", "rss_settled_mib", "{:.0f} MiB"),
    ("peak - before", "growth_mib", "{:.0f} MiB"),
    ("(peak - before) / input size", "growth_per_input", "{:.2f} x"),
]


def table(rows_by_size: dict[int, list[dict[str, Any]]]) -> str:
    sizes = list(rows_by_size)
    head = "| figure | " + " | ".join(f"{n:,} lines" for n in sizes) + " |"
    out = [head, "|---|" + "---|" * len(sizes)]
    for label, key, fmt in FIGURES:
        cells = []
        for n in sizes:
            values = [r[key] for r in rows_by_size[n] if key in r]
            if not values:
                cells.append("-")
                continue
            med = statistics.median(values)
            cell = fmt.format(med)
            if len(values) > 1 and (key.endswith("_s") or key == "jobs_per_s"):
                lo, hi = fmt.format(min(values)), fmt.format(max(values))
                cell += f" ({lo.split()[0]}-{hi})"
            cells.append(cell)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so every round's `finally` stops its processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (medians)")
    parser.add_argument("--lines", default="50000", help="batch sizes, comma-separated")
    parser.add_argument("--nodes", type=int, default=2, help="echo node processes")
    parser.add_argument("--concurrency", type=int, default=64, help="slots per node")
    parser.add_argument("--no-bad", action="store_true", help="skip the wrong-last-line upload")
    parser.add_argument(
        "--settle", type=float, default=0, help="then idle this long and read RSS again"
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    sizes = [int(n) for n in args.lines.split(",")]
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        for n in sizes:  # sizes interleaved, so that machine noise hits each
            row = one_round(n, args.nodes, args.concurrency, not args.no_bad, args.settle)
            results[n].append(row)
            print(
                f"round {r + 1} {n:,} lines: upload {row['upload_s']:.2f} s, "
                f"queue {row['queue_s']:.2f} s, run {row['jobs_per_s']:,.0f} jobs/s, "
                f"finalize {row['finalize_s']:.2f} s, download {row['download_s']:.2f} s, "
                f"bad upload {row.get('bad_upload_s', float('nan')):.2f} s, "
                f"RSS {row['rss_before_mib']:.0f} → peak {row['peak_mib']:.0f} "
                f"→ {row['rss_after_mib']:.0f} MiB (input {row['input_mib']:.1f} MiB)",
                flush=True,
            )
    print()
    print(f"{args.nodes} echo nodes x {args.concurrency} slots, {args.rounds} rounds, medians")
    print(table(results))
    if args.json_out:
        out = {"args": vars(args), "rounds": results}
        args.json_out.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
