"""Clients nobody on the project wrote, each used as its own docs say, against a real
server whose node serves the OpenAI mock (tests/mock_openai.py) through the `openai`
backend (model `cl-oa`) and the `litellm` backend (model `cl-lite`, LiteLLM's
`openai/cl-lite` with `api_base`).

- The `openai` SDK: streamed tool calls, `n=2` and logprobs, assembled with the SDK's own
  `ChatCompletionStreamState`, compared field by field with the same request sent to the
  mock directly, for both backends; the chunk sequence has OpenAI's shape; non-streamed
  answers compared the same way.
- LangChain `ChatOpenAI(...).bind_tools([...]).stream(...)`, LiteLLM as a client
  (`litellm.completion(..., stream=True, tools=...)`), instructor `create_partial`,
  pydantic-ai `Agent.run_stream` with structured output, and the `llm` CLI with `-T` (it
  streams unless told `--no-stream`).

Every test also runs against the mock called directly (`direct`): the same assertions
hold there, so a failure through the server is the server's. One server, one node and
one mock serve the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel

from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    MockOpenAI,
    Proc,
    Procs,
    child_env,
    new_server,
    node_id_of,
    start_node,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]

PROVIDER_KEY = "sk-mock-provider-key"
PROMPT = "Ada Lovelace wrote the first program"


class Person(BaseModel):
    """The structured answer asked for: the mock fills strings with the user text and
    integers with its word count."""

    name: str
    age: int


EXPECTED = Person(name=PROMPT, age=len(PROMPT.split()))
PERSON_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "record_person",
        "description": "Record a person.",
        "parameters": Person.model_json_schema(),
    },
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


@dataclass
class Rig:
    server: ServerProcess
    node: Proc
    mock: MockOpenAI
    tmp: Path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("clients")
    procs = Procs()
    server = new_server(tmp / "server")
    try:
        mock = MockOpenAI(procs, tmp / "mock")
        common = {"api_key": PROVIDER_KEY, "concurrency": 4, "timeout_seconds": 30}
        models = [
            {"name": "cl-oa", "backend": "openai", "api_base": mock.url + "/v1", **common},
            {
                "name": "cl-lite",
                "backend": "litellm",
                "model": "openai/cl-lite",
                "api_base": mock.url + "/v1",
                **common,
            },
        ]
        config = write_config(tmp / "node" / "node.toml", server, models)
        node = start_node(procs, config)
        node_id_of(node, timeout=60)  # LiteLLM is slow to import
        yield Rig(server, node, mock, tmp)
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


@dataclass
class Target:
    """Where a client sends its requests: the mock itself, or our server."""

    name: str
    base_url: str
    api_key: str


def target_for(rig: Rig, where: str) -> Target:
    if where == "direct":
        return Target("direct", rig.mock.url + "/v1", PROVIDER_KEY)
    return Target(where, rig.server.url + "/v1", rig.server.keys["client_key"])


@pytest.fixture(params=["direct", "server"])
def target(request: pytest.FixtureRequest, rig: Rig) -> Target:
    assert rig.node.alive(), rig.node.stderr()
    return target_for(rig, str(request.param))


@pytest.fixture(scope="module")
def direct_sdk(rig: Rig) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=rig.mock.url + "/v1", api_key=PROVIDER_KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def server_sdk(rig: Rig) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=rig.server.url + "/v1",
        api_key=rig.server.keys["client_key"],
        max_retries=0,
        timeout=30,
    ) as client:
        yield client


# -- the openai SDK, compared with the mock called directly ------------------------------

REQUESTS: dict[str, dict[str, Any]] = {
    "tools": {"tools": [WEATHER_TOOL, PERSON_TOOL]},
    "tool_choice": {
        "tools": [WEATHER_TOOL, PERSON_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "record_person"}},
    },
    "n2": {"n": 2},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "n2_tools_logprobs": {"n": 2, "tools": [WEATHER_TOOL], "logprobs": True},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema()},
        }
    },
}

# Fields that differ between two answers to the same request, whoever serves them:
# `id` and `created` name and date each answer (our server answers with its job's id),
# tool call ids are minted per answer (`call_...`), and `system_fingerprint` names the
# serving configuration (the provider's, or none when our server gives its own). Each
# is still checked to be there and well formed. A field that is null counts as absent
# (the SDK reads both as None), and so do usage details that count nothing (LiteLLM adds
# `completion_tokens_details: {"reasoning_tokens": 0}` to the usage it streams; OpenAI
# sends such zeros too). Everything else must be equal.
EXEMPT_TOP = ("id", "created", "system_fingerprint")
USAGE_DETAILS = ("completion_tokens_details", "prompt_tokens_details")


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def comparable(completion: BaseModel) -> dict[str, Any]:
    data = completion.model_dump()
    assert isinstance(data["id"], str) and data["id"], data
    assert isinstance(data["created"], int) and data["created"] > 0, data
    for key in EXEMPT_TOP:
        data.pop(key, None)
    for choice in data["choices"]:
        for call in choice["message"].get("tool_calls") or []:
            assert isinstance(call["id"], str) and call["id"].startswith("call_"), call
            call["id"] = "call_*"
    usage = data.get("usage") or {}
    for key in USAGE_DETAILS:
        if not any((usage.get(key) or {}).values()):
            usage.pop(key, None)
    return dict(without_nulls(data))


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where `got` differs from `want`, one line per differing leaf."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [
            line
            for key in sorted(set(got) | set(want), key=str)
            for line in differences(got.get(key), want.get(key), f"{path}.{key}")
        ]
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [
            line
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for line in differences(g, w, f"{path}[{i}]")
        ]
    return [] if got == want else [f"{path or '.'}: got {got!r}, want {want!r}"]


def stream_chunks(client: openai.OpenAI, model: str, extra: dict[str, Any]) -> list[Any]:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    with stream:
        return list(stream)


def assembled(chunks: list[ChatCompletionChunk], extra: dict[str, Any]) -> BaseModel:
    """The stream assembled by the SDK's own accumulator."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(
        input_tools=extra.get("tools", openai.omit)
    )
    for chunk in chunks:
        list(state.handle_chunk(chunk))
    return state.get_final_completion()


def check_shape(chunks: list[ChatCompletionChunk], model: str, n: int) -> None:
    """OpenAI's chunk sequence: one id and model throughout, choice 0 first; per choice
    index a role chunk first, exactly one finish chunk and nothing after it; a tool call's
    first delta names its id, type and function, later ones only add argument text;
    logprobs tokens spell the content they come with; the usage chunk last, with no
    choices."""
    assert chunks, "an empty stream"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {model}
    # the SDK's accumulator sizes its choices from the first chunk: it must open choice 0
    assert [c.index for c in chunks[0].choices] == [0], chunks[0]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None, last
    assert all(c.usage is None for c in body), [c.usage for c in body]
    per_index: dict[int, list[Any]] = {}
    for chunk in body:
        for choice in chunk.choices:
            per_index.setdefault(choice.index, []).append(choice)
    assert sorted(per_index) == list(range(n)), sorted(per_index)
    for index, parts in per_index.items():
        assert parts[0].delta.role == "assistant", (index, parts[0])
        finished = [i for i, p in enumerate(parts) if p.finish_reason is not None]
        assert finished == [len(parts) - 1], (index, [p.finish_reason for p in parts])
        named: set[int] = set()
        for part in parts:
            for call in part.delta.tool_calls or []:
                if call.index not in named:
                    assert call.id and call.type == "function", call
                    assert call.function and call.function.name, call
                    named.add(call.index)
                else:
                    assert call.id is None and call.function and not call.function.name, call
            if part.logprobs is not None and part.logprobs.content:
                tokens = "".join(e.token for e in part.logprobs.content)
                assert tokens == part.delta.content, (tokens, part.delta.content)


@pytest.mark.parametrize("kind", sorted(REQUESTS))
@pytest.mark.parametrize("where", ["direct", "cl-oa", "cl-lite"])
def test_openai_sdk_stream_matches_the_provider(
    rig: Rig,
    direct_sdk: openai.OpenAI,
    server_sdk: openai.OpenAI,
    where: str,
    kind: str,
) -> None:
    extra = REQUESTS[kind]
    model = "cl-oa" if where == "direct" else where
    client = direct_sdk if where == "direct" else server_sdk
    got = stream_chunks(client, model, extra)
    want = stream_chunks(direct_sdk, model, extra)
    check_shape(want, model, extra.get("n", 1))  # the mock itself streams as OpenAI does
    check_shape(got, model, extra.get("n", 1))
    diff = differences(comparable(assembled(got, extra)), comparable(assembled(want, extra)))
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("kind", sorted(REQUESTS))
@pytest.mark.parametrize("where", ["direct", "cl-oa", "cl-lite"])
def test_openai_sdk_answer_matches_the_provider(
    rig: Rig,
    direct_sdk: openai.OpenAI,
    server_sdk: openai.OpenAI,
    where: str,
    kind: str,
) -> None:
    extra = REQUESTS[kind]
    model = "cl-oa" if where == "direct" else where
    client = direct_sdk if where == "direct" else server_sdk
    messages: Any = [{"role": "user", "content": PROMPT}]
    got = client.chat.completions.create(model=model, messages=messages, **extra)
    want = direct_sdk.chat.completions.create(model=model, messages=messages, **extra)
    diff = differences(comparable(got), comparable(want))
    assert not diff, "\n".join(diff)


def test_mock_answers_what_the_clients_expect(direct_sdk: openai.OpenAI) -> None:
    """What the tests below rely on: the mock's tool call for Person encodes EXPECTED."""
    answer = direct_sdk.chat.completions.create(
        model="cl-oa",
        messages=[{"role": "user", "content": PROMPT}],
        tools=[PERSON_TOOL],  # type: ignore[list-item]
    )
    call = (answer.choices[0].message.tool_calls or [])[0]
    assert call.type == "function" and call.function.name == "record_person"
    assert Person.model_validate_json(call.function.arguments) == EXPECTED
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.content is None


# -- LangChain, LiteLLM, instructor, pydantic-ai, llm -------------------------------------


def test_langchain_bind_tools_stream(target: Target) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model="cl-oa", base_url=target.base_url, api_key=target.api_key, max_retries=0
    )
    total: Any = None
    count = 0
    for chunk in chat.bind_tools([Person]).stream(PROMPT):
        total = chunk if total is None else total + chunk
        count += 1
    assert count >= 2, count
    assert [c["name"] for c in total.tool_calls] == ["Person"], total
    assert Person.model_validate(total.tool_calls[0]["args"]) == EXPECTED
    assert total.tool_calls[0]["id"].startswith("call_")
    assert total.response_metadata.get("finish_reason") == "tool_calls", total


@contextlib.contextmanager
def a_loop_for_litellm() -> Iterator[None]:
    """LiteLLM's synchronous `completion` calls `asyncio.get_event_loop()`, which makes
    a loop the thread's current one when there is none, and never closes it (the next
    async test replaces it and it is collected unclosed: a ResourceWarning, an error
    here). Give it one of ours, closed after."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_litellm_client_streamed_tool_calls(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    import litellm

    with a_loop_for_litellm():
        stream = litellm.completion(
            model="openai/cl-oa",
            api_base=target.base_url,
            api_key=target.api_key,
            messages=[{"role": "user", "content": PROMPT}],
            tools=[PERSON_TOOL],
            stream=True,
            num_retries=0,
        )
        chunks = list(stream)
        built: Any = litellm.stream_chunk_builder(chunks)
    fragments = [
        call.function.arguments
        for chunk in chunks
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
        if call.function and call.function.arguments
    ]
    assert fragments, [c.model_dump() for c in chunks]
    calls = built.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "record_person", built
    assert Person.model_validate_json(calls[0].function.arguments) == EXPECTED
    assert Person.model_validate_json("".join(fragments)) == EXPECTED
    assert built.choices[0].finish_reason == "tool_calls"


def test_instructor_create_partial(target: Target) -> None:
    import instructor

    with openai.OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=0) as oa:
        client = instructor.from_openai(oa, mode=instructor.Mode.TOOLS)
        partials = list(
            client.chat.completions.create_partial(
                model="cl-oa",
                response_model=Person,
                messages=[{"role": "user", "content": PROMPT}],
                max_retries=0,
            )
        )
    assert partials, "create_partial yielded nothing"
    assert Person.model_validate(partials[-1].model_dump()) == EXPECTED
    if target.name == "direct":
        # the mock sends the arguments in 8-character fragments: incomplete objects first
        # (our server may join fragments that arrive together; the end is what counts)
        assert any(p.model_dump() != EXPECTED.model_dump() for p in partials[:-1]), partials


async def test_pydantic_ai_run_stream(target: Target) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=target.base_url, api_key=target.api_key)
    agent = Agent(OpenAIChatModel("cl-oa", provider=provider), output_type=Person, retries=0)
    async with agent.run_stream(PROMPT) as result:
        outputs = [output async for output in result.stream_output()]
        final = await result.get_output()
    assert final == EXPECTED
    assert outputs and outputs[-1] == EXPECTED, outputs


def test_llm_cli_tools_stream(rig: Rig, target: Target, tmp_path: Path) -> None:
    """`llm` with an OpenAI-compatible model from extra-openai-models.yaml, its key
    stored with `llm keys set`, run with a tool (`-T llm_version`) and `--td` (tool debug):
    the tool call made, its result sent back, the model's final answer printed."""
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        "- model_id: obb\n"
        "  model_name: cl-oa\n"
        f"  api_base: {target.base_url}\n"
        "  api_key_name: obb\n"
        "  supports_tools: true\n"
    )
    llm = str(Path(sys.executable).with_name("llm"))
    env = child_env(LLM_USER_PATH=str(home))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [llm, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    keys = run("keys", "set", "obb", "--value", target.api_key)
    assert keys.returncode == 0, keys.stderr
    done = run("-m", "obb", "-T", "llm_version", "--td", "Which version of llm is this?")
    assert done.returncode == 0, done.stderr
    version = importlib.metadata.version("llm")
    # --td prints the tool call and its result on stderr; the answer after the tool's
    # result goes to stdout (the mock answers with the result's text)
    assert "Tool call: llm_version({})" in done.stderr, (done.stdout, done.stderr)
    assert f"Tool call: llm_version({{}})\n  {version}\n" in done.stderr, done.stderr
    assert done.stdout.strip() == version, (done.stdout, done.stderr)
    # what reached the provider: the question with the tool, then the tool's result, both
    # streamed (llm streams; through the server the node always streams upstream)
    asked = [
        r["body"]
        for r in rig.mock.requests()
        if any(t["function"]["name"] == "llm_version" for t in r["body"].get("tools") or [])
    ][-2:]
    assert [b["stream"] for b in asked] == [True, True], asked
    assert [b["messages"][-1]["role"] for b in asked] == ["user", "tool"], asked


@pytest.mark.parametrize("model", ["cl-oa", "cl-lite"])
def test_openai_sdk_responses_against_a_provider(
    rig: Rig, server_sdk: openai.OpenAI, model: str
) -> None:
    """`responses.create` through a node whose provider has only chat completions:
    plain, streamed (typed events adding up to the text) and chained with
    `previous_response_id` (the provider is sent the earlier turns)."""
    first = server_sdk.responses.create(model=model, input="Ada Lovelace")
    assert first.status == "completed" and first.output_text == "Ada Lovelace"
    with server_sdk.responses.stream(model=model, input="Grace Hopper") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Grace Hopper"
    rig.mock.control(reset=True)
    chained = server_sdk.responses.create(
        model=model, input="Alan Turing", previous_response_id=first.id
    )
    assert chained.output_text == "Alan Turing"
    [sent] = [r for r in rig.mock.requests() if r["path"].endswith("/chat/completions")]
    said = [(m["role"], m["content"]) for m in sent["body"]["messages"]]
    assert said == [
        ("user", "Ada Lovelace"),
        ("assistant", "Ada Lovelace"),
        ("user", "Alan Turing"),
    ]
