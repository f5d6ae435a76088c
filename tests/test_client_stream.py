"""Streaming in the client library (`job.stream()`, `async for` on a job) and on the shell
(`openbeepboop-client submit ... --stream`), against a real server and a real echo node
that makes one word every 80 ms: the text must arrive as it is made, not at the end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from openbeepboop.client import AsyncClient, Client, JobFailedError
from tests.conftest import ServerProcess
from tests.nodes import (
    echo_model,
    served,
)

WORDS = [f"word{i}" for i in range(20)]
PROMPT = " ".join(WORDS)


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server and echo node for the module's tests: each reads only its own jobs."""
    models = [echo_model(token_delay_ms=80)]
    with served(tmp_path_factory.mktemp("client-stream"), models) as server:
        yield server


def chat(text: str) -> dict[str, object]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}]}


def test_sync_job_stream_yields_text_as_it_is_made(slow_server: ServerProcess) -> None:
    with Client(slow_server.url, slow_server.keys["client_key"]) as client:
        job = client.chat.completions.create(**chat(PROMPT))
        start = time.monotonic()
        pieces, times = [], []
        for piece in job.stream():
            pieces.append(piece)
            times.append(time.monotonic() - start)
        assert "".join(pieces) == PROMPT
        assert len(pieces) >= 10
        assert times[-1] - times[0] > 0.8  # spread over the ~1.6 s of generation
        assert job.done and job.status == "completed"
        types = [e["type"] for e in client.jobs.get(job.id).events()]
        assert types[0] == "started" and types[-1] == "end"

        doomed = client.chat.completions.create(**chat(PROMPT))
        stream = doomed.stream()
        next(stream)
        doomed.cancel()
        with pytest.raises(JobFailedError):
            list(stream)


def test_async_for_on_a_job(slow_server: ServerProcess) -> None:
    async def main() -> list[str]:
        async with AsyncClient(slow_server.url, slow_server.keys["client_key"]) as client:
            job = await client.chat.completions.create(**chat("a b c d e"))
            return [piece async for piece in job]

    assert "".join(asyncio.run(main())) == "a b c d e"


def test_cli_stream_prints_tokens_as_they_arrive(slow_server: ServerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    env.update(
        OPENBEEPBOOP_BASE_URL=slow_server.url,
        OPENBEEPBOOP_API_KEY=slow_server.keys["client_key"],
        PYTHONUNBUFFERED="1",
    )
    prompt = " ".join(f"w{i}" for i in range(40))  # ~3.2 s: more than the CLI's start-up
    argv = [sys.executable, "-m", "openbeepboop.cli.client", "submit", prompt, "-m", "echo"]
    arrivals: list[tuple[float, bytes]] = []
    with subprocess.Popen(
        [*argv, "--stream"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        start = time.monotonic()
        while chunk := os.read(proc.stdout.fileno(), 4096):
            arrivals.append((time.monotonic() - start, chunk))
        proc.wait(timeout=30)
        err = proc.stderr.read().decode()
    assert proc.returncode == 0, err
    out = b"".join(c for _, c in arrivals).decode()
    assert out.strip() == prompt
    # the words reach the shell over time, not in one piece at the end
    assert len(arrivals) >= 5
    assert arrivals[-1][0] - arrivals[0][0] > 1.0
    summary = err.strip().splitlines()[-1]
    assert "40 tokens in" in summary and "tokens/s" in summary
