#!/usr/bin/env python3
"""Embeddings on a node, measured in process (no server): the bundled Gemma 3 270M
through the `llama_cpp` backend (first-job cost of its embedding context, then texts per
second), the `echo` backend's pseudo-embeddings, and the answer's size as JSON floats
against `encoding_format` base64.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_embeddings.py [--texts 200]``
(about a minute on 2 cores; needs the `local` extra for Gemma).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from openbeepboop.node.backends.echo import EchoBackend, EchoModel
from openbeepboop.node.backends.llama_cpp import LlamaCppBackend, LlamaCppModel

SENTENCES = [
    "The sea was calm and the boats stayed in the harbour",
    "A queue hands each job to the first free worker",
    "Write a short note to thank a colleague",
    "The train leaves at seven from platform four",
]


def texts(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} (number {i})" for i in range(n)]


async def one(backend: Any, request: dict[str, Any]) -> dict[str, Any]:
    chunks = [c async for c in backend.execute("/v1/embeddings", request)]
    response: dict[str, Any] = chunks[-1].response
    return response


async def main(n: int) -> None:
    batch = texts(n)
    with tempfile.TemporaryDirectory() as tmp:
        gemma = LlamaCppBackend(LlamaCppModel(name="gemma", backend="llama_cpp"), Path(tmp))
        await gemma.load(lambda state, fraction: None)
        started = time.perf_counter()
        await one(gemma, {"model": "gemma", "input": "warm up"})
        first = time.perf_counter() - started
        started = time.perf_counter()
        floats = await one(gemma, {"model": "gemma", "input": batch})
        spent = time.perf_counter() - started
        packed = await one(gemma, {"model": "gemma", "input": batch, "encoding_format": "base64"})
        await gemma.close()
    tokens = floats["usage"]["prompt_tokens"]
    print(f"gemma first embeddings job (loads its context): {first:.2f} s")
    print(
        f"gemma: {n} texts, {tokens} tokens in {spent:.2f} s = {n / spent:.0f} texts/s, "
        f"{tokens / spent:.0f} tokens/s, {len(floats['data'][0]['embedding'])} dimensions"
    )
    as_floats, as_base64 = len(json.dumps(floats)), len(json.dumps(packed))
    print(f"answer size: floats {as_floats:,} B, base64 {as_base64:,} B")

    echo = EchoBackend(EchoModel(name="echo", backend="echo"))
    await echo.load(lambda state, fraction: None)
    started = time.perf_counter()
    await one(echo, {"model": "echo", "input": batch})
    spent = time.perf_counter() - started
    print(f"echo: {n} texts of 256 dimensions in {spent * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=200)
    asyncio.run(main(parser.parse_args().texts))
