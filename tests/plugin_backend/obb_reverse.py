"""`reverse`: an OpenBeepBoop backend plugin that answers with `prefix` and the last user
message reversed, `times` times over, in one piece (the tests' throwaway third-party
backend)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from openbeepboop.node.backends.base import JSON, Chunk, ModelConfig, Progress, last_user_text


class ReverseModel(ModelConfig):
    """The keys of a `backend = "reverse"` entry, besides the common ones."""

    prefix: str = Field(description="Text said before each reversed prompt")
    times: int = Field(1, ge=1, le=10, description="How many times the reversed text is said.")
    separator: str = Field(" ", description="Put between the repeats.")


class ReverseBackend:
    """Says the prompt backwards."""

    Config = ReverseModel

    def __init__(self, config: ReverseModel, models_dir: Path) -> None:
        self.config = config
        self.state = "loading"

    async def load(self, progress: Progress) -> None:
        self.state = "ready"
        progress("ready", 1.0)

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        said = self.config.prefix + last_user_text(request)[::-1]
        text = self.config.separator.join([said] * self.config.times)
        yield Chunk(text=text)
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        yield Chunk(finish_reason="stop", usage=usage)

    async def close(self) -> None:
        self.state = "loading"
