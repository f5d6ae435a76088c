"""The Batch API with the official `openai` SDK (sync and async) against a real server and
a real echo node: upload, create, follow until done, read the output and error files,
cancel with partial results; and what the SDK raises for bad input."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ServerProcess
from tests.nodes import (
    Procs,
    echo_model,
    node_id_of,
    served,
    start_node,
    write_config,
)


def batch_lines(n: int, url: str = "/v1/chat/completions", model: str = "echo") -> bytes:
    out = []
    for i in range(n):
        if url == "/v1/chat/completions":
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": f"line number {i}"}],
            }
        else:
            body = {"model": model, "prompt": f"line number {i}"}
        out.append(
            json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
        )
    return ("\n".join(out) + "\n").encode()


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server and echo node for the module's tests: each follows only its own batch."""
    with served(tmp_path_factory.mktemp("batches"), [echo_model(delay_ms=20)]) as server:
        yield server


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=server.keys["client_key"], max_retries=0
    )


def wait_final(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s")


def test_sdk_batch_flow_end_to_end(batch_server: ServerProcess) -> None:
    client = sdk(batch_server)
    upload = client.files.create(file=("in.jsonl", batch_lines(30)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(batch_lines(30))
    assert client.files.retrieve(upload.id).filename == "in.jsonl"
    assert client.files.content(upload.id).content == batch_lines(30)

    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "nightly"},
    )
    assert batch.status == "validating"
    assert batch.metadata == {"run": "nightly"}
    done = wait_final(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (30, 30)
    assert done.request_counts.failed == 0
    assert done.completed_at and done.in_progress_at and done.finalizing_at
    assert done.error_file_id is None and done.output_file_id is not None
    assert done.usage is not None and done.usage.output_tokens == 30 * 3

    output = client.files.content(done.output_file_id).text
    rows = [json.loads(line) for line in output.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"req-{i}" for i in range(30))
    for row in rows:
        assert row["error"] is None
        assert row["response"]["status_code"] == 200
        body = row["response"]["body"]
        n = row["custom_id"].removeprefix("req-")
        assert body["choices"][0]["message"]["content"] == f"line number {n}"
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes == len(output.encode())

    assert batch.id in [b.id for b in client.batches.list()]
    assert {upload.id, done.output_file_id} <= {f.id for f in client.files.list()}
    assert client.files.delete(upload.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)


def test_sdk_batch_cancel_keeps_partial_results(
    server_process: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_process()
    procs = Procs()
    config = write_config(tmp_path / "node.toml", server, [echo_model(delay_ms=150)])
    try:
        node_id_of(start_node(procs, config))
        client = sdk(server)
        upload = client.files.create(
            file=("in.jsonl", batch_lines(40, "/v1/completions")), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while client.batches.retrieve(batch.id).request_counts.completed < 3:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = wait_final(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at
        counts = done.request_counts
        assert counts is not None and counts.total == 40
        assert 3 <= counts.completed < 40
        assert counts.completed + counts.failed == 40
        ok = client.files.content(done.output_file_id).text.splitlines()  # type: ignore[arg-type]
        bad = client.files.content(done.error_file_id).text.splitlines()  # type: ignore[arg-type]
        assert len(ok) == counts.completed and len(bad) == counts.failed
        assert {json.loads(b)["error"]["code"] for b in bad} == {"batch_cancelled"}
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(_completed_batch(client))
    finally:
        procs.close()


def _completed_batch(client: openai.OpenAI) -> str:
    upload = client.files.create(file=("one.jsonl", batch_lines(1)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return str(wait_final(client, batch.id).id)


def test_sdk_bad_input_raises_typed_errors(batch_server: ServerProcess) -> None:
    client = sdk(batch_server)
    bad = batch_lines(3).replace(b'"messages"', b'"mesages"', 1)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", bad), purpose="batch")
    assert "line 1" in caught.value.message and "messages" in caught.value.message
    dup = batch_lines(2).replace(b"req-1", b"req-0")
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("dup.jsonl", dup), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="line 2: not valid JSON"):
        client.files.create(file=("j.jsonl", batch_lines(1) + b"{oops\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", batch_lines(1)), purpose="nonsense")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    upload = client.files.create(file=("in.jsonl", batch_lines(2)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/moderations", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="soon",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=batch_server.url + "/v1", api_key="obb_client_" + "x" * 43, max_retries=0
        ).files.list()
    # A file whose lines name another endpoint than the batch's: the batch fails, naming it.
    mixed = client.files.create(
        file=("c.jsonl", batch_lines(2, "/v1/completions")), purpose="batch"
    )
    failed = wait_final(
        client,
        client.batches.create(
            input_file_id=mixed.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert failed.status == "failed" and failed.errors is not None
    assert failed.errors.data and failed.errors.data[0].line == 1
    assert failed.errors.data[0].code == "mismatched_endpoint"


def test_async_sdk_batch_flow_and_streaming(batch_server: ServerProcess) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(
            base_url=batch_server.url + "/v1",
            api_key=batch_server.keys["client_key"],
            max_retries=0,
        )
        upload = await client.files.create(
            file=("a.jsonl", io.BytesIO(batch_lines(10, "/v1/completions"))), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="1h"
        )
        for _ in range(300):
            batch = await client.batches.retrieve(batch.id)
            if batch.status == "completed":
                break
            await asyncio.sleep(0.1)
        assert batch.status == "completed"
        content = await client.files.content(batch.output_file_id)  # type: ignore[arg-type]
        texts = {
            json.loads(line)["response"]["body"]["choices"][0]["text"]
            for line in content.text.splitlines()
        }
        assert texts == {f"line number {i}" for i in range(10)}

        chat = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "async hello"}]
        )
        assert chat.choices[0].message.content == "async hello"
        stream = await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "a b c d"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert text == "a b c d" and usage is not None and usage.completion_tokens == 4
        completion = await client.completions.create(model="echo", prompt="x y")
        assert completion.choices[0].text == "x y"
        assert [m.id async for m in client.models.list()] == ["echo"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="echo", messages=[])
        await client.close()

    asyncio.run(main())


def test_sdk_batch_past_its_window_expires_with_an_error_file(batch_server: ServerProcess) -> None:
    client = sdk(batch_server)
    lines = batch_lines(2) + batch_lines(1, model="nobody-serves-this").replace(
        b"req-0", b"req-late"
    )
    upload = client.files.create(file=("w.jsonl", lines), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="2s",  # type: ignore[arg-type]
    )
    done = wait_final(client, batch.id, timeout=30)
    assert done.status == "expired" and done.expired_at
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    [late] = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]  # type: ignore[arg-type]
    assert late["custom_id"] == "req-late" and late["error"]["code"] == "batch_expired"
    assert late["response"] is None


def test_sdk_batch_naming_a_missing_template_fails_naming_the_line(
    batch_server: ServerProcess,
) -> None:
    client = sdk(batch_server)
    missing = {"template": "nobody-made-this", "query": "hi"}
    lines = batch_lines(2) + (
        json.dumps(
            {"custom_id": "t", "method": "POST", "url": "/v1/chat/completions", "body": missing}
        ).encode()
        + b"\n"
    )
    upload = client.files.create(file=("t.jsonl", lines), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_final(client, batch.id)
    assert failed.status == "failed" and failed.errors is not None
    [error] = failed.errors.data
    assert error.code == "template_not_found" and "line 3" in (error.message or "")


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ([b"a\nb", b"c\n", b"\nd"], [(1, b"a"), (2, b"bc"), (4, b"d")]),
        ([b"ab", b"cd", b"e\nf\n"], [(1, b"abcde"), (2, b"f")]),
        ([b"x"], [(1, b"x")]),
        ([b"", b"\n\n"], []),
    ],
)
def test_lines_are_split_across_chunk_boundaries(
    parts: list[bytes], expected: list[tuple[int, bytes]]
) -> None:
    from openbeepboop.server.core.files import lines_of

    async def chunks() -> Any:
        for part in parts:
            yield part

    async def collect() -> list[tuple[int, bytes]]:
        return [line async for line in lines_of(chunks())]

    assert asyncio.run(collect()) == expected
