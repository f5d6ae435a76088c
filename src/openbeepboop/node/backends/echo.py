"""`echo`: answers with the last user message. For demos, load tests and checks."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from openbeepboop.node.backends.base import JSON, Chunk, ModelConfig, Progress, last_user_text


class EchoModel(ModelConfig):
    """Built in: answers with the last user message after `delay_ms`."""

    delay_ms: float = Field(0, ge=0)
    token_delay_ms: float = Field(0, ge=0, description="Pause between streamed words.")


class EchoBackend:
    """Waits `delay_ms`, then streams the last user message back word by word."""

    Config = EchoModel

    def __init__(self, config: EchoModel, models_dir: Path | None = None) -> None:
        self.config = config
        self.state = "loading"

    async def load(self, progress: Progress) -> None:
        self.state = "ready"
        progress("ready", 1.0)

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        if self.config.delay_ms:
            await asyncio.sleep(self.config.delay_ms / 1000)
        text = last_user_text(request)
        words = re.findall(r"\s*\S+", text) or [text]
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        finish = "stop"
        if isinstance(limit, int) and len(words) > limit:
            words, finish = words[:limit], "length"
        for word in words:
            if self.config.token_delay_ms:
                await asyncio.sleep(self.config.token_delay_ms / 1000)
            yield Chunk(text=word)
        prompt_tokens = len(str(request.get("messages", request.get("prompt", ""))).split())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        yield Chunk(finish_reason=finish, usage=usage)

    async def close(self) -> None:
        self.state = "loading"
