"""The backend contract: one async method that yields chunks of text.

A backend is built from its model config, loaded once (`load`), then asked to
`execute` requests concurrently up to the model's `concurrency`. Built-in backends are
registered through the `openbeepboop.backends` entry point group, the same way a
third-party one would be.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

JSON = dict[str, Any]
Progress = Callable[[str, float], None]  # (state, fraction 0..1)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a generation. The last chunk carries `finish_reason` and `usage`, and
    may carry the complete OpenAI `response` when the backend has one."""

    text: str = ""
    finish_reason: str | None = None
    usage: JSON | None = None
    response: JSON | None = None


class BackendError(Exception):
    """A generation failed. `retryable` errors (timeouts, 408, 429, 5xx) are tried again
    with backoff; others fail the job at once with `code`."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        retryable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class Backend(Protocol):
    """What the node needs from a backend."""

    state: str  # "loading", "ready" or "error"

    async def load(self, progress: Progress) -> None:
        """Get ready to serve (download, load weights); report progress as it goes."""

    def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        """Run one OpenAI request (`/v1/chat/completions` or `/v1/completions`)."""

    async def close(self) -> None:
        """Release what `load` took."""


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
