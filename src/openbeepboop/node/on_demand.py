"""Models on demand: a node whose `[node] on_demand` names spec prefixes (`hf:`,
`https://...`) serves jobs for models it does not have yet. Every DEMAND_SECONDS it asks
the server which queued jobs' models start with those prefixes (`/internal/queue/demand`)
and adds each new one as a model of its own: a `llama_cpp` model in a lazy worker, so that
the first job's worker pulls the file into the model cache (resumable, verified), loads
it, then runs the job, its events showing `downloading` and `loading` on the way. The
model is unloaded after `on_demand_idle_unload_seconds` without a job, like any worker.

The disk the cache may take for them is bounded (`on_demand_max_gb`): past it, a new
model is not added (its jobs wait for another node, or for room).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from openbeepboop.node.backoff import pause
from openbeepboop.node.client import ServerRefused, ServerUnreachable
from openbeepboop.node.session import Session

log = logging.getLogger("openbeepboop.node")
DEMAND_SECONDS = 2.0


class OnDemand:
    """Watches the queue for models under `prefixes` and hands each new one to `add`
    (which returns False when it cannot take it: no room)."""

    def __init__(
        self,
        session: Session,
        prefixes: list[str],
        known: Callable[[str], bool],
        add: Callable[[str], Awaitable[bool]],
        stopping: asyncio.Event,
    ) -> None:
        self._session = session
        self._prefixes = prefixes
        self._known = known
        self._add = add
        self._stopping = stopping
        self._refused: set[str] = set()  # logged once each

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                models = await self._session.demand(self._prefixes)
            except (ServerUnreachable, ServerRefused) as exc:
                log.debug("on-demand check failed", extra={"why": str(exc)})
                models = []
            for model in models:
                if not model.startswith(tuple(self._prefixes)) or self._known(model):
                    continue
                if await self._add(model):
                    log.info("model added on demand", extra={"model": model})
                elif model not in self._refused:
                    self._refused.add(model)
                    log.warning("no room for an on-demand model", extra={"model": model})
            await pause(DEMAND_SECONDS, self._stopping)
