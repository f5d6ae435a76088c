"""Streams carry the whole response: tool calls, every choice of `n`, logprobs, refusals
and finish reasons, whether a node pushed them as they were made, pushed part of them,
or pushed nothing (then they come from the stored result before the stream ends).

The `openai` SDK's own stream accumulator (`chat.completions.stream`) is the judge: what
it assembles from our SSE must equal the stored result, field by field."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai

from openbeepboop.server.core.choices import Tally
from tests.conftest import Api

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "strict": True,  # the SDK's stream helper parses only strict tools
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def lp(token: str) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": -0.5,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": list(token.encode())}],
    }


def call(n: int, city: str) -> dict[str, Any]:
    return {
        "id": f"call_{n}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


RESULT: dict[str, Any] = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "created": 1,
    "model": "echo",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [call(1, "Paris"), call(2, "Oslo")],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Sunny in Paris"},
            "logprobs": {"content": [lp("Sunny"), lp(" in"), lp(" Paris")], "refusal": None},
            "finish_reason": "stop",
        },
        {
            "index": 2,
            "message": {"role": "assistant", "content": None, "refusal": "I cannot say"},
            "logprobs": None,
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17},
}

# what a node pushed live: half of the first tool call, a piece of choice 1 with its
# logprobs; the rest (the second call, the rest of choice 1, choice 2) is only in RESULT
PIECES: list[list[dict[str, Any]]] = [
    [
        {
            "index": 0,
            "delta": {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            },
        }
    ],
    [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city'}}]}}],
    [
        {
            "index": 1,
            "delta": {"role": "assistant", "content": "Sunny"},
            "logprobs": {"content": [lp("Sunny")], "refusal": None},
        }
    ],
]


async def run_node(api: Api, pieces: list[list[dict[str, Any]]], result: dict[str, Any]) -> str:
    """Act as a node: take the job, push `pieces`, submit `result`; the job id."""
    node_id = await api.register(["echo"])
    body = {"node_id": node_id, "models": ["echo"], "wait": 5}
    jobs: list[dict[str, Any]] = []
    while not jobs:
        r = await api.http.post("/internal/queue/fetch", json=body, headers=api.h(api.node))
        jobs = r.json()["jobs"]
    [job] = jobs
    events = [
        {"job_id": job["id"], "lease_id": job["lease_id"], "index": i, "choices": p}
        for i, p in enumerate(pieces)
    ]
    if events:
        r = await api.http.post(
            "/internal/queue/events", json={"events": events}, headers=api.h(api.node)
        )
        assert r.json() == {"accepted": len(events)}
    r = await api.http.post(
        "/internal/queue/submit",
        headers=api.h(api.node),
        json={"results": [{"job_id": job["id"], "lease_id": job["lease_id"], "result": result}]},
    )
    assert r.status_code == 200, r.text
    return str(job["id"])


def sdk(api: Api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://test/v1", api_key=api.client, http_client=api.http, max_retries=0
    )


def same_as_result(final: Any) -> None:
    """What the SDK assembled is the stored result, choice by choice."""
    assert [c.index for c in final.choices] == [0, 1, 2]
    first, second, third = final.choices
    assert first.finish_reason == "tool_calls" and not first.message.content
    assert [
        (t.id, t.function.name, json.loads(t.function.arguments)) for t in first.message.tool_calls
    ] == [
        ("call_1", "get_weather", {"city": "Paris"}),
        ("call_2", "get_weather", {"city": "Oslo"}),
    ]
    assert second.message.content == "Sunny in Paris" and second.finish_reason == "stop"
    assert [t.token for t in second.logprobs.content] == ["Sunny", " in", " Paris"]
    assert second.logprobs.content[0].top_logprobs[0].logprob == -0.5
    assert third.message.refusal == "I cannot say" and third.finish_reason == "stop"
    assert final.usage.completion_tokens == 12


async def test_sdk_assembles_tool_calls_choices_and_logprobs_pushed_in_part(api: Api) -> None:
    node = asyncio.create_task(run_node(api, PIECES, RESULT))
    async with sdk(api).chat.completions.stream(
        model="echo",
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        n=3,
        logprobs=True,
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    await node
    same_as_result(final)


async def test_sdk_assembles_a_result_no_piece_carried(api: Api) -> None:
    node = asyncio.create_task(run_node(api, [], RESULT))
    async with sdk(api).chat.completions.stream(
        model="echo",
        messages=[{"role": "user", "content": "weather?"}],
        n=3,
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    await node
    same_as_result(final)


async def test_chunks_follow_openai_order(api: Api) -> None:
    """One choice a chunk; a choice's role before its content; its finish reason last."""
    node = asyncio.create_task(run_node(api, PIECES, RESULT))
    r = await api.http.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": True},
        headers=api.h(api.client),
    )
    await node
    lines = [x.removeprefix("data: ") for x in r.text.split("\n\n") if x]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    seen: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk" and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        seen.setdefault(choice["index"], []).append(choice)
    for index, choices in seen.items():
        assert choices[0]["delta"].get("role") == "assistant", index
        assert all("role" not in c["delta"] for c in choices[1:]), index
        assert [c["finish_reason"] for c in choices][-1] is not None
        assert all(c["finish_reason"] is None for c in choices[:-1]), index


async def test_job_events_carry_deltas_and_resume_after_any(api: Api) -> None:
    node = asyncio.create_task(run_node(api, PIECES, RESULT))
    r = await api.http.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "x"}]},
        headers=api.h(api.client, Prefer="respond-async"),
    )
    job_id = r.json()["id"]
    await node

    async def events(after: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        headers = api.h(api.client)
        if after is not None:
            headers["Last-Event-ID"] = str(after)
        r = await api.http.get(f"/v1/jobs/{job_id}/events", headers=headers)
        out = []
        for block in r.text.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "id" in fields:
                out.append((int(fields["id"]), json.loads(fields["data"])))
        return out

    whole = await events()
    kinds = [e["type"] for _, e in whole]
    assert kinds[0] == "started" and kinds[-1] == "end"
    deltas = [e for _, e in whole if e["type"] == "delta"]
    tally = Tally(chat=True, roles=False)
    for e in deltas:
        tally.take([e["choice"]])
    # the events carried everything but choice 0's finish reason, which `end` carries
    assert tally.rest(RESULT) == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    ]
    assert whole[-1][1]["stop_reason"] == "TOOL_CALLS"
    calls = [
        c
        for e in deltas
        for c in e["choice"]["delta"].get("tool_calls", [])
        if e["choice"]["index"] == 0
    ]
    assert "".join(c["function"].get("arguments", "") for c in calls) == (
        '{"city": "Paris"}{"city": "Oslo"}'
    )
    for after, _ in whole[:-1]:  # resumed after any event: exactly the events after it
        assert await events(after) == [e for e in whole if e[0] > after]


def test_tally_completes_text_completions_with_logprobs() -> None:
    result = {
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "abc def",
                "logprobs": {"tokens": ["abc", " def"], "token_logprobs": [-1.0, -2.0]},
                "finish_reason": "length",
            },
            {"index": 1, "text": "xyz", "logprobs": None, "finish_reason": "stop"},
        ],
    }
    tally = Tally(chat=False)
    sent = tally.take("abc")
    assert sent == [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": None}]
    assert tally.rest(result) == [
        {
            "index": 0,
            "text": " def",
            "logprobs": {"tokens": ["abc", " def"], "token_logprobs": [-1.0, -2.0]},
            "finish_reason": None,
        },
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"},
        {"index": 1, "text": "xyz", "logprobs": None, "finish_reason": None},
        {"index": 1, "text": "", "logprobs": None, "finish_reason": "stop"},
    ]


def test_tally_takes_nothing_back_and_drops_malformed_choices() -> None:
    tally = Tally(chat=True)
    tally.mark_role(0)
    assert tally.take([{"index": "0"}, "junk", {"index": 999}]) == []  # type: ignore[list-item]
    tally.take("Hello wor")
    # the stored text says something else (the job ran again): nothing is taken back or
    # repeated, the stream just ends with the finish reason
    result = {"choices": [{"index": 0, "message": {"content": "Goodbye"}, "finish_reason": "stop"}]}
    assert tally.rest(result) == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert tally.rest(result) == []  # once
