"""`openai`: any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp's server,
Ollama's `/v1`, LM Studio, ...), called directly with aiohttp.

The job's request goes upstream as it came (only `model` is replaced by the upstream
name, and the config's `extra` merged in), so every field the endpoint knows — tools,
response_format, logprobs, vendor extensions — works without this module knowing it.
Chat completions stream (so that followers get tokens as they come) unless the request
says `"stream": false`; text completions stream only when their client streams. A
streamed answer is assembled into one `chat.completion` (or `text_completion`) at the
end, as the `openai` SDK assembles one.

On aiohttp (and sse.py for the streams) rather than httpx: the upstream call is on every
job's path, and aiohttp spends about a quarter of httpx's CPU on a call (0.28 ms against
0.96 ms on loopback), as for the node's own calls to the server (client.py).

No retries here: the node retries with its own backoff and pacing (see litellm.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict
from pydantic import Field, field_validator
from yarl import URL

from openbeepboop.node.backends import embeddings
from openbeepboop.node.backends.base import (
    JSON,
    BackendError,
    Chunk,
    Progress,
    ProviderConfig,
    streamed_choices,
    whole_answer,
)
from openbeepboop.node.backends.ratelimit_headers import TRANSIENT_STATUSES, retry_after
from openbeepboop.node.backends.sse import aiter_sse
from openbeepboop.node.http_env import proxy_arguments, tls_context

CONNECT_TIMEOUT = 10.0
# idle connections are closed before the endpoint's server closes them (uvicorn's
# default, which vLLM keeps, is 5 s), lest a request go out on a connection being closed
KEEPALIVE_SECONDS = 4.0
# what a streamed call asks for (as httpx-sse asked)
_SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
# upstream error codes (or llama.cpp's error type) meaning the prompt is too long
CONTEXT_CODES = {"context_length_exceeded", "exceed_context_size_error"}
# delta keys whose values are not text to append: they identify or discriminate (and some
# servers repeat them in every chunk)
_REPLACED_KEYS = {"index", "type", "id", "role"}


class OpenAIModel(ProviderConfig):
    """Any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp's server, Ollama's
    /v1, LM Studio, ...), called directly; request fields pass through untouched."""

    api_base: str = Field(
        description="The base URL the OpenAI paths follow, e.g. http://127.0.0.1:11434/v1."
    )
    model: str | None = Field(
        None, min_length=1, description="The upstream model name; default: `name`."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent with every request."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Merged into every request body."
    )

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:11434/v1")
        return value

    def upstream_model(self) -> str:
        """The model name sent upstream."""
        return self.model or self.name


class OpenAIBackend:
    """Calls an OpenAI-compatible endpoint with one pooled, keep-alive aiohttp session."""

    Config = OpenAIModel

    def __init__(self, config: OpenAIModel, models_dir: Path | None = None) -> None:
        self.config = config
        self.state = "loading"
        self._base = config.api_base.rstrip("/") + "/"
        self._session: aiohttp.ClientSession | None = None  # made on the running loop
        self._proxy: dict[str, Any] = {}  # the proxy arguments of every request
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._sse_headers: CIMultiDict[str] = CIMultiDict()

    async def load(self, progress: Progress) -> None:
        https = URL(self.config.api_base).scheme == "https"
        headers = CIMultiDict({"Content-Type": "application/json"})
        key = self.config.resolved_api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._proxy, proxy_headers = proxy_arguments(self.config.api_base)
        headers.update(proxy_headers)
        headers.update(self.config.headers)  # the config's own headers win, whatever their case
        # per request, not as the session's defaults: aiohttp copies a session's default
        # headers onto a proxy's CONNECT, and turns an Authorization there into the
        # Proxy-Authorization, which would hand the provider's key to the proxy
        self._headers = headers
        self._sse_headers = CIMultiDict(headers)
        self._sse_headers.update(_SSE_HEADERS)
        if self._session is not None:
            await self._session.close()
        self._session = aiohttp.ClientSession(
            # between two reads, as long as a generation may take (an answer that comes
            # whole comes at its end); no limit on the whole
            timeout=aiohttp.ClientTimeout(
                connect=CONNECT_TIMEOUT, sock_read=self.config.timeout_seconds
            ),
            # jobs are bounded by `concurrency`: no limit of connections besides
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=KEEPALIVE_SECONDS, ssl=tls_context() if https else True
            ),
        )
        self.state = "ready"
        progress("ready", 1.0)

    def _body(self, request: JSON) -> JSON:
        return {**request, **self.config.extra, "model": self.config.upstream_model()}

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        session = self._session
        if session is None:
            raise BackendError("the backend is not loaded", code="backend_error", retryable=False)
        url = self._base + endpoint.removeprefix("/v1/")  # relative to api_base
        body = self._body(request)
        try:
            if endpoint == embeddings.ENDPOINT:  # passed through, never streamed
                body.pop("stream", None)
                body.pop("stream_options", None)
                yield embeddings.answer(
                    embeddings.in_format(await self._post(session, url, body), request)
                )
                return
            text_completion = endpoint == "/v1/completions"
            if request.get("stream") is False or (text_completion and not request.get("stream")):
                if body.get("stream"):  # whole answers only: this one is not streamed
                    body["stream"] = False
                    body.pop("stream_options", None)
                yield await self._whole(session, url, body, request)
                return
            options = body.get("stream_options")
            body["stream"] = True
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            chunks = self._stream(session, url, body, request, text_completion)
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        except TimeoutError as exc:  # asyncio's, and aiohttp's ServerTimeoutError
            raise BackendError(
                f"no answer from {self.config.api_base} in time: {type(exc).__name__}",
                code="provider_unavailable",
                retryable=True,
            ) from exc
        except aiohttp.ClientError as exc:  # connect, read, payload, protocol errors
            raise BackendError(
                f"cannot reach {self.config.api_base}: {type(exc).__name__}: {exc}",
                code="provider_unavailable",
                retryable=True,
            ) from exc

    async def _whole(
        self, session: aiohttp.ClientSession, url: str, body: JSON, request: JSON
    ) -> Chunk:
        return whole_answer(await self._post(session, url, body), request)

    async def _post(self, session: aiohttp.ClientSession, url: str, body: JSON) -> JSON:
        """The provider's whole answer to `body`."""
        post = session.post(
            url, data=_dumps(body), headers=self._headers, allow_redirects=False, **self._proxy
        )
        async with post as response:
            raw = await response.read()
            if response.status >= 300:
                raise http_error(response.status, response.headers, raw)
        return _answer(raw)

    async def _stream(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: JSON,
        request: JSON,
        text_completion: bool,
    ) -> AsyncGenerator[Chunk, None]:
        stream = StreamAssembler(text_completion)
        post = session.post(
            url, data=_dumps(body), headers=self._sse_headers, allow_redirects=False, **self._proxy
        )
        async with post as response:
            if response.status >= 300:
                raise http_error(response.status, response.headers, await response.read())
            kind = response.headers.get("Content-Type", "").partition(";")[0].strip()
            if kind.lower() != "text/event-stream":  # it ignored `stream`: a whole answer
                answer = _answer(await response.read())
                text = _first_message_text(answer)
                if text:
                    yield Chunk(text=text)
                yield whole_answer(answer, request)
                return
            async with aclosing(aiter_sse(response.content)) as events:
                async for event in events:
                    data = event.data.strip()
                    if data == "[DONE]":
                        break
                    if not data:
                        continue
                    if event.event == "error":
                        raise stream_error(_error_event(data))
                    chunk = _json_object(data.encode())
                    if "error" in chunk:
                        raise stream_error(chunk["error"])
                    text = stream.add(chunk)
                    choices = streamed_choices(chunk, text_completion)
                    if text or choices:
                        yield Chunk(text=text, choices=choices)
        yield stream.final(request)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.state = "loading"


# -- answers ---------------------------------------------------------------------------


def _answer(raw: bytes) -> JSON:
    """A whole answer's JSON; an error object answered with a 2xx raises."""
    answer = _json_object(raw)
    if "error" in answer and not answer.get("choices"):
        raise stream_error(answer["error"])
    return answer


def _first_message_text(response: JSON) -> str:
    """The first choice's text: a chat message's content, or a text completion's text."""
    choice = (response.get("choices") or [{}])[0]
    if not isinstance(choice, dict):
        return ""
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else choice.get("text")
    return content if isinstance(content, str) else ""


class StreamAssembler:
    """Builds one `chat.completion` from `chat.completion.chunk`s: content (and any other
    text field of the delta) joined, tool calls merged by their `index`, logprobs
    concatenated, usage from the chunk that carries it. With `text_completion`, one
    `text_completion` from the `text` of streamed `text_completion` chunks."""

    def __init__(self, text_completion: bool = False) -> None:
        self.text_completion = text_completion
        self.top: JSON = {}  # id, created, system_fingerprint, ...
        self.choices: dict[int, JSON] = {}
        self.usage: JSON | None = None

    def add(self, chunk: JSON) -> str:
        """Take one chunk; the content text it adds to the first choice."""
        for key in ("id", "created", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None:
                self.top.setdefault(key, chunk[key])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        text = ""
        for part in chunk.get("choices") or []:
            if not isinstance(part, dict):
                continue
            index = _index(part)
            choice = self.choices.setdefault(
                index, {"message": {}, "finish_reason": None, "logprobs": None}
            )
            piece = part.get("text")
            if self.text_completion and isinstance(piece, str):
                choice["text"] = choice.get("text", "") + piece
                if index == 0:
                    text += piece
            delta = part.get("delta")
            if isinstance(delta, dict):
                merge_delta(choice["message"], delta)
                if index == 0 and isinstance(delta.get("content"), str):
                    text += delta["content"]
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]
            if isinstance(part.get("logprobs"), dict):
                choice["logprobs"] = _merge_logprobs(choice["logprobs"], part["logprobs"])
        return text

    def final(self, request: JSON) -> Chunk:
        """The last chunk: the assembled response, its finish_reason and usage."""
        if self.text_completion:
            return self._final_text(request)
        choices = [
            {
                "index": index,
                "message": _message(choice["message"]),
                "logprobs": choice["logprobs"],
                "finish_reason": choice["finish_reason"] or "stop",
            }
            for index, choice in sorted(self.choices.items())
        ]
        if not choices:
            choices = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ]
        response: JSON = {
            "id": self.top.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": self.top.get("created") or int(time.time()),
            "model": request.get("model"),
            "choices": choices,
            "usage": self.usage,
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self.top:
                response[key] = self.top[key]
        return Chunk(finish_reason=choices[0]["finish_reason"], usage=self.usage, response=response)

    def _final_text(self, request: JSON) -> Chunk:
        choices = [
            {
                "index": index,
                "text": choice.get("text", ""),
                "logprobs": choice["logprobs"],
                "finish_reason": choice["finish_reason"] or "stop",
            }
            for index, choice in sorted(self.choices.items())
        ] or [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]
        response: JSON = {
            "id": self.top.get("id") or f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": self.top.get("created") or int(time.time()),
            "model": request.get("model"),
            "choices": choices,
            "usage": self.usage,
        }
        if "system_fingerprint" in self.top:
            response["system_fingerprint"] = self.top["system_fingerprint"]
        return Chunk(finish_reason=choices[0]["finish_reason"], usage=self.usage, response=response)


def merge_delta(into: JSON, delta: JSON) -> JSON:
    """Fold one delta into `into` the way the `openai` SDK accumulates a stream: text is
    appended, objects merged, lists of objects merged by their `index` (tool calls),
    other lists extended; `index`, `type`, `id` and `role` are replaced, never appended."""
    for key, value in delta.items():
        old = into.get(key)
        if key in _REPLACED_KEYS:
            if value not in (None, "") or key not in into:
                into[key] = value
        elif old is None:
            if value is not None or key not in into:
                into[key] = _copy(value)
        elif isinstance(old, str) and isinstance(value, str):
            into[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            merge_delta(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            _merge_list(old, value)
        elif value is not None:
            into[key] = _copy(value)
    return into


def _merge_list(into: list[Any], items: list[Any]) -> None:
    for item in items:
        if isinstance(item, dict) and "index" in item:
            same = next(
                (o for o in into if isinstance(o, dict) and o.get("index") == item["index"]),
                None,
            )
            if same is not None:
                merge_delta(same, item)
                continue
        into.append(_copy(item))


def _index(item: JSON) -> int:
    index = item.get("index")
    return index if isinstance(index, int) else 0


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _merge_logprobs(into: JSON | None, part: JSON) -> JSON:
    merged: JSON = dict(into or {})
    for key, value in part.items():
        if isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = [*merged[key], *value]
        elif value is not None or key not in merged:
            merged[key] = value
    return merged


def _tool_call(call: JSON) -> JSON:
    """A streamed tool call as a `chat.completion` one: no `index`, a `type`."""
    out: JSON = {k: v for k, v in call.items() if k != "index"}
    out["type"] = out.get("type") or "function"
    return out


def _message(acc: JSON) -> JSON:
    """An accumulated delta as a `chat.completion` message."""
    message: JSON = {"role": acc.get("role") or "assistant"}
    message.update((k, v) for k, v in acc.items() if k != "role")
    calls = [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    if calls:
        calls.sort(key=_index)
        message["tool_calls"] = [_tool_call(call) for call in calls]
    else:
        message.pop("tool_calls", None)
    content = message.get("content")
    if not content:
        message["content"] = None if calls else ""
    return message


# -- errors ----------------------------------------------------------------------------


def _dumps(body: JSON) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # e.g. an integer beyond 64 bits, which orjson refuses
        return json.dumps(body).encode()


def _json_object(raw: bytes) -> JSON:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackendError(
            f"the provider answered with something that is not JSON: {_snippet(raw)}",
            code="provider_error",
            retryable=False,
        ) from exc
    if not isinstance(value, dict):
        raise BackendError(
            f"the provider answered with JSON that is not an object: {_snippet(raw)}",
            code="provider_error",
            retryable=False,
        )
    return value


def _snippet(raw: bytes, limit: int = 300) -> str:
    text = raw.decode(errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _error_fields(raw: bytes) -> tuple[str, set[str]]:
    """(message, {code, type}) of an error body: OpenAI's `{"error": {...}}`, a bare
    string, or whatever came."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _snippet(raw), set()
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or _snippet(raw)
        labels = {str(error[k]) for k in ("code", "type") if error.get(k) is not None}
        return str(message), labels
    if isinstance(error, str):
        return error, set()
    return _snippet(raw), set()


def _error_event(data: str) -> Any:
    """The payload of an `event: error`: its JSON (`{"error": {...}}` or the error
    itself), else its text as the message."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {"message": data}
    return value.get("error", value) if isinstance(value, dict) else value


def http_error(status: int, headers: Mapping[str, str], raw: bytes) -> BackendError:
    """An HTTP error answer as a BackendError, by the rules of litellm.py's `classify`."""
    detail, labels = _error_fields(raw)
    message = f"provider answered {status}: {detail or 'no message'}"
    if status in TRANSIENT_STATUSES:
        return BackendError(
            message,
            code="rate_limited" if status == 429 else "provider_error",
            retryable=True,
            retry_after=retry_after(headers),
            status=status,
        )
    if status == 400 and (labels & CONTEXT_CODES or "maximum context length" in detail.lower()):
        return BackendError(message, code="context_length_exceeded", retryable=False, status=400)
    codes = {
        400: "invalid_request",
        401: "provider_auth_failed",
        403: "provider_forbidden",
        404: "model_not_found",
    }
    return BackendError(
        message, code=codes.get(status, "provider_error"), retryable=False, status=status
    )


def stream_error(error: Any) -> BackendError:
    """An error inside a successful answer (mostly an event inside a stream): permanent,
    unless it carries a transient status (as `code` or `status`)."""
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = f"provider failed: {error.get('message') or 'no message'}"
    status = next((int(v) for v in (error.get("status"), error.get("code")) if _is_status(v)), None)
    if status in TRANSIENT_STATUSES:
        code = "rate_limited" if status == 429 else "provider_error"
        return BackendError(message, code=code, retryable=True, status=status)
    return BackendError(message, code="provider_error", retryable=False, status=status)


def _is_status(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 100 <= value <= 599
    return isinstance(value, str) and value.isdigit() and 100 <= int(value) <= 599
