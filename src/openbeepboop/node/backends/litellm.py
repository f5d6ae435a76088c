"""`litellm`: any model LiteLLM reaches (Ollama, LM Studio, vLLM, OpenAI, Anthropic, any
OpenAI-compatible `api_base`).

LiteLLM's own retries are off: the node retries with its own backoff and pacing, so
that a 429's `Retry-After` slows every job of the model, not only the one that met it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import Field

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

PASSTHROUGH = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "reasoning_effort",
    "suffix",
    "echo",
    "best_of",
)


class LiteLLMModel(ProviderConfig):
    """Anything LiteLLM reaches: Ollama, LM Studio, vLLM, OpenAI, Anthropic, ..."""

    model: str = Field(min_length=1, description="A LiteLLM model string, e.g. ollama/llama3.")
    api_base: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Passed to LiteLLM as is.")


def _import_litellm() -> Any:
    # offline-safe: no fetch of the remote price map, no telemetry
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


class LiteLLMBackend:
    """Calls LiteLLM. Chat completions stream (so that followers get tokens as they
    come) unless the request says `"stream": false` (a synchronous caller that takes the
    answer whole); text completions come whole."""

    Config = LiteLLMModel

    def __init__(self, config: LiteLLMModel, models_dir: Path | None = None) -> None:
        self.config = config
        self.state = "loading"
        self._litellm: Any = None
        self._api_key: str | None = None

    async def load(self, progress: Progress) -> None:
        self._api_key = self.config.resolved_api_key()
        self._litellm = _import_litellm()
        self.state = "ready"
        progress("ready", 1.0)

    def _kwargs(self, request: JSON) -> dict[str, Any]:
        kw: dict[str, Any] = {k: request[k] for k in PASSTHROUGH if request.get(k) is not None}
        kw.update(self.config.extra)
        kw.update(model=self.config.model, num_retries=0, timeout=self.config.timeout_seconds)
        if self.config.api_base:
            kw["api_base"] = self.config.api_base
        if self._api_key:
            kw["api_key"] = self._api_key
        return kw

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        litellm = self._litellm
        kw = self._kwargs(request)
        try:
            if endpoint == embeddings.ENDPOINT:
                yield await self._embed(request)
                return
            if endpoint == "/v1/completions":
                response = await litellm.atext_completion(prompt=request.get("prompt", ""), **kw)
                yield whole_answer(response.model_dump(), request)
                return
            if request.get("stream") is False:
                response = await litellm.acompletion(messages=request["messages"], **kw)
                yield whole_answer(response.model_dump(), request)
                return
            stream = await litellm.acompletion(
                messages=request["messages"],
                stream=True,
                stream_options={"include_usage": True},
                **kw,
            )
            parts = []
            async for part in stream:
                parts.append(part)
                choices = part.choices or []
                text = choices[0].delta.content if choices and choices[0].delta else None
                structured = streamed_choices(
                    part.model_dump(exclude_none=True, exclude={"provider_specific_fields"})
                )
                if text or structured:
                    yield Chunk(text=text or "", choices=structured)
            built = litellm.stream_chunk_builder(parts, messages=request["messages"])
        except Exception as exc:
            raise classify(exc) from exc
        yield whole_answer(built.model_dump(), request)

    async def _embed(self, request: JSON) -> Chunk:
        kw: dict[str, Any] = {
            k: request[k]
            for k in ("dimensions", "encoding_format", "user")
            if request.get(k) is not None
        }
        kw.update(self.config.extra)
        kw.update(model=self.config.model, timeout=self.config.timeout_seconds)
        if self.config.api_base:
            kw["api_base"] = self.config.api_base
        if self._api_key:
            kw["api_key"] = self._api_key
        response = await self._litellm.aembedding(input=embeddings.inputs(request), **kw)
        answer = response.model_dump()
        answer.pop("_hidden_params", None)
        answer.pop("_response_ms", None)
        return embeddings.answer(embeddings.in_format(answer, request))

    async def close(self) -> None:
        self.state = "loading"


def _retry_after(exc: Exception) -> float | None:
    headers: Any = getattr(exc, "litellm_response_headers", None)
    response = getattr(exc, "response", None)
    if headers is None and response is not None:
        headers = getattr(response, "headers", None)
    return retry_after(headers, prefixes=("", "llm_provider-"))


def classify(exc: Exception) -> BackendError:
    """A LiteLLM (or transport) exception as a BackendError: transient or permanent."""
    if isinstance(exc, BackendError):
        return exc
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    message = str(getattr(exc, "message", None) or exc)
    if name == "ContextWindowExceededError":
        return BackendError(message, code="context_length_exceeded", retryable=False, status=400)
    if name in ("Timeout", "APIConnectionError", "TimeoutError") or status is None:
        return BackendError(message, code="provider_unavailable", retryable=True, status=status)
    if status in TRANSIENT_STATUSES:
        code = "rate_limited" if status == 429 else "provider_error"
        return BackendError(
            message, code=code, retryable=True, retry_after=_retry_after(exc), status=status
        )
    codes = {400: "invalid_request", 401: "provider_auth_failed", 403: "provider_forbidden"}
    code = codes.get(status, "model_not_found" if status == 404 else "provider_error")
    return BackendError(message, code=code, retryable=False, status=status)
