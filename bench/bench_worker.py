#!/usr/bin/env python3
"""Tokens/s of the bundled Gemma 3 270M through a worker process (node/worker.py, how a
node runs llama.cpp models by default) against the same backend in-process, in one run.

Both run the node's `llama_cpp` backend on the same model, prompts, seed and settings
(so both generate the same tokens), every piece streamed back as the node reads it: the
worker's pieces cross a pipe as JSON lines. Rounds alternate (in-process, worker,
in-process, ...) so machine noise hits both; the figure is the median tokens/s of each
side and their ratio. Target: worker / in-process >= 0.97.

Run: ``python3 bench/bench_worker.py`` (``--rounds 6 --max-tokens 128`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from openbeepboop.node.backends.base import Backend
from openbeepboop.node.backends.llama_cpp import LlamaCppBackend, LlamaCppModel
from openbeepboop.node.worker import WorkerBackend

PROMPTS = [
    "Once upon a time, in a village by the sea,",
    "The history of the bicycle begins",
    "Here are five ideas for a rainy afternoon:",
    "The most important thing about learning to cook is",
]


async def one_round(backend: Backend, max_tokens: int) -> tuple[int, float]:
    """Every prompt once: (completion tokens, seconds)."""
    tokens, started = 0, time.perf_counter()
    for prompt in PROMPTS:
        request = {
            "model": "gemma",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 7,
            "stream": True,
        }
        async for chunk in backend.execute("/v1/completions", request):
            if chunk.usage:
                tokens += int(chunk.usage.get("completion_tokens") or 0)
    return tokens, time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    models_dir = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    config = LlamaCppModel(name="gemma", backend="llama_cpp", n_ctx=1024)
    inline: Backend = LlamaCppBackend(config, models_dir)
    worker: Backend = WorkerBackend(config, models_dir)
    for backend in (inline, worker):
        await backend.load(lambda state, fraction: None)
    rates: dict[str, list[float]] = {"in-process": [], "worker": []}
    try:
        for backend in (inline, worker):
            await one_round(backend, 16)  # warm-up
        for _ in range(args.rounds):
            for side, backend in (("in-process", inline), ("worker", worker)):
                tokens, seconds = await one_round(backend, args.max_tokens)
                rates[side].append(tokens / seconds)
    finally:
        for backend in (inline, worker):
            await backend.close()
    load = os.getloadavg()
    print(
        f"`bench/bench_worker.py --rounds {args.rounds} --max-tokens {args.max_tokens}`, "
        f"{len(PROMPTS)} prompts a round, load {load[0]:.2f}"
    )
    print()
    print("| side | tokens/s per round | median |")
    print("|---|---|---|")
    medians: dict[str, Any] = {}
    for side, values in rates.items():
        medians[side] = statistics.median(values)
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {side} | {shown} | **{medians[side]:.1f}** |")
    ratio = medians["worker"] / medians["in-process"]
    paired = [w / i for w, i in zip(rates["worker"], rates["in-process"], strict=True)]
    print()
    verdict = "met" if ratio >= 0.97 else "missed"
    print(f"worker / in-process = **{ratio:.3f}** (target >= 0.97: {verdict})")
    shown = ", ".join(f"{r:.3f}" for r in paired)
    print(f"round by round: {shown} (median {statistics.median(paired):.3f})")


if __name__ == "__main__":
    asyncio.run(main())
