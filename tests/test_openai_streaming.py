"""Streaming through the queue with the official `openai` SDK: a real server and a real
echo node that streams word by word; the node pushes token deltas, the server fans them
out as `chat.completion.chunk` SSE."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ServerProcess
from tests.nodes import (
    echo_model,
    served,
)

PROMPT = "one two three four five six seven eight"


@pytest.fixture(scope="module")
def streaming_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server and echo node for the module's tests: each reads only its own answers."""
    models = [echo_model(token_delay_ms=120)]
    with served(tmp_path_factory.mktemp("streaming"), models) as server:
        yield server


def test_sdk_streams_chunks_as_they_are_made(streaming_server: ServerProcess) -> None:
    client = openai.OpenAI(
        base_url=streaming_server.url + "/v1", api_key=streaming_server.keys["client_key"]
    )
    stream = client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, text, finish, usage = [], "", None, None
    start = time.monotonic()
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                arrivals.append(time.monotonic() - start)
            finish = choice.finish_reason or finish
    assert text == PROMPT
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 8
    # live, not all at the end: the words come over about a second
    assert len(arrivals) >= 4
    assert arrivals[-1] - arrivals[0] > 0.4


def test_sdk_plain_completion_and_errors(streaming_server: ServerProcess) -> None:
    client = openai.OpenAI(
        base_url=streaming_server.url + "/v1",
        api_key=streaming_server.keys["client_key"],
        max_retries=0,
    )
    chat = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}]
    )
    assert chat.choices[0].message.content == "hello there"
    text = client.completions.create(model="echo", prompt="abc def")
    assert text.choices[0].text == "abc def"
    assert [m.id for m in client.models.list()] == ["echo"]
    assert client.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody-serves-this")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=streaming_server.url + "/v1", api_key="obb_client_" + "x" * 43, max_retries=0
        ).models.list()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="echo", messages=[])


def test_sdk_streams_a_text_completion(streaming_server: ServerProcess) -> None:
    client = openai.OpenAI(
        base_url=streaming_server.url + "/v1", api_key=streaming_server.keys["client_key"]
    )
    stream = client.completions.create(
        model="echo", prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    arrivals, text, finish, usage = [], "", None, None
    start = time.monotonic()
    for chunk in stream:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.text:
                text += choice.text
                arrivals.append(time.monotonic() - start)
            finish = choice.finish_reason or finish
    assert text == PROMPT
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 8
    assert len(arrivals) >= 4 and arrivals[-1] - arrivals[0] > 0.4  # live, word by word
