"""The backend contract: one async method that yields chunks of text.

A backend is a class named by an entry point of the `openbeepboop.backends` group. Its
`Config` (a `ModelConfig` subclass) holds the keys of its `[[models]]` entries; the node
builds it as `cls(config, models_dir)`, loads it once (`load`), then asks it to
`execute` requests concurrently up to the model's `concurrency`. Built-in backends are
registered the same way a third-party one is (docs/configuration.md, "Writing a
backend").
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

JSON = dict[str, Any]


class Progress(Protocol):
    """How a backend reports getting ready: `state` ("downloading", "loading", "ready",
    ...), `fraction` from 0 to 1, and while downloading the bytes so far and in all."""

    def __call__(
        self, state: str, fraction: float, done: int | None = None, total: int | None = None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a generation: `text` of the first choice, and, for anything else a
    stream carries (other choices, tool-call fragments, logprobs, refusal, a finish
    reason), the OpenAI chunk `choices` as they were streamed (`text` is then their first
    choice's content). The last chunk carries `finish_reason` and `usage`, and may carry
    the complete OpenAI `response` when the backend has one."""

    text: str = ""
    finish_reason: str | None = None
    usage: JSON | None = None
    response: JSON | None = None
    choices: list[JSON] | None = None


class BackendError(Exception):
    """A generation failed. `retryable` errors (timeouts, 408, 429, 5xx) are tried again
    with backoff; others fail the job at once with `code` (and `param`, the request
    parameter to blame when there is one)."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retryable: bool,
        retry_after: float | None = None,
        status: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
        self.param = param


class ModelConfig(BaseModel):
    """The keys every `[[models]]` entry takes. A backend's `Config` subclasses it with
    its own keys; an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="The model name clients ask for.")
    backend: str = Field(min_length=1, description="The backend's entry point name.")
    concurrency: int = Field(1, ge=1, le=1024, description="Jobs run at once.")
    timeout_seconds: float = Field(600.0, gt=0, description="Longest single generation.")
    max_attempts: int = Field(5, ge=1, le=50, description="Tries on transient provider errors.")
    rpm: float | None = Field(None, gt=0, description="Requests per minute to pace to.")
    tpm: float | None = Field(None, gt=0, description="Tokens per minute (informational).")
    worker: bool | None = Field(
        None,
        description="Run the backend in a child process of its own (a crash there loses "
        "no job and leaves the node up); default: the backend's choice (llama_cpp: yes).",
    )
    idle_unload_seconds: float | None = Field(
        None,
        gt=0,
        validation_alias=AliasChoices("idle_unload_seconds", "idle_unload_s"),
        description="With a worker: stop it after this long without a job (its memory "
        "freed; state `unloaded`), start it again on the next job. Default: never.",
    )


class ProviderConfig(ModelConfig):
    """For a model reached over the network with an optional API key (the `openai` and
    `litellm` backends; a plugin may reuse it)."""

    api_key: str | None = None
    api_key_env: str | None = Field(None, description="Read the API key from this variable.")

    def resolved_api_key(self) -> str | None:
        """`api_key`, else the value of `api_key_env` (which must then be set), else None."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise BackendError(
                    f"model {self.name!r}: api_key_env {self.api_key_env!r} is not set",
                    code="invalid_config",
                    retryable=False,
                )
            return value
        return None


class Backend(Protocol):
    """What the node needs from a backend. A backend class may say `in_worker = True`
    (a class attribute) to be run in a worker process by default (`ModelConfig.worker`)."""

    state: str  # "loading", "ready" or "error"

    async def load(self, progress: Progress) -> None:
        """Get ready to serve (download, load weights); report progress as it goes."""

    def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        """Run one OpenAI request (`/v1/chat/completions`, `/v1/completions` or
        `/v1/embeddings`; a backend that cannot serve one refuses with a 400)."""

    async def close(self) -> None:
        """Release what `load` took."""


class BackendClass(Protocol):
    """What an `openbeepboop.backends` entry point names: a callable (usually the backend
    class) with a `Config` model, which the node calls with a validated entry of that
    model and its models directory (where downloads go)."""

    Config: ClassVar[type[ModelConfig]]

    def __call__(self, config: Any, models_dir: Path) -> Backend:
        """A backend for one `[[models]]` entry, not loaded yet."""


def last_user_text(request: JSON) -> str:
    """The text of the last user message (chat) or the prompt (completions)."""
    if "messages" in request:
        for message in reversed(request["messages"]):
            if message.get("role") == "user":
                return content_text(message.get("content"))
        return ""
    prompt = request.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def content_text(content: Any) -> str:
    """Plain text of a message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def streamed_choices(chunk: JSON, text_completion: bool = False) -> list[JSON] | None:
    """The choices of one OpenAI stream chunk (a `chat.completion.chunk`, or with
    `text_completion` a streamed `text_completion`) to push as they are, or None when
    the chunk carries only the first choice's text (pushed as plain text, the common and
    cheap case). Empty fields are left out."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    out: list[JSON] = []
    plain = True
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        entry: JSON = {"index": index}
        if text_completion:
            entry["text"] = choice.get("text") or ""
        else:
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            entry["delta"] = {k: v for k, v in delta.items() if _kept(k, v)}
            plain = plain and set(entry["delta"]) <= {"content", "role"}
        for key in ("logprobs", "finish_reason"):
            if choice.get(key):
                entry[key] = choice[key]
                plain = False
        plain = plain and index == 0
        out.append(entry)
    return None if plain else out


def _kept(key: str, value: Any) -> bool:
    return value is not None and value != [] and value != {} and key != "provider_specific_fields"


def whole_answer(response: JSON, request: JSON) -> Chunk:
    """The last chunk of an answer that came whole (an OpenAI response object), with
    `model` set back to the name the client asked for."""
    response["model"] = request.get("model", response.get("model"))
    choice = (response.get("choices") or [{}])[0]
    return Chunk(
        finish_reason=choice.get("finish_reason") or "stop",
        usage=response.get("usage"),
        response=response,
    )
