"""The node's `openai` backend: OpenAI-compatible endpoints called directly with aiohttp.

Process tests (real server, real node, the OpenAI mock as a real process, real HTTP):
plain, streamed and async chat, text completions, request fields passed through
untouched, retries of transient provider errors (429 with Retry-After or rate limit
reset headers, 500), a permanent 400, an unreachable `api_base`, and configs the node
refuses. One server and one node serve the module; every test starts with its mocks
reset.

In-process tests (the backend calls an aiohttp server on loopback, which hands each
request to the test as an `httpx.Request` and sends back the test's `httpx.Response`):
the assembly of a streamed answer (tool calls merged by index), what is sent upstream,
error classification, connections refused, cut short or silent (a raw TCP server), one
keep-alive connection for call after call, proxies named by the environment, the
server-sent events parser (sse.py), and the shared rate limit header parsing.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from unittest.mock import Mock

import aiohttp
import httpx
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from openbeepboop.node.backends import build_backend
from openbeepboop.node.backends.base import BackendError, Chunk
from openbeepboop.node.backends.litellm import _retry_after as litellm_retry_after
from openbeepboop.node.backends.openai_compat import OpenAIBackend, OpenAIModel, StreamAssembler
from openbeepboop.node.backends.ratelimit_headers import duration, retry_after
from openbeepboop.node.backends.sse import ServerSentEvent, aiter_sse
from openbeepboop.node.http_env import env_proxy
from tests.conftest import ServerProcess, free_port
from tests.nodes import (
    SERVER_LOG_WARNING,
    MockOpenAI,
    Proc,
    Procs,
    answer,
    auth,
    gaps,
    log_events,
    new_server,
    node_id_of,
    start_node,
    submit_chat,
    submit_completion,
    wait_jobs,
    write_config,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)

PROVIDER_KEY = "sk-mock-openai-key"
EXTRA = {"chat_template_kwargs": {"enable_thinking": False}}
PROMPT = "one two three four five six seven eight"


@dataclass
class Rig:
    server: ServerProcess
    node: Proc
    main: MockOpenAI  # model "oa-gpt": upstream "mock-upstream", a key, `extra`
    plain: MockOpenAI  # model "oa-plain": no `model` (upstream = name), no key
    paced: PacedUpstream  # model "oa-paced": streams a word every TOKEN_SECONDS
    procs: Procs
    tmp: Path


TOKEN_SECONDS = 0.12


class PacedUpstream:
    """A streaming-only OpenAI chat endpoint that sends a word every TOKEN_SECONDS, as a
    model generates (the mock answers at once, so the node's deltas would be overtaken
    by its result). Runs on a thread of the test process; records each request body."""

    def __init__(self) -> None:
        bodies: list[dict[str, Any]] = []
        self.bodies = bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                bodies.append(body)
                words = body["messages"][-1]["content"].split(" ")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()

                def send(choices: list[Any], **more: Any) -> None:
                    data = {"id": "chatcmpl-paced", "object": "chat.completion.chunk"}
                    data.update(created=1, model=body["model"], choices=choices, **more)
                    self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                    self.wfile.flush()

                send([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
                for i, word in enumerate(words):
                    time.sleep(TOKEN_SECONDS)  # the pace of generation, not a wait for state
                    send([{"index": 0, "delta": {"content": word if i == 0 else " " + word}}])
                send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
                n = len(words)
                send([], usage={"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1})
                self.wfile.write(b"data: [DONE]\n\n")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def openai_model(name: str, api_base: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "openai",
        "api_base": api_base,
        "concurrency": 2,
        "max_attempts": 5,
        "timeout_seconds": 30,
        **fields,
    }


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("openai-backend")
    procs = Procs()
    server = new_server(tmp / "server")
    paced = PacedUpstream()
    try:
        main = MockOpenAI(procs, tmp / "main")
        plain = MockOpenAI(procs, tmp / "plain")
        models = [
            openai_model(
                "oa-gpt",
                main.url + "/v1",
                model="mock-upstream",
                api_key=PROVIDER_KEY,
                headers={"X-Obb-Test": "yes"},
                extra=EXTRA,
            ),
            openai_model("oa-plain", plain.url + "/v1/"),
            openai_model("oa-paced", paced.url + "/v1"),
            # nothing listens there: every try is a refused connection
            openai_model("oa-down", f"http://127.0.0.1:{free_port()}/v1", max_attempts=2),
        ]
        config = write_config(tmp / "node" / "node.toml", server, models)
        node = start_node(procs, config)
        node_id_of(node, timeout=30)
        yield Rig(server, node, main, plain, paced, procs, tmp)
    finally:
        procs.close()
        server.kill(signal.SIGTERM)
        paced.close()


@pytest.fixture
def rig(module_rig: Rig) -> Rig:
    assert module_rig.node.alive(), module_rig.node.stderr()
    for mock in (module_rig.main, module_rig.plain):
        mock.control(fail=[], always=None, retry_after=None, reset_requests=None, reset=True)
    module_rig.paced.bodies.clear()
    return module_rig


def model_requests(mock: MockOpenAI) -> list[dict[str, Any]]:
    return [r for r in mock.requests() if r["path"].endswith("completions")]


def sync_chat(server: ServerProcess, content: str, model: str) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}]},
        headers=auth(server.keys["client_key"]),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- through the server and a node ------------------------------------------------------


@pytest.mark.slow
def test_a_synchronous_chat_is_one_plain_upstream_call(rig: Rig) -> None:
    result = sync_chat(rig.server, "whole please", "oa-gpt")
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "whole please"}
    assert result["model"] == "oa-gpt"
    assert result["usage"]["completion_tokens"] == 2

    [seen] = model_requests(rig.main)
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"].get("stream") in (False, None)  # one plain call, no stream
    assert "stream_options" not in seen["body"]
    assert seen["body"]["model"] == "mock-upstream"
    assert seen["body"]["chat_template_kwargs"] == EXTRA["chat_template_kwargs"]
    assert seen["authorization"] == f"Bearer {PROVIDER_KEY}"
    logs = rig.node.stdout() + rig.node.stderr()
    assert "whole please" not in logs and PROVIDER_KEY not in logs


@pytest.mark.slow
def test_a_streamed_chat_arrives_in_pieces_with_usage(rig: Rig) -> None:
    client = openai.OpenAI(base_url=rig.server.url + "/v1", api_key=rig.server.keys["client_key"])
    stream = client.chat.completions.create(
        model="oa-paced",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    arrivals: list[float] = []
    finish, usage = None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                arrivals.append(time.monotonic())
            finish = choice.finish_reason or finish
    assert "".join(pieces) == PROMPT
    # live, piece by piece as upstream sends them (a word every 0.12 s), not all at the end
    assert len(pieces) >= 4, pieces
    assert arrivals[-1] - arrivals[0] > 0.4, gaps(arrivals)
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 8

    [body] = rig.paced.bodies
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "oa-paced"


@pytest.mark.slow
def test_text_completion(rig: Rig) -> None:
    job = submit_completion(rig.server, "a completion prompt about yaks", "oa-gpt")
    (done,) = wait_jobs(rig.server, [job], "completed", timeout=30)
    assert answer(done) == "a completion prompt about yaks"
    assert done["result"]["object"] == "text_completion"
    assert done["result"]["model"] == "oa-gpt"
    assert done["result"]["usage"]["completion_tokens"] == 5

    [seen] = model_requests(rig.main)
    assert seen["path"] == "/v1/completions"
    assert not seen["body"].get("stream")
    assert seen["body"]["prompt"] == "a completion prompt about yaks"
    assert seen["body"]["model"] == "mock-upstream"


@pytest.mark.slow
def test_an_async_job_gets_a_full_chat_completion(rig: Rig) -> None:
    job = submit_chat(rig.server, "an async question about zebras", "oa-gpt")
    (done,) = wait_jobs(rig.server, [job], "completed", timeout=30)
    result = done["result"]
    assert result["id"].startswith("chatcmpl-mock")  # the upstream's id
    assert result["object"] == "chat.completion"
    assert isinstance(result["created"], int)
    assert result["model"] == "oa-gpt"
    [choice] = result["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "an async question about zebras"}
    assert choice["finish_reason"] == "stop"
    usage = result["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5

    [seen] = model_requests(rig.main)
    assert seen["body"]["stream"] is True  # streamed upstream, assembled by the node


@pytest.mark.slow
def test_request_fields_pass_through_untouched(rig: Rig) -> None:
    fields: dict[str, Any] = {
        "response_format": {"type": "json_object"},
        "seed": 1234,
        "logit_bias": {"50256": -100, "11": 5},
        "temperature": 0.25,
        "max_tokens": 77,
        "stop": ["\n\n", "END"],
        "logprobs": True,
        "top_logprobs": 2,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "description": "Look a word up.",
                    "parameters": {"type": "object", "properties": {"w": {"type": "string"}}},
                },
            }
        ],
        "tool_choice": "auto",
        "top_k": 40,  # not OpenAI's: a vLLM / llama.cpp extension
        "user": "someone",
    }
    job = submit_chat(rig.server, "pass it all on", "oa-gpt", **fields)
    wait_jobs(rig.server, [job], "completed", timeout=30)
    [seen] = model_requests(rig.main)
    assert seen["body"] == {
        "messages": [{"role": "user", "content": "pass it all on"}],
        **fields,
        **EXTRA,
        "model": "mock-upstream",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.slow
def test_without_model_and_key_the_entry_name_goes_upstream_unauthenticated(rig: Rig) -> None:
    result = sync_chat(rig.server, "plain model", "oa-plain")
    assert result["model"] == "oa-plain"
    [seen] = model_requests(rig.plain)
    assert seen["path"] == "/v1/chat/completions"  # api_base's trailing slash is fine
    assert seen["body"]["model"] == "oa-plain"
    assert seen["authorization"] is None
    assert "chat_template_kwargs" not in seen["body"]


@pytest.mark.slow
def test_429_is_retried_after_retry_after(rig: Rig) -> None:
    rig.main.control(fail=[429], retry_after=2.5)
    job = submit_chat(rig.server, "rate limited at first", "oa-gpt")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert answer(done) == "rate limited at first"
    assert done["attempts"] == 1  # provider retries happen inside one lease
    seen = model_requests(rig.main)
    assert [r["status"] for r in seen] == [429, 200]
    # backoff alone would wait 1-2 s: this gap is Retry-After's
    (gap,) = gaps([r["t"] for r in seen])
    assert 2.4 <= gap < 6, gap


@pytest.mark.slow
def test_429_without_retry_after_waits_for_the_ratelimit_reset(rig: Rig) -> None:
    rig.main.control(fail=[429], retry_after=None, reset_requests=3)
    job = submit_chat(rig.server, "rate limited, reset header only", "oa-gpt")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    seen = model_requests(rig.main)
    assert [r["status"] for r in seen] == [429, 200]
    # `x-ratelimit-remaining-requests: 0` + `x-ratelimit-reset-requests: 3s`
    (gap,) = gaps([r["t"] for r in seen])
    assert 2.9 <= gap < 6, gap


@pytest.mark.slow
def test_500_twice_then_success(rig: Rig) -> None:
    rig.main.control(fail=[500, 500])
    job = submit_chat(rig.server, "flaky upstream", "oa-gpt")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert answer(done) == "flaky upstream"
    assert done["attempts"] == 1
    seen = model_requests(rig.main)
    assert [r["status"] for r in seen] == [500, 500, 200]
    spacing = gaps([r["t"] for r in seen])
    assert all(g >= 0.5 for g in spacing), f"no backoff between tries: {spacing}"


@pytest.mark.slow
def test_permanent_400_fails_the_job_at_once(rig: Rig) -> None:
    rig.main.control(always=400)
    job = submit_chat(rig.server, "a request the provider rejects", "oa-gpt")
    (done,) = wait_jobs(rig.server, [job], {"failed", "completed", "cancelled"}, timeout=30)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "invalid_request", done["error"]
    assert done["error"]["retryable"] is False
    assert "mock: answering 400 as told" in done["error"]["message"]
    assert done["attempts"] == 1
    assert [r["status"] for r in model_requests(rig.main)] == [400]
    assert len(log_events(rig.node, "job failed", job)) == 1


@pytest.mark.slow
def test_an_unreachable_api_base_is_retried_then_fails(rig: Rig) -> None:
    started = time.monotonic()
    job = submit_chat(rig.server, "nobody home", "oa-down", max_attempts=1)
    (done,) = wait_jobs(rig.server, [job], {"failed", "completed"}, timeout=30)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "provider_unavailable", done["error"]
    assert done["error"]["retryable"] is True
    assert "ClientConnectorError" in done["error"]["message"]
    assert done["attempts"] == 1
    # two tries (the model's max_attempts) with a backoff of at least 1 s between them
    assert time.monotonic() - started >= 1.0
    [line] = log_events(rig.node, "job failed", job)
    assert "provider_unavailable" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("api_base", "expected"),
    [
        (None, "api_base: Field required"),
        ("127.0.0.1:11434/v1", "api_base: Value error, must be an http:// or https:// URL"),
        ("ftp://models.example/v1", "api_base: Value error, must be an http:// or https:// URL"),
    ],
)
def test_a_bad_api_base_is_refused_with_the_field_named(
    rig: Rig, api_base: str | None, expected: str
) -> None:
    model = openai_model("oa-bad", api_base or "")
    if api_base is None:
        del model["api_base"]
    tag = "missing" if api_base is None else api_base.split(":")[0]
    config = write_config(rig.tmp / f"bad-{tag}" / "node.toml", rig.server, [model])
    node = start_node(rig.procs, config)
    assert node.wait(timeout=30) == 1
    err = node.stderr()
    assert "invalid node config" in err, err
    assert f"models.0.openai.{expected}" in err, err
    assert "Traceback" not in err


# -- in process -------------------------------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]

# headers aiohttp computes itself for the body it sends
_RECOMPUTED = {"content-length", "content-encoding", "transfer-encoding"}


class Upstream:
    """The endpoint of the in-process tests: an aiohttp server on 127.0.0.1, on the test's
    own loop, which hands each request, as an `httpx.Request`, to the test's `handler`
    (`backend_with` sets it) and answers with the `httpx.Response` it returns, so that a
    test reads as with httpx's MockTransport while the backend makes real HTTP calls."""

    current: ClassVar[Upstream | None] = None  # the running test's, while it runs

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.peers: list[Any] = []  # the client address of each request
        self.errors: list[BaseException] = []  # the handler's, raised again at teardown
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _serve(self, request: web.Request) -> web.Response:
        assert self.handler is not None, "backend_with sets the handler"
        self.peers.append(request.transport and request.transport.get_extra_info("peername"))
        forwarded = httpx.Request(
            request.method,
            str(request.url),
            headers=list(request.headers.items()),
            content=await request.read(),
        )
        try:
            answer = self.handler(forwarded)
        except BaseException as exc:  # the test's assertion, not an upstream's 500
            self.errors.append(exc)
            raise
        headers = CIMultiDict(
            (k, v) for k, v in answer.headers.multi_items() if k.lower() not in _RECOMPUTED
        )
        return web.Response(status=answer.status_code, headers=headers, body=answer.content)


def without_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy named by the environment (the backend would obey it)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(autouse=True)
async def upstream(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Upstream | None]:
    """An `Upstream` for each in-process (async) test; nothing for the others."""
    if not inspect.iscoroutinefunction(request.function):
        yield None
        return
    without_proxies(monkeypatch)
    server = Upstream()
    await server.server.start_server()
    Upstream.current = server
    try:
        yield server
    finally:
        Upstream.current = None
        await server.server.close()
    if server.errors:
        raise server.errors[0]


def backend_with(handler: Handler, **fields: Any) -> OpenAIBackend:
    server = Upstream.current
    assert server is not None, "in-process tests are async: their server runs on their loop"
    server.handler = handler
    config = OpenAIModel.model_validate(
        {"name": "local", "backend": "openai", "api_base": server.url + "/v1", **fields}
    )
    return OpenAIBackend(config)


async def run(backend: OpenAIBackend, endpoint: str, request: dict[str, Any]) -> list[Chunk]:
    await backend.load(lambda state, fraction: None)
    try:
        return [chunk async for chunk in backend.execute(endpoint, request)]
    finally:
        await backend.close()


def sse(*events: Any) -> httpx.Response:
    lines = [e if isinstance(e, str) else "data: " + orjson.dumps(e).decode() for e in events]
    body = "".join(line + "\n\n" for line in lines)
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=body)


def chunk(choices: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "up",
        "choices": choices,
        **top,
    }


def delta(content: Any = None, finish: str | None = None, index: int = 0, **more: Any) -> Any:
    d = {"content": content, **more} if content is not None else dict(more)
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}


TOOL_STREAM = [
    chunk([delta(role="assistant", content=None)]),
    chunk(
        [
            delta(
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": ""},
                    }
                ]
            )
        ]
    ),
    chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": '{"w": '}}])]),
    chunk(
        [
            delta(
                tool_calls=[
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "define", "arguments": '{"w"'},
                    }
                ]
            )
        ]
    ),
    chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": '"yak"}'}}])]),
    chunk([delta(tool_calls=[{"index": 1, "id": "", "function": {"arguments": ': "zebu"}'}}])]),
    chunk([delta(finish="tool_calls")]),
    chunk([], usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}),
]


def test_streamed_tool_call_deltas_are_merged_by_index() -> None:
    stream = StreamAssembler()
    texts = [stream.add(c) for c in TOOL_STREAM]
    assert texts == [""] * len(TOOL_STREAM)
    last = stream.final({"model": "asked-for"})
    assert last.finish_reason == "tool_calls"
    assert last.usage == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert last.response == {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "asked-for",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": '{"w": "yak"}'},
                        },
                        {
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "define", "arguments": '{"w": "zebu"}'},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    }


def test_streamed_content_reasoning_and_logprobs_are_joined() -> None:
    stream = StreamAssembler()
    first = chunk([delta(role="assistant", content="")], system_fingerprint="fp_1")
    token = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    parts = [
        first,
        chunk([delta(reasoning_content="think ", role="assistant")]),
        chunk([delta(reasoning_content="hard")]),
        chunk([{**delta("Hi"), "logprobs": {"content": [token], "refusal": None}}]),
        chunk([{**delta(" there"), "logprobs": {"content": [token], "refusal": None}}]),
        chunk([delta(finish="length")]),
    ]
    assert [stream.add(p) for p in parts] == ["", "", "", "Hi", " there", ""]
    last = stream.final({"model": "m"})
    assert last.usage is None
    assert last.finish_reason == "length"
    assert last.response is not None
    assert last.response["system_fingerprint"] == "fp_1"
    assert last.response["usage"] is None
    [choice] = last.response["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hi there",
        "reasoning_content": "think hard",
    }
    assert choice["logprobs"] == {"content": [token, token], "refusal": None}


async def test_a_stream_sends_the_request_as_is_and_yields_each_piece() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return sse(
            chunk([delta(role="assistant", content="")]),
            chunk([delta("Hello")]),
            chunk([delta(", world")]),
            chunk([delta(finish="stop")]),
            chunk([], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
            "data: [DONE]",
        )

    backend = backend_with(
        handler,
        model="up-model",
        api_key="sk-unit",
        headers={"X-Org": "lab"},
        extra={"top_k": 20},
    )
    request = {
        "model": "local",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"continuous_usage_stats": True},
        "seed": 3,
    }
    chunks = await run(backend, "/v1/chat/completions", request)
    assert [c.text for c in chunks[:-1]] == ["Hello", ", world", ""]
    # plain text goes as text; the finish reason goes as it was streamed, a chunk choice
    assert [c.choices for c in chunks[:-1]] == [
        None,
        None,
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    ]
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert last.response is not None
    assert last.response["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello, world",
    }
    assert last.response["model"] == "local"

    [req] = sent
    assert Upstream.current is not None
    assert str(req.url) == Upstream.current.url + "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-unit"
    assert req.headers["x-org"] == "lab"
    assert req.headers["content-type"] == "application/json"
    assert orjson.loads(req.content) == {
        "model": "up-model",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"continuous_usage_stats": True, "include_usage": True},
        "seed": 3,
        "top_k": 20,
    }
    assert request["model"] == "local"  # the job's own request is left as it was


async def test_a_text_completion_streams_only_when_its_client_streams() -> None:
    sent: list[dict[str, Any]] = []
    whole = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "local",
        "choices": [{"index": 0, "text": "abc", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }

    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**whole, "choices": [choice], "usage": None}

    def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        sent.append(body)
        if not body.get("stream"):
            return httpx.Response(200, json=whole)
        usage = {**whole, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}}
        return sse(piece("once "), piece("upon "), piece("a time", "stop"), usage, "data: [DONE]")

    [last] = await run(backend_with(handler), "/v1/completions", {"model": "m", "prompt": "x"})
    assert last.response is not None and last.response["choices"][0]["text"] == "abc"
    assert sent[-1] == {"model": "local", "prompt": "x"}

    request = {"model": "m", "prompt": "x", "stream": True, "stream_options": {}}
    *pieces, last = await run(backend_with(handler), "/v1/completions", request)
    assert [p.text for p in pieces] == ["once ", "upon ", "a time"]
    assert sent[-1]["stream"] is True and sent[-1]["stream_options"] == {"include_usage": True}
    assert last.finish_reason == "stop"
    assert last.response == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "text": "once upon a time", "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3},
    }


async def test_an_endpoint_that_ignores_stream_answers_whole() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "x",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": None,
        }
        return httpx.Response(200, json=body)

    chunks = await run(
        backend_with(handler), "/v1/chat/completions", {"model": "local", "messages": []}
    )
    assert [c.text for c in chunks] == ["ok", ""]
    assert chunks[-1].response is not None and chunks[-1].response["model"] == "local"


def error_answer(status: int, error: Any = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": error or {"message": f"upstream says {status}", "code": None}}
        return httpx.Response(status, json=body, headers=headers)

    return handler


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("status", "error", "headers", "code", "retryable", "after"),
    [
        (400, None, None, "invalid_request", False, None),
        (
            400,
            {"message": "too long", "code": "context_length_exceeded"},
            None,
            "context_length_exceeded",
            False,
            None,
        ),
        (
            400,
            {
                "message": "the request exceeds the available context size",
                "code": 400,
                "type": "exceed_context_size_error",
            },
            None,
            "context_length_exceeded",
            False,
            None,
        ),
        (401, None, None, "provider_auth_failed", False, None),
        (403, None, None, "provider_forbidden", False, None),
        (404, None, None, "model_not_found", False, None),
        (422, None, None, "provider_error", False, None),
        (429, None, {"Retry-After": "7"}, "rate_limited", True, 7.0),
        (
            429,
            None,
            {
                "x-ratelimit-remaining-requests": "10",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            "rate_limited",
            True,
            360.0,
        ),
        (408, None, None, "provider_error", True, None),
        (500, None, None, "provider_error", True, None),
        (503, None, {"retry-after": "1.5"}, "provider_error", True, 1.5),
        (529, None, None, "provider_error", True, None),
    ],
)
async def test_http_errors_are_classified(
    stream: bool,
    status: int,
    error: Any,
    headers: dict[str, str] | None,
    code: str,
    retryable: bool,
    after: float | None,
) -> None:
    backend = backend_with(error_answer(status, error, headers))
    request = {"model": "local", "messages": [{"role": "user", "content": "q"}], "stream": stream}
    with pytest.raises(BackendError) as caught:
        await run(backend, "/v1/chat/completions", request)
    exc = caught.value
    assert (exc.code, exc.retryable, exc.retry_after, exc.status) == (
        code,
        retryable,
        after,
        status,
    )
    expected = (error or {}).get("message") or f"upstream says {status}"
    assert expected in exc.message


@pytest.mark.parametrize(
    ("event", "code", "retryable"),
    [
        (
            'data: {"error": {"message": "the model crashed", "code": null}}',
            "provider_error",
            False,
        ),
        ('data: {"error": {"message": "the model crashed", "code": 503}}', "provider_error", True),
        (
            'data: {"error": {"message": "the model crashed", "status": "429"}}',
            "rate_limited",
            True,
        ),
        ("event: error\ndata: the model crashed", "provider_error", False),
    ],
)
async def test_an_error_inside_a_stream(event: str, code: str, retryable: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return sse(chunk([delta("partial")]), event)

    backend = backend_with(handler)
    request = {"model": "local", "messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(BackendError) as caught:
        await run(backend, "/v1/chat/completions", request)
    assert (caught.value.code, caught.value.retryable) == (code, retryable)
    assert "the model crashed" in caught.value.message


@pytest.mark.parametrize(("status", "retryable"), [(None, False), (503, True)])
async def test_an_error_answered_with_200(status: int | None, retryable: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"error": {"message": "the model crashed", "code": status}})

    request = {"model": "local", "messages": [], "stream": False}
    with pytest.raises(BackendError) as caught:
        await run(backend_with(handler), "/v1/chat/completions", request)
    assert (caught.value.code, caught.value.retryable) == ("provider_error", retryable)
    assert "the model crashed" in caught.value.message


@asynccontextmanager
async def raw_upstream(reply: bytes, then: str = "close") -> AsyncIterator[str]:
    """An endpoint below HTTP, for what a well-behaved server never does: it reads one
    request, writes `reply` as it is, then closes the connection ("close") or keeps it
    open without a word more ("stall"). Yields its api_base."""
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(reply)
        await writer.drain()
        if then == "stall":
            await release.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        release.set()
        server.close()
        await server.wait_closed()


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
FIRST_EVENT = b"data: " + orjson.dumps(chunk([delta("partial")])) + b"\n\n"


async def pieces_then_error(api_base: str, stream: bool, **fields: Any) -> tuple[list[str], Any]:
    """The texts yielded before the BackendError, and the error."""
    config = OpenAIModel.model_validate(
        {"name": "local", "backend": "openai", "api_base": api_base, **fields}
    )
    backend = OpenAIBackend(config)
    await backend.load(lambda state, fraction: None)
    texts: list[str] = []
    request = {"model": "local", "messages": [], "stream": stream}
    try:
        with pytest.raises(BackendError) as caught:
            async for piece in backend.execute("/v1/chat/completions", request):
                texts.append(piece.text)
    finally:
        await backend.close()
    return texts, caught.value


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refused_connection_is_provider_unavailable(stream: bool) -> None:
    api_base = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    texts, error = await pieces_then_error(api_base, stream)
    assert texts == []
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert error.message.startswith(f"cannot reach {api_base}: ClientConnectorError: ")


@pytest.mark.parametrize(
    ("stream", "reply", "kind", "texts"),
    [
        # closed before a word: aiohttp's ServerDisconnectedError
        (True, b"", "ServerDisconnectedError", []),
        (False, b"", "ServerDisconnectedError", []),
        # a whole answer shorter than its Content-Length: ClientPayloadError
        (
            False,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            "ClientPayloadError",
            [],
        ),
        # a stream cut after its first event, without its last chunk: what came is yielded
        (True, SSE_HEAD + chunked(FIRST_EVENT), "ClientPayloadError", ["partial"]),
    ],
)
async def test_a_connection_cut_short_is_provider_unavailable(
    stream: bool, reply: bytes, kind: str, texts: list[str]
) -> None:
    async with raw_upstream(reply) as api_base:
        got, error = await pieces_then_error(api_base, stream)
    assert got == texts
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert error.message.startswith(f"cannot reach {api_base}: {kind}: ")


@pytest.mark.parametrize(
    ("stream", "reply", "texts"),
    [
        (True, b"", []),  # no answer at all
        (False, b"", []),
        (False, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", []),  # half an answer
        (True, SSE_HEAD + chunked(FIRST_EVENT), ["partial"]),  # a stream that stops
    ],
)
async def test_silence_longer_than_timeout_seconds_is_provider_unavailable(
    stream: bool, reply: bytes, texts: list[str]
) -> None:
    async with raw_upstream(reply, then="stall") as api_base:
        started = time.monotonic()
        got, error = await pieces_then_error(api_base, stream, timeout_seconds=0.3)
    assert 0.3 <= time.monotonic() - started < 5
    assert got == texts
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert error.message.startswith(f"no answer from {api_base} in time: ")


async def test_one_connection_serves_call_after_call() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if orjson.loads(request.content).get("stream"):
            return sse(chunk([delta("streamed")]), chunk([delta(finish="stop")]), "data: [DONE]")
        return httpx.Response(200, json=chunk([{"index": 0, "message": {"content": "whole"}}]))

    backend = backend_with(handler)
    await backend.load(lambda state, fraction: None)
    try:
        for stream in (True, False, True, True, False):
            request = {"model": "local", "messages": [], "stream": stream}
            chunks = [c async for c in backend.execute("/v1/chat/completions", request)]
            assert chunks[-1].response is not None
    finally:
        await backend.close()
    assert Upstream.current is not None
    peers = Upstream.current.peers
    assert len(peers) == 5 and len(set(peers)) == 1, peers  # keep-alive, also after [DONE]


async def test_a_proxy_named_by_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return sse(chunk([delta("via the proxy")]), "data: [DONE]")

    backend = backend_with(handler, api_key="sk-up")  # the in-process server, as the proxy
    proxy = URL(backend.config.api_base).with_path("").with_user("someone").with_password("pw")
    monkeypatch.setenv("HTTP_PROXY", str(proxy))
    config = backend.config.model_copy(update={"api_base": "http://upstream.test/v1"})
    chunks = await run(OpenAIBackend(config), "/v1/chat/completions", {"messages": []})
    assert chunks[0].text == "via the proxy"
    [req] = sent
    assert str(req.url) == "http://upstream.test/v1/chat/completions"
    assert req.headers["proxy-authorization"] == "Basic c29tZW9uZTpwdw=="  # someone:pw
    assert req.headers["authorization"] == "Bearer sk-up"  # the provider's key, to it only


async def test_the_nodes_calls_to_its_server_go_through_the_environments_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from openbeepboop.node.client import NodeClient

    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"jobs": []})

    server = Upstream.current
    assert server is not None
    server.handler = handler  # the in-process server, here as the proxy
    monkeypatch.setenv("HTTP_PROXY", str(URL(server.url).with_user("node").with_password("pw")))
    client = NodeClient("http://queue.test:8000", "obb_node_k", timeout=10)
    try:
        assert await client.fetch("node_1", ["m"], 1, wait=0) == []
    finally:
        await client.close()
    [req] = sent
    assert str(req.url) == "http://queue.test:8000/internal/queue/fetch"
    assert req.headers["authorization"] == "Bearer obb_node_k"
    assert req.headers["proxy-authorization"] == "Basic bm9kZTpwdw=="  # node:pw


@pytest.mark.parametrize(
    ("env", "api_base", "proxy", "auth"),
    [
        ({}, "https://api.example/v1", None, None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://api.example/v1", "http://proxy:3128", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http://api.example/v1", None, None),
        ({"ALL_PROXY": "http://proxy:3128"}, "http://api.example/v1", "http://proxy:3128", None),
        (
            {"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "api.example"},
            "http://api.example/v1",
            None,
            None,
        ),
        ({"http_proxy": "socks5://proxy:1080"}, "http://api.example/v1", None, None),
        (
            {"HTTP_PROXY": "http://me:secret@proxy:3128"},
            "http://api.example/v1",
            "http://proxy:3128",
            "Basic bWU6c2VjcmV0",  # base64 of me:secret
        ),
    ],
)
def test_env_proxy(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    api_base: str,
    proxy: str | None,
    auth: str | None,
) -> None:
    without_proxies(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found, found_auth = env_proxy(api_base)
    assert (found and str(found), found_auth) == (proxy, auth)


def test_the_backend_is_found_by_its_entry_point() -> None:
    config = OpenAIModel(name="m", backend="openai", api_base="https://api.example/v1")
    first, second = build_backend(config, Path(".")), build_backend(config, Path("."))
    assert isinstance(first, OpenAIBackend) and isinstance(second, OpenAIBackend)
    assert config.upstream_model() == "m"


# -- server-sent events (sse.py) --------------------------------------------------------


class Reads:
    """Stands for aiohttp's `StreamReader`: `iter_any` gives the pieces as the network
    would have split them."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces

    async def _pieces(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            await asyncio.sleep(0)
            yield piece

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._pieces()


async def events(*pieces: bytes) -> list[ServerSentEvent]:
    return [event async for event in aiter_sse(Reads(*pieces))]


def message(data: str, event: str = "message", id: str = "") -> ServerSentEvent:
    return ServerSentEvent(event=event, data=data, id=id)


STREAM = (
    ": a comment, then two events with names and ids\n"
    "event: add\nid: 1\ndata: first\n\n"
    'data: {"a": 1}\nid: 2\n\n'
    "data:no space\ndata:  two spaces\n\n"
    "data: caf\u00e9 \u2603\n\n"
)
STREAM_EVENTS = [
    message("first", event="add", id="1"),
    message('{"a": 1}', id="2"),
    message("no space\n two spaces", id="2"),  # the last id holds for the events after it
    message("caf\u00e9 \u2603", id="2"),
]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
async def test_sse_line_ends(end: str) -> None:
    assert await events(STREAM.replace("\n", end).encode()) == STREAM_EVENTS


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"])
async def test_sse_events_split_anywhere_by_the_network(end: str) -> None:
    raw = STREAM.replace("\n", end).encode()  # "\u2603" is 3 bytes: some splits cut it
    for cut in range(1, len(raw)):
        assert await events(raw[:cut], raw[cut:]) == STREAM_EVENTS, cut
    assert await events(*(raw[i : i + 1] for i in range(len(raw)))) == STREAM_EVENTS


async def test_sse_a_cr_at_the_end_of_a_read_and_lf_at_the_start_of_the_next() -> None:
    # one CRLF split by the network, then a blank line of its own
    assert await events(b"data: a\r", b"\n", b"\r\n") == [message("a")]
    # CR then LF, each read alone: the LF ends nothing more
    assert await events(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [message("a\nb")]
    # a lone CR at the end of a read is a line end (the event is dispatched at once)
    assert await events(b"data: a\r\r", b"data: b\n\n") == [message("a"), message("b")]


async def test_sse_multi_line_data_and_comments() -> None:
    raw = b": ping\ndata: one\n: keep-alive\ndata: two\ndata:\ndata: four\n\n:\n\n"
    assert await events(raw) == [message("one\ntwo\n\nfour")]


async def test_sse_fields_without_colon_and_unknown_fields() -> None:
    raw = (
        b"data\ndata\n\n"  # a field without a colon: the empty value; data "\n"
        b"event\ndata: named nothing\n\n"  # an empty event name: "message"
        b"retry: 3000\nfoo: bar\nDATA: upper case is another field\ndata: kept\n\n"
        b"id: a\0b\ndata: an id with NUL is ignored\n\n"
        b"id\ndata: an empty id resets it\n\n"
    )
    assert await events(raw) == [
        message("\n"),
        message("named nothing"),
        message("kept"),
        message("an id with NUL is ignored"),
        message("an empty id resets it"),
    ]


async def test_sse_events_without_data_are_not_dispatched() -> None:
    raw = b"event: ping\n\nid: 7\n\n\n\ndata:\n\n"
    # no data field, no event; `data:` with nothing: an event whose data is ""
    assert await events(raw) == [message("", id="7")]


async def test_sse_an_event_not_closed_at_the_end_is_dropped() -> None:
    assert await events(b"data: done\n\ndata: cut\n") == [message("done")]
    assert await events(b"data: done\n\ndata: cut") == [message("done")]
    assert await events(b"data: done\r\n\r\ndata: cut\r\n") == [message("done")]
    assert await events(b"") == []


async def test_sse_a_leading_byte_order_mark_is_ignored() -> None:
    assert await events(b"\xef\xbb", b"\xbfdata: x\n\n") == [message("x")]
    # only the first
    assert await events(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []


async def test_sse_reads_an_aiohttp_stream_reader() -> None:
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(Mock(), 2**16, loop=loop)  # a connected protocol

    async def network() -> None:
        for piece in (b"event: error\r\nda", b"ta: x\r", b"\n\r", b"\ndata: y\n\n", b"data: z"):
            reader.feed_data(piece)
            await asyncio.sleep(0.01)
        reader.feed_eof()

    feeding = asyncio.create_task(network())
    assert [e async for e in aiter_sse(reader)] == [message("x", event="error"), message("y")]
    await feeding


# -- rate limit headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("2", 2.0),
        ("1h2m3s", 3723.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("1s later", None),
    ],
)
def test_duration(text: str | None, seconds: float | None) -> None:
    assert duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_headers() -> None:
    assert retry_after(None) is None
    assert retry_after(httpx.Headers()) is None
    assert retry_after(httpx.Headers({"Retry-After": "4"})) == 4.0
    assert retry_after(httpx.Headers({"Retry-After": "-3"})) == 0.0
    assert retry_after(httpx.Headers({"Retry-After": "whenever"})) is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (retry_after(httpx.Headers({"Retry-After": in_a_minute})) or 0) <= 61
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after(httpx.Headers({"Retry-After": past})) == 0.0
    # Retry-After wins over the reset headers
    both = {"retry-after": "2", "x-ratelimit-remaining-requests": "0"}
    both["x-ratelimit-reset-requests"] = "9s"
    assert retry_after(httpx.Headers(both)) == 2.0
    # only budgets that are used up count; the longest wait wins
    resets = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m",
    }
    assert retry_after(httpx.Headers(resets)) == 60.0
    assert retry_after(httpx.Headers({**resets, "x-ratelimit-remaining-tokens": "5"})) == 2.0
    assert retry_after({"x-ratelimit-reset-requests": "2s"}) is None
    # a prefix (LiteLLM's `llm_provider-`) is looked at too
    prefixed = {"llm_provider-retry-after": "3"}
    assert retry_after(prefixed) is None
    assert retry_after(prefixed, prefixes=("", "llm_provider-")) == 3.0


def test_litellm_reads_retry_after_as_before() -> None:
    class ProviderError(Exception):
        def __init__(self, headers: dict[str, str] | None, response: Any = None) -> None:
            super().__init__("rate limited")
            self.litellm_response_headers = headers
            self.response = response

    class Response:
        headers = httpx.Headers({"Retry-After": "5"})

    assert litellm_retry_after(ProviderError({"retry-after": "2"})) == 2.0
    assert litellm_retry_after(ProviderError({"llm_provider-retry-after": "4"})) == 4.0
    reset = {
        "llm_provider-x-ratelimit-remaining-requests": "0",
        "llm_provider-x-ratelimit-reset-requests": "6m0s",
    }
    assert litellm_retry_after(ProviderError(reset)) == 360.0
    assert litellm_retry_after(ProviderError(None, Response())) == 5.0
    assert litellm_retry_after(ProviderError(None)) is None
