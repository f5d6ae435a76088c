"""`swarm`: a model served by other OpenBeepBoop servers, reached over their OpenAI API.

Each request goes to the first of the model's targets (server base URLs, best first:
the swarm's forwarder asks its member's view of the swarm for the least loaded member
serving the model, on every request), as the `openai` backend sends it (`OpenAIBackend`,
one per target, so every field passes through, chat streams and the pieces arrive as
they are made). A target that cannot be reached (connect or read errors, timeouts) or
answers 502/503 before any output is skipped for the next one; after the last, the
error is the job's (retryable: the node tries again with its backoff). An error after
output has gone out is never retried elsewhere here: the text would be repeated.

Every request says who forwards it: the `X-OpenBeepBoop-Forwarded-By` header, and the
same id in the job's `metadata` (`openbeepboop_forwarded_by`), which the receiving server
keeps with its job (knobs are not sent on to its nodes), so that its own forwarder can
refuse to forward that job again (docs/swarm.md, "Forwarding").

Outside a swarm a node may use it too, with a fixed list of servers: `members`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path

from pydantic import Field, field_validator

from openbeepboop.node.backends.base import (
    JSON,
    BackendError,
    Chunk,
    Progress,
    ProviderConfig,
)
from openbeepboop.node.backends.openai_compat import OpenAIBackend, OpenAIModel

log = logging.getLogger("openbeepboop.node")
FORWARDED_HEADER = "X-OpenBeepBoop-Forwarded-By"
FORWARDED_METADATA = "openbeepboop_forwarded_by"
FAILOVER_STATUSES = frozenset({502, 503})
# a model's targets: server base URLs (http://host:port), the best first
Targets = Callable[[str], Sequence[str]]


class SwarmModel(ProviderConfig):
    """A model served by other OpenBeepBoop servers (the swarm's forwarder; or a fixed
    list of servers), tried in order until one answers."""

    members: list[str] = Field(
        default_factory=list,
        description="Base URLs of the servers to send jobs to, in order of preference "
        "(http://host:port); the swarm's forwarder gives its own, live list instead.",
    )
    forwarded_by: str = Field(
        "", max_length=64, description="This server's id, sent with every request."
    )

    @field_validator("members")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            OpenAIModel(name="check", backend="openai", api_base=url)  # http(s):// only
        return value


class SwarmBackend:
    """Sends each job to the first target that answers (an `OpenAIBackend` per target)."""

    Config = SwarmModel

    def __init__(
        self, config: SwarmModel, models_dir: Path | None = None, targets: Targets | None = None
    ) -> None:
        self.config = config
        self.state = "loading"
        self._targets: Targets = targets or (lambda _model: config.members)
        self._upstreams: dict[str, OpenAIBackend] = {}

    async def load(self, progress: Progress) -> None:
        self.state = "ready"
        progress("ready", 1.0)

    def targets(self) -> list[str]:
        """This model's targets now, best first."""
        return list(self._targets(self.config.name))

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        targets = self.targets()
        if not targets:
            raise BackendError(
                f"no server serves model {self.config.name!r} now",
                code="model_not_available",
                retryable=True,
            )
        failed: BackendError | None = None
        for url in targets:
            upstream = await self._upstream(url)
            began = False
            try:
                chunks = upstream.execute(endpoint, request)
                assert isinstance(chunks, AsyncGenerator)  # an async generator: closable
                async with aclosing(chunks):
                    async for chunk in chunks:
                        began = True
                        yield chunk
                return
            except BackendError as exc:
                if began or not failover(exc):
                    raise
                log.warning(
                    "forward target failed; trying the next",
                    extra={"model": self.config.name, "target": url, "why": exc.message},
                )
                failed = exc
        assert failed is not None
        raise failed

    async def _upstream(self, url: str) -> OpenAIBackend:
        """The `openai` backend for one target, made (and loaded) on first use."""
        found = self._upstreams.get(url)
        if found is None:
            found = OpenAIBackend(self._upstream_config(url))
            await found.load(_quiet)
            self._upstreams[url] = found
        return found

    def _upstream_config(self, url: str) -> OpenAIModel:
        config = self.config
        mark = config.forwarded_by
        return OpenAIModel(
            name=config.name,
            backend="openai",
            api_base=url.rstrip("/") + "/v1",
            api_key=config.resolved_api_key(),
            concurrency=config.concurrency,
            timeout_seconds=config.timeout_seconds,
            headers={FORWARDED_HEADER: mark} if mark else {},
            extra={"metadata": {FORWARDED_METADATA: mark}} if mark else {},
        )

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.close()
        self._upstreams.clear()
        self.state = "loading"


def failover(error: BackendError) -> bool:
    """Whether a target's error (before any output) sends the job on to the next one:
    it could not be reached or did not answer in time, or it answered 502/503 (its queue
    has no node for the model any more, or it is shutting down)."""
    return error.code == "provider_unavailable" or error.status in FAILOVER_STATUSES


def _quiet(state: str, fraction: float, done: int | None = None, total: int | None = None) -> None:
    """Progress of an upstream's load: nothing to report (it only opens a session)."""
