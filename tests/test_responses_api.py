"""OpenAI's Responses API with the real `openai` SDK against a real server and an echo
node: plain, streamed, chained with previous_response_id, background then retrieved,
deleted, instructions, function tools, and bad input."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from openbeepboop.server.core import responses
from openbeepboop.server.models import Job, JobStatus
from tests.conftest import ServerProcess, cli, free_port
from tests.nodes import echo_model, served, with_node


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server and echo node for the module's tests: each reads only its own responses."""
    with served(tmp_path_factory.mktemp("responses"), [echo_model(token_delay_ms=20)]) as running:
        yield running


@pytest.fixture
def pg_server(postgres: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server on a fresh PostgreSQL database, with an echo node."""
    from tests.pg import temp_database_sync

    with temp_database_sync(postgres) as url:
        env = {"OPENBEEPBOOP_RATE_LIMIT": "", "OPENBEEPBOOP_DATABASE_URL": url}
        data_dir = tmp_path / "pg-server"
        keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json", env=env)
        started = ServerProcess(data_dir, free_port(), keys, env)
        started.start()
        try:
            with with_node(started, tmp_path, [echo_model()]) as running:
                yield running
        finally:
            started.kill(signal.SIGTERM)


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["client_key"])


def _job_request(server: ServerProcess, resp_id: str) -> dict[str, Any]:
    """What the response's job carried: its chat messages, rebuilt from the input items
    (GET /v1/responses/{id}/input_items) and the stored tools."""
    headers = {"Authorization": f"Bearer {server.keys['client_key']}"}
    listed = httpx.get(
        f"{server.url}/v1/responses/{resp_id}/input_items?order=asc", headers=headers
    )
    assert listed.status_code == 200, listed.text
    messages: list[dict[str, Any]] = []
    for item in listed.json()["data"]:
        if item["type"] == "message":
            text = "".join(p["text"] for p in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif item["type"] == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
        else:
            messages.append({"role": "assistant", "call": item["name"]})
    got = httpx.get(f"{server.url}/v1/responses/{resp_id}", headers=headers).json()
    system = [{"role": "system", "content": got["instructions"]}] if got["instructions"] else []
    return {"messages": system + messages, "tools": got["tools"]}


def test_plain_response_and_instructions(server: ServerProcess) -> None:
    client = _client(server)
    response = client.responses.create(
        model="echo",
        input="tell me about the sea",
        instructions="answer like a pirate",
        metadata={"run": "1"},
    )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "tell me about the sea"
    [item] = response.output
    assert item.type == "message" and item.role == "assistant"
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.usage.total_tokens == response.usage.input_tokens + 5
    assert response.instructions == "answer like a pirate"
    assert response.metadata == {"run": "1"}
    messages = _job_request(server, response.id)["messages"]
    assert messages == [
        {"role": "system", "content": "answer like a pirate"},
        {"role": "user", "content": "tell me about the sea"},
    ]
    # the JSON itself validates strictly against the SDK's model (the SDK does not check)
    raw = httpx.post(
        server.url + "/v1/responses",
        json={"model": "echo", "input": "strict", "instructions": "x"},
        headers={"Authorization": f"Bearer {server.keys['client_key']}"},
    )
    assert raw.status_code == 200 and raw.headers["x-openbeepboop-job-id"].startswith("job_")
    assert openai.types.responses.Response.model_validate(raw.json()).output_text == "strict"
    # a list of message items with input_text parts
    listed = client.responses.create(
        model="echo",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}],
        max_output_tokens=1,
    )
    assert listed.output_text == "hello"
    assert listed.status == "incomplete"
    assert listed.incomplete_details is not None
    assert listed.incomplete_details.reason == "max_output_tokens"


def test_streamed_deltas_make_the_final_text(server: ServerProcess) -> None:
    client = _client(server)
    text = "one two three four five six"
    kinds: list[str] = []
    deltas = ""
    final = None
    sequence = []
    for event in client.responses.create(model="echo", input=text, stream=True):
        kinds.append(event.type)
        sequence.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type == "response.completed":
            final = event.response
    assert deltas == text
    assert final is not None and final.output_text == text
    assert sequence == list(range(len(kinds)))
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds.count("response.output_text.delta") >= 2  # pieces, as the node pushed them
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    # every event, as sent, validates strictly against the SDK's event union
    adapter = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    headers = {"Authorization": f"Bearer {server.keys['client_key']}"}
    body = {"model": "echo", "input": "strict events", "stream": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, headers=headers) as sse:
        lines = [line for line in sse.iter_lines() if line]
    named = [line.removeprefix("event: ") for line in lines[::2]]
    events = [adapter.validate_json(line.removeprefix("data: ")) for line in lines[1::2]]
    assert named == [e.type for e in events] and named[-1] == "response.completed"
    # the SDK's stream helper accumulates the same response
    with client.responses.stream(model="echo", input="seven eight") as stream:
        assert stream.get_final_response().output_text == "seven eight"
    # a streamed response is stored like any other
    assert client.responses.retrieve(final.id).output_text == text
    unstored = list(client.responses.create(model="echo", input="x", stream=True, store=False))
    assert unstored[-1].type == "response.completed"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored[-1].response.id)  # type: ignore[union-attr]


def test_chained_with_previous_response_id(server: ServerProcess) -> None:
    client = _client(server)
    first = client.responses.create(model="echo", input="my name is Ada", instructions="be brief")
    second = client.responses.create(
        model="echo", input="what is my name", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert second.output_text == "what is my name"
    # the earlier turns went to the node; the earlier instructions did not
    assert _job_request(server, second.id)["messages"] == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "my name is Ada"},
        {"role": "user", "content": "what is my name"},
    ]
    third = client.responses.create(
        model="echo", input="again", previous_response_id=second.id, instructions="new rules"
    )
    messages = _job_request(server, third.id)["messages"]
    assert messages[0] == {"role": "system", "content": "new rules"}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 2 + ["user"]


def test_on_postgres_chain_stream_and_delete(pg_server: ServerProcess) -> None:
    client = _client(pg_server)
    first = client.responses.create(model="echo", input="first turn", instructions="be brief")
    with client.responses.stream(
        model="echo", input="second turn", previous_response_id=first.id
    ) as stream:
        second = stream.get_final_response()
    assert second.output_text == "second turn"
    assert [m["content"] for m in _job_request(pg_server, second.id)["messages"]] == [
        "first turn",
        "first turn",
        "second turn",
    ]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(second.id).status == "completed"


def test_background_then_retrieve_cancel_and_delete(server: ServerProcess) -> None:
    client = _client(server)
    queued = client.responses.create(model="echo", input="in the background", background=True)
    assert queued.status in ("queued", "in_progress")
    assert queued.background is True
    deadline = time.monotonic() + 10
    got = client.responses.retrieve(queued.id)
    while got.status != "completed" and time.monotonic() < deadline:
        time.sleep(0.05)
        got = client.responses.retrieve(queued.id)
    assert got.status == "completed" and got.output_text == "in the background"
    # Prefer: respond-async asks for the same
    answer = httpx.post(
        server.url + "/v1/responses",
        json={"model": "echo", "input": "later"},
        headers={
            "Authorization": f"Bearer {server.keys['client_key']}",
            "Prefer": "respond-async",
        },
    )
    assert answer.status_code == 200 and answer.json()["status"] in ("queued", "in_progress")
    client.responses.delete(got.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(got.id)
    assert caught.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(got.id)
    # store: false keeps nothing
    gone = client.responses.create(model="echo", input="forget me", store=False)
    assert gone.output_text == "forget me"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(gone.id)
    # another key's response, or a plain job, is not a response
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_0123")
    # a running background response can be cancelled, and then deleted
    long = client.responses.create(model="echo", input="word " * 100, background=True)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    client.responses.delete(long.id)


def test_function_tools_map_to_chat_tools(server: ServerProcess) -> None:
    client = _client(server)
    tool = {
        "type": "function",
        "name": "weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    response = client.responses.create(
        model="echo",
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"role": "user", "content": "thanks"},
        ],
        tools=[tool],  # type: ignore[list-item]
        tool_choice="auto",
    )
    assert response.output_text == "thanks"
    assert response.tools[0].name == "weather"  # type: ignore[union-attr]
    request = _job_request(server, response.id)
    assert request["tools"] == [tool]
    assert request["messages"][1] == {"role": "assistant", "call": "weather"}
    assert request["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    # the SDK's own listing of the input items
    listed = client.responses.input_items.list(response.id, order="asc")
    assert [i.type for i in listed.data] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]


BAD: list[tuple[dict[str, Any], str]] = [
    ({"input": "hi"}, "model"),
    ({"model": "echo"}, "input"),
    ({"model": "echo", "input": []}, "input"),
    ({"model": "echo", "input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
    ({"model": "echo", "input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"model": "echo", "input": "hi", "temperature": 3}, "temperature"),
    ({"model": "echo", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    (
        {"model": "echo", "input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        "input[0].content[0].type",
    ),
    ({"model": "echo", "input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "echo", "input": "hi", "previous_response_id": "resp_x"}, "previous_response_id"),
    ({"model": "echo", "input": "hi", "background": True, "store": False}, "store"),
]


def test_bad_input_is_400_naming_the_param(server: ServerProcess) -> None:
    for body, param in BAD:
        answer = httpx.post(
            server.url + "/v1/responses",
            json=body,
            headers={"Authorization": f"Bearer {server.keys['client_key']}"},
        )
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error" and error["message"]


def test_tool_calls_become_function_call_items() -> None:
    """A chat result with tool calls (as an `openai` or `litellm` node returns it) is a
    Response with function_call items, and a chained request carries them back."""
    result = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_7",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }
    body = {
        "model": "m",
        "input": "weather in Oslo?",
        "tools": [{"type": "function", "name": "weather"}],
    }
    job = Job(
        id="job_abc",
        seq=1,
        owner="k",
        endpoint=responses.ENDPOINT,
        model="m",
        request=responses.chat_body(body, []),
        status=JobStatus.COMPLETED,
        priority=0,
        max_attempts=1,
        attempts=1,
        created_at=1.0,
        finished_at=2.0,
        metadata=responses.job_metadata(body),
        result=result,
    )
    shown = responses.response_object(job)
    assert shown["id"] == "resp_abc" and shown["status"] == "completed"
    assert shown["output"] == [
        {
            "type": "function_call",
            "id": "fc_7",
            "call_id": "call_7",
            "name": "weather",
            "arguments": '{"city":"Oslo"}',
            "status": "completed",
        }
    ]
    assert shown["usage"]["total_tokens"] == 13
    parsed = openai.types.responses.Response.model_validate(shown)
    assert parsed.output[0].type == "function_call"
    assert responses.history(job)[-1]["tool_calls"][0]["id"] == "call_7"
