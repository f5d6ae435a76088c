"""A small OpenAI-compatible mock server, run as a real process by the tests.

    python tests/mock_openai.py --port 9000 [--fail 429,429] [--retry-after 1]
        [--always 400] [--require-key KEY] [--delay-ms 0]

Routes:
- `POST /v1/chat/completions` — answers with the last user message; `stream: true`
  answers with SSE `chat.completion.chunk` lines (one per word), a usage chunk when
  `stream_options.include_usage`, then `data: [DONE]`.
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
            content = message.get("content")
            if isinstance(content, list):
                return "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def usage_for(prompt: str, answer: str) -> dict[str, int]:
    p, c = len(prompt.split()), len(answer.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


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
    answer = last_user_text(body)
    usage = usage_for(json.dumps(body.get("messages")), answer)
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None) -> str:
        data = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        words = answer.split(" ")
        for i, word in enumerate(words):
            yield chunk({"content": word if i == 0 else " " + word}, None)
        yield chunk({}, "stop")
        if include_usage:
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(data)}\n\n"
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
