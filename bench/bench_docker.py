#!/usr/bin/env python3
"""The container image: how long it takes to build, how big it is, how fast it starts.

Steps, each timed on this machine's Docker engine (no registry: the base image is made
with debootstrap, docker/base-image.sh):
- `base`: the base image made anew (debootstrap bookworm + docker import);
- `cold`: docker/build.sh with the builder's cache emptied (`docker builder prune -af`),
  reusing the llama.cpp wheel pip built for .venv, as `make test-docker` does;
- `cold-no-wheel` (with `--no-wheel`): the same, compiling llama.cpp in the build;
- `again`: a second build with nothing changed (every layer cached);
- the image's size, and a `docker run` of the all-in-one: seconds until its
  HEALTHCHECK passes, and the first chat answer of the bundled Gemma.

Run (as root, with an engine running): ``python3 bench/bench_docker.py``
(``--skip-no-wheel`` leaves out the slow compile). It empties the builder's cache: do not
run it beside `make test-docker`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "openbeepboop-base:bookworm"
TAG = "openbeepboop:bench"


def run(*cmd: str, timeout: float = 3600) -> float:
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def cold_build(*extra: str) -> float:
    subprocess.run(["docker", "rmi", "-f", TAG], capture_output=True)
    run("docker", "builder", "prune", "-af")
    return run("bash", "docker/build.sh", "--base", BASE, "-t", TAG, *extra)


def start_and_answer(port: int) -> tuple[float, float]:
    name = f"obb-bench-{os.getpid()}"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    started = time.monotonic()
    out("docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", TAG)
    try:
        while out("docker", "inspect", "-f", "{{.State.Health.Status}}", name) != "healthy":
            if time.monotonic() - started > 180:
                sys.exit("the container did not become healthy in 180 s")
            time.sleep(0.2)
        healthy = time.monotonic() - started
        key = out("docker", "exec", name, "cat", "/data/client.key")
        body = {
            "model": "gemma-3-270m",
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            json.load(answer)
        return healthy, time.monotonic() - started
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-no-wheel", action="store_true")
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()

    figures: dict[str, float | str] = {
        "engine": out("docker", "version", "-f", "{{.Server.Version}}")
    }
    subprocess.run(["docker", "rmi", "-f", BASE], capture_output=True)
    figures["base_s"] = run("bash", "docker/base-image.sh", BASE)
    if not args.skip_no_wheel:
        figures["cold_no_wheel_s"] = cold_build("--no-wheel")
    figures["cold_s"] = cold_build()
    figures["again_s"] = run("bash", "docker/build.sh", "--base", BASE, "-t", TAG)
    figures["image_mb"] = int(out("docker", "image", "inspect", "-f", "{{.Size}}", TAG)) / 1e6
    figures["healthy_s"], figures["first_answer_s"] = start_and_answer(args.port)
    for name, value in figures.items():
        print(f"{name:>16}  {value:.1f}" if isinstance(value, float) else f"{name:>16}  {value}")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "docker.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
