"""Whether the node that asked for jobs is still there to receive them.

A long-poll fetch can wait a minute; a node killed or stopped meanwhile leaves its
connection closed, and a claim made for it would sit leased to nobody until the lease
ran out (an attempt used, a live node idle). `ConnectionCaller` is the core's `Caller`
for one HTTP request: once the queue starts waiting it watches the connection (the
ASGI `http.disconnect` message), so the queue claims nothing more for a caller that
left. `LeasedJobs` is the fetch's answer: jobs claimed for a caller found gone as the
answer goes out, or whose answer cannot be sent, are handed back at once (queued again,
the attempt not counted).

A connection that dies without a word (a host cut off, no FIN, no RST) cannot be seen
from here; its jobs come back when their leases expire, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from openbeepboop.server.http.outbound import JSONResponse, leased_job_json
from openbeepboop.server.models import Job


class ConnectionCaller:
    """The caller of one request, seen through its connection (the core's `Caller`)."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._gone = False
        self._watcher: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        return self._gone

    def watch(self, wake: asyncio.Event) -> None:
        if self._watcher is None and not self._gone:
            self._watcher = asyncio.create_task(self._watch(wake))

    async def _watch(self, wake: asyncio.Event) -> None:
        # the body has been read: what the server sends next is the disconnect
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        wake.set()

    async def left(self) -> bool:
        """Whether the caller is gone, now (asking the connection when not watching)."""
        if self._gone:
            return True
        if self._watcher is None:
            self._gone = _disconnected_now(self._request.receive)
        else:
            await asyncio.sleep(0)  # a disconnect just seen by the server reaches the watcher
        return self._gone

    def close(self) -> None:
        """Stop watching (the answer has gone out, or never will)."""
        if self._watcher is not None:
            self._watcher.cancel()


def _disconnected_now(receive: Receive) -> bool:
    """Whether the server already holds a disconnect for this request, without waiting:
    the body has been read, so `receive` either answers `http.disconnect` at once or
    would wait for one. Its coroutine is stepped once and, if it would wait, closed
    (nothing was taken from it). Starlette's `Request.is_disconnected` does the same
    with an anyio cancel scope, at about thirty times the cost, on every fetch that
    leases something."""
    step = receive()
    if not isinstance(step, Coroutine):  # not a coroutine: cannot tell without waiting
        return False
    try:
        step.send(None)
    except StopIteration as answered:
        return bool(answered.value["type"] == "http.disconnect")
    except Exception:  # a connection that cannot even be read from is gone
        return True
    step.close()
    return False


Release = Callable[[Sequence[Job]], Awaitable[int]]


class LeasedJobs(JSONResponse):
    """The fetch's answer: `{"jobs": [...]}`, unless the caller is found gone as it goes
    out (or sending it fails): then the jobs are released and nobody is told of them."""

    def __init__(self, jobs: Sequence[Job], caller: ConnectionCaller, release: Release) -> None:
        super().__init__({"jobs": [leased_job_json(j) for j in jobs]})
        self._jobs = list(jobs)
        self._caller = caller
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self._jobs and await self._caller.left():
                await self._hand_back()
            try:
                await super().__call__(scope, receive, send)
            except Exception:
                await self._hand_back()
                raise
        finally:
            self._caller.close()

    async def _hand_back(self) -> None:
        jobs, self._jobs = self._jobs, []
        if jobs:
            self.body = self.render({"jobs": []})
            self.init_headers()
            await self._release(jobs)
