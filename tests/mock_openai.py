"""A small OpenAI-compatible mock server, run as a real process by the tests.

    python tests/mock_openai.py --port 9000 [--fail 429,429] [--retry-after 1]
        [--always 400] [--require-key KEY] [--delay-ms 0]

Routes:
- `POST /v1/chat/completions` — answers with the last user message (after tool results,
  with their text); `stream: true` answers with SSE `chat.completion.chunk` lines (a role
  chunk, one per word, a finish chunk), a usage chunk when
  `stream_options.include_usage`, then `data: [DONE]`. As OpenAI does, it honours:
  - `tools` (+ `tool_choice`): one call to the function `tool_choice` names, else the
    first tool (none with `tool_choice: "none"` or when the last messages are tool
    results); its arguments are a JSON object built from the function's JSON schema and
    the user text (strings are the text, integers its word count, numbers that plus 0.5,
    booleans true, arrays one item, objects every property, enums their first value);
    `content: null`, `finish_reason: "tool_calls"`. Streamed: a first delta with the
    role, `content: null` and the call's id, type, name and empty arguments, then the
    arguments in fragments of 8 characters, then `{}` with the finish reason.
  - `n`: n choices, choice i > 0 answering "(i) " + the text; streamed interleaved, a
    chunk of each choice in turn, each with its own `index` and finish chunk.
  - `logprobs` / `top_logprobs`: an entry per word token (`token`, `logprob` from its
    position, `bytes`, `top_logprobs`: the token then `word~1`, `word~2`...); in a stream
    each content chunk carries `{"content": [entry], "refusal": null}`.
  - `response_format`: `json_schema` answers JSON built from the schema (as arguments
    are), `json_object` answers `{"answer": text}`.
  Every chat answer has `system_fingerprint: "fp_mock"`; the ids are `chatcmpl-mockN`
  and `call_mockNxI`.
- `POST /v1/completions` — answers with the prompt (`text_completion`).
- `POST /v1/embeddings` — four numbers per input (its length in characters and in
  words, 0.5, -0.25), as floats or base64 per `encoding_format`.
- `POST /control` — `{"fail": [429, 500], "retry_after": 1, "reset_requests": 3,
  "always": 400, "require_key": "k", "delay_ms": 0, "reset": true}`: the next requests
  get the statuses in `fail` (one each, in order), `always` answers every request with
  that status, 429s carry `Retry-After: retry_after` (none when null) and
  `x-ratelimit-reset-requests: reset_requests` (default: Retry-After, else 1 s),
  `reset` forgets the recorded requests. Omitted fields keep their value; `null` clears.
- `GET /requests` — every request to the model routes: arrival time (`t`, epoch
  seconds), path, Authorization header, the status answered and the JSON body.
- `GET /health`.

429 answers carry `Retry-After` (when set) and `x-ratelimit-*` headers; every error
answer has an OpenAI error body.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    503: ("server_error", "overloaded"),
}


class State:
    def __init__(self) -> None:
        self.fail: list[int] = []
        self.retry_after: float | None = None
        self.always: int | None = None
        self.require_key: str | None = None
        self.delay_ms: float = 0
        self.reset_requests: float | None = None
        self.requests: list[dict[str, Any]] = []
        self.counter = 0

    def configure(self, data: dict[str, Any]) -> None:
        if data.get("reset"):
            self.requests.clear()
        if "fail" in data:
            self.fail = [int(s) for s in data["fail"] or []]
        for name in ("retry_after", "always", "require_key", "delay_ms", "reset_requests"):
            if name in data:
                setattr(self, name, data[name] if name != "delay_ms" else data[name] or 0)

    def snapshot(self) -> dict[str, Any]:
        return {
            "fail": self.fail,
            "retry_after": self.retry_after,
            "always": self.always,
            "require_key": self.require_key,
            "delay_ms": self.delay_ms,
            "reset_requests": self.reset_requests,
        }


STATE = State()
SYSTEM_FINGERPRINT = "fp_mock"


def error_response(status: int, message: str | None = None) -> Response:
    kind, code = ERROR_TYPES.get(status, ("server_error", f"http_{status}"))
    body = {
        "error": {
            "message": message or f"mock: answering {status} as told",
            "type": kind,
            "param": None,
            "code": code,
        }
    }
    headers: dict[str, str] = {}
    if status == 429:
        reset = STATE.reset_requests or STATE.retry_after or 1
        if STATE.retry_after is not None:
            headers["Retry-After"] = f"{STATE.retry_after:g}"
        headers.update(
            {
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{reset:g}s",
                "x-ratelimit-limit-tokens": "100000",
                "x-ratelimit-remaining-tokens": "99000",
                "x-ratelimit-reset-tokens": "1s",
            }
        )
    return JSONResponse(body, status_code=status, headers=headers)


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def tool_results(body: dict[str, Any]) -> str | None:
    """The text of the tool results that end the conversation, if it ends with any."""
    texts: list[str] = []
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "tool":
            break
        texts.insert(0, content_text(message.get("content")))
    return " ".join(texts) if texts else None


def usage_for(prompt: str, answer: str) -> dict[str, int]:
    p, c = len(prompt.split()), len(answer.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# -- answers built from JSON schemas -----------------------------------------------------


def value_for(schema: Any, text: str, defs: dict[str, Any]) -> Any:
    """A value valid for `schema` made from `text`: strings are the text, integers its
    word count, numbers that count plus a half, booleans true, arrays one item, objects
    every property (an enum or const answers its first value, anyOf its first non-null)."""
    if not isinstance(schema, dict):
        return text
    defs = {**defs, **(schema.get("$defs") or {}), **(schema.get("definitions") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return value_for(defs.get(ref.rsplit("/", 1)[-1], {}), text, defs)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key) or [] if o.get("type") != "null"]
        if options:
            return value_for(options[0], text, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "array":
        return [value_for(schema.get("items", {}), text, defs)]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: value_for(sub, text, defs) for name, sub in props.items()}
    words = len(text.split())
    scalars = {"integer": words, "number": words + 0.5, "boolean": True, "null": None}
    return scalars.get(str(kind), text)


def json_for(schema: Any, text: str) -> str:
    return json.dumps(value_for(schema, text, {}))


def chosen_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function the answer calls: the one `tool_choice` names, else the first tool;
    none without tools, with `tool_choice: "none"`, or after tool results."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("function")]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or tool_results(body) is not None:
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for tool in tools:
            if tool["function"].get("name") == name:
                return dict(tool["function"])
    return dict(tools[0]["function"])


class Answer:
    """One choice of the answer: either content (cut into word tokens) or one tool call
    (its arguments cut into fragments)."""

    def __init__(self, body: dict[str, Any], index: int, call_id: str) -> None:
        self.index = index
        base = tool_results(body)
        text = last_user_text(body) if base is None else base
        self.text = text if index == 0 else f"({index}) {text}"
        self.tool = chosen_tool(body)
        self.call_id = call_id
        self.content: str | None = None
        self.tokens: list[str] = []
        self.arguments = ""
        self.fragments: list[str] = []
        if self.tool is not None:
            self.arguments = json_for(self.tool.get("parameters") or {}, self.text)
            self.fragments = [
                self.arguments[i : i + ARGUMENT_FRAGMENT]
                for i in range(0, len(self.arguments), ARGUMENT_FRAGMENT)
            ] or [""]
            self.finish = "tool_calls"
            return
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            self.content = json_for((fmt.get("json_schema") or {}).get("schema") or {}, self.text)
        elif fmt.get("type") == "json_object":
            self.content = json.dumps({"answer": self.text})
        else:
            self.content = self.text
        words = self.content.split(" ")
        self.tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
        self.finish = "stop"

    def completion_tokens(self) -> int:
        return len(self.fragments) if self.tool is not None else len((self.content or "").split())

    def tool_call(self) -> dict[str, Any]:
        assert self.tool is not None
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.tool.get("name"), "arguments": self.arguments},
        }

    def message(self) -> dict[str, Any]:
        if self.tool is not None:
            return {"role": "assistant", "content": None, "tool_calls": [self.tool_call()]}
        return {"role": "assistant", "content": self.content}

    def steps(self, top: int | None) -> list[tuple[dict[str, Any], Any, str | None]]:
        """The stream of this choice: (delta, logprobs, finish_reason) per chunk."""
        if self.tool is not None:
            call = self.tool_call()
            first = {"index": 0, **call, "function": {**call["function"], "arguments": ""}}
            out: list[tuple[dict[str, Any], Any, str | None]] = [
                ({"role": "assistant", "content": None, "tool_calls": [first]}, None, None)
            ]
            for fragment in self.fragments:
                call = {"index": 0, "function": {"arguments": fragment}}
                out.append(({"tool_calls": [call]}, None, None))
        else:
            out = [({"role": "assistant", "content": ""}, None, None)]
            for j, token in enumerate(self.tokens):
                lp = None
                if top is not None:
                    lp = {"content": [logprob_entry(token, j, top)], "refusal": None}
                out.append(({"content": token}, lp, None))
        out.append(({}, None, self.finish))
        return out

    def logprobs(self, top: int | None) -> Any:
        if top is None:
            return None
        if self.tool is not None:
            return {"content": None, "refusal": None}
        entries = [logprob_entry(t, j, top) for j, t in enumerate(self.tokens)]
        return {"content": entries, "refusal": None}


ARGUMENT_FRAGMENT = 8  # characters of tool call arguments per streamed chunk


def logprob_entry(token: str, position: int, top: int) -> dict[str, Any]:
    """A token's logprob (deterministic: from its position) and `top` alternatives,
    the token itself first."""
    logprob = -0.125 * (position % 8) - 0.0625

    def one(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

    alternatives = [one(token, logprob)] + [
        one(f"{token.strip()}~{m}", logprob - m) for m in range(1, top)
    ]
    return {**one(token, logprob), "top_logprobs": alternatives[:top]}


def logprob_top(body: dict[str, Any]) -> int | None:
    """None without `logprobs: true`, else the number of top alternatives asked for."""
    if not body.get("logprobs"):
        return None
    return int(body.get("top_logprobs") or 0)


async def gate(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
    """Record the request and decide whether it fails; (body, None) or (None, error)."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    auth = request.headers.get("authorization")
    entry: dict[str, Any] = {
        "t": time.time(),
        "path": request.url.path,
        "authorization": auth,
        "body": body,
        "status": 200,
    }
    STATE.requests.append(entry)
    if STATE.delay_ms:
        await asyncio.sleep(STATE.delay_ms / 1000)
    status: int | None = None
    message = None
    if STATE.require_key is not None and auth != f"Bearer {STATE.require_key}":
        status, message = 401, "mock: wrong or missing API key"
    elif STATE.always is not None:
        status = int(STATE.always)
    elif STATE.fail:
        status = STATE.fail.pop(0)
    elif not isinstance(body, dict):
        status, message = 400, "mock: the body is not a JSON object"
    if status is not None:
        entry["status"] = status
        return None, error_response(status, message)
    return body, None


async def chat(request: Request) -> Response:
    body, error = await gate(request)
    if error is not None or body is None:
        return error or error_response(400)
    STATE.counter += 1
    cid = f"chatcmpl-mock{STATE.counter}"
    created = int(time.time())
    model = body.get("model", "mock")
    n = max(1, int(body.get("n") or 1))
    answers = [Answer(body, i, f"call_mock{STATE.counter}x{i}") for i in range(n)]
    top = logprob_top(body)
    prompt_tokens = len(json.dumps(body.get("messages")).split())
    completion_tokens = sum(a.completion_tokens() for a in answers)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    top_fields = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if not body.get("stream"):
        return JSONResponse(
            {
                **top_fields,
                "choices": [
                    {
                        "index": a.index,
                        "message": a.message(),
                        "logprobs": a.logprobs(top),
                        "finish_reason": a.finish,
                    }
                    for a in answers
                ],
                "usage": usage,
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(choices: list[dict[str, Any]], **more: Any) -> str:
        data = {**top_fields, "object": "chat.completion.chunk", "choices": choices, **more}
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        # the choices' chunks interleaved, a chunk of each in turn, as OpenAI sends them
        streams = [a.steps(top) for a in answers]
        for step in range(max(len(s) for s in streams)):
            for answer, steps in zip(answers, streams, strict=True):
                if step < len(steps):
                    delta, logprobs, finish = steps[step]
                    part = {"index": answer.index, "delta": delta, "logprobs": logprobs}
                    yield chunk([{**part, "finish_reason": finish}])
        if include_usage:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def completions(request: Request) -> Response:
    body, error = await gate(request)
    if error is not None or body is None:
        return error or error_response(400)
    STATE.counter += 1
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        prompt = " ".join(map(str, prompt))
    return JSONResponse(
        {
            "id": f"cmpl-mock{STATE.counter}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "mock"),
            "choices": [{"index": 0, "text": prompt, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage_for(prompt, prompt),
        }
    )


def mock_vector(text: str) -> list[float]:
    """Four numbers from the text, exact in float32 (so base64 round-trips exactly)."""
    return [float(len(text)), float(len(text.split())), 0.5, -0.25]


async def embeddings(request: Request) -> Response:
    body, error = await gate(request)
    if error is not None or body is None:
        return error or error_response(400)
    value = body.get("input", "")
    texts = [value] if isinstance(value, str) else [str(v) for v in value]
    tokens = sum(len(t.split()) for t in texts)
    data = []
    for i, text in enumerate(texts):
        vector: Any = mock_vector(text)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", "mock"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def control(request: Request) -> Response:
    STATE.configure(await request.json())
    return JSONResponse(STATE.snapshot())


async def requests_(request: Request) -> Response:
    return JSONResponse({"requests": STATE.requests})


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/control", control, methods=["POST"]),
        Route("/requests", requests_, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail", default="", help="Comma-separated statuses for next requests.")
    parser.add_argument("--retry-after", type=float, default=None)
    parser.add_argument("--always", type=int, default=None)
    parser.add_argument("--require-key", default=None)
    parser.add_argument("--delay-ms", type=float, default=0)
    args = parser.parse_args()
    STATE.configure(
        {
            "fail": [int(s) for s in args.fail.split(",") if s.strip()],
            "retry_after": args.retry_after,
            "always": args.always,
            "require_key": args.require_key,
            "delay_ms": args.delay_ms,
        }
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
