"""`echo`: answers with the last user message. For demos, load tests and checks."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import Field

from openbeepboop.node.backends import embeddings
from openbeepboop.node.backends.base import JSON, Chunk, ModelConfig, Progress, last_user_text

MAX_DIMENSIONS = 8192


class EchoModel(ModelConfig):
    """Built in: answers with the last user message after `delay_ms`."""

    delay_ms: float = Field(0, ge=0)
    token_delay_ms: float = Field(0, ge=0, description="Pause between streamed words.")
    load_ms: float = Field(
        0, ge=0, description="How long loading takes (again at each switch to the model)."
    )
    embedding_dimensions: int = Field(
        256, ge=1, le=MAX_DIMENSIONS, description="Length of its embeddings."
    )


def pseudo_embedding(item: str | list[int], dimensions: int) -> list[float]:
    """A unit vector seeded by a hash of `item`: the same text, the same vector."""
    seed = hashlib.sha256(repr(item).encode()).digest()
    rng = random.Random(seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


class EchoBackend:
    """Loads in `load_ms`; waits `delay_ms`, then streams the last user message back
    word by word; embeds as a unit vector seeded by a hash of the text."""

    Config = EchoModel

    def __init__(self, config: EchoModel, models_dir: Path | None = None) -> None:
        self.config = config
        self.state = "loading"

    async def load(self, progress: Progress) -> None:
        if self.config.load_ms:  # stands in for reading weights (exclusive_models switches)
            progress("loading", 0.0)
            await asyncio.sleep(self.config.load_ms / 1000)
        self.state = "ready"
        progress("ready", 1.0)

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        if self.config.delay_ms:
            await asyncio.sleep(self.config.delay_ms / 1000)
        if endpoint == embeddings.ENDPOINT:
            yield self._embed(request)
            return
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

    def _embed(self, request: JSON) -> Chunk:
        items = embeddings.inputs(request)
        dimensions = request.get("dimensions") or self.config.embedding_dimensions
        if not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
            raise embeddings.refuse(
                f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}", "dimensions"
            )
        vectors = [pseudo_embedding(item, dimensions) for item in items]
        tokens = sum(len(i) if isinstance(i, list) else len(i.split()) for i in items)
        return embeddings.answer(embeddings.embedding_response(request, vectors, tokens))

    async def close(self) -> None:
        self.state = "loading"
