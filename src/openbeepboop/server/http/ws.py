"""`WS /ws`: the LLM Worker's WebSocket job protocol.

Client → server (JSON text frames):
- `add` {id, query, assistant, history} — `assistant` is `{"streams": [...]}`, a template
  name, or `{"template": name}`; answered `resp_add` {id, job_id}; the sender then
  follows the job (as after `listen`).
- `listen` {job_id} — follow any job this key may see (the text so far first).
- `cancel` {job_id} — answered `resp_cancel` {job_id, status}.
Server → client: `running` {job_id, message: text piece} (an empty one when the job
starts), `done` {job_id}, `failed` {job_id, message, code}. When an `add` job fails and
its assistant has another stream, the next stream is submitted: a new `resp_add` {id,
job_id, fallback: n} follows, then that job's updates.
A malformed or unknown message gets `error` {message, id?}; the connection stays open.
Authentication: `Authorization: Bearer <key>` or, for browsers, `?api_key=<key>`.

Limits: each `add`, `listen` and `cancel` counts against the key's rate limit like an
HTTP request (over it: `error` {code: "rate_limit_exceeded", retry_after}), and an
`add` against its active-job limit (`too_many_active_jobs`). When the key is revoked,
the server sends `error` {code: "api_key_revoked"} and closes with 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from openbeepboop.server.core import json_input
from openbeepboop.server.core.assistants import Assistants
from openbeepboop.server.core.choices import content_of
from openbeepboop.server.core.events import job_events
from openbeepboop.server.core.pins import take_pin
from openbeepboop.server.core.queue import JobRequest, Queue
from openbeepboop.server.errors import DomainError, InvalidRequest, RateLimited
from openbeepboop.server.http.bodies import CheckedRoute
from openbeepboop.server.http.errors import domain_error_response
from openbeepboop.server.http.guards import authenticate, bearer
from openbeepboop.server.http.state import AppState, app_state
from openbeepboop.server.models import JSON, ApiKey, Role

log = logging.getLogger("openbeepboop.ws")
router = APIRouter(route_class=CheckedRoute)
MAX_FRAME = 1 << 20
REVOKED = "the API key of this connection was revoked"


class _Session:
    """One connection: its key, the jobs it follows, one writer at a time."""

    def __init__(self, ws: WebSocket, key: ApiKey, state: AppState):
        self.ws = ws
        self.key = key
        self.queue: Queue = state.queue
        self.assistants: Assistants = state.assistants
        self.state = state
        self.following: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False

    async def send(self, message: JSON) -> None:
        async with self._send_lock:
            if not self.closed:
                await self.ws.send_text(orjson.dumps(message).decode())

    async def close_when(self, revoked: asyncio.Event) -> None:
        """Once the key is revoked: say so, and close (1008, policy violation)."""
        await revoked.wait()
        await self.send({"type": "error", "message": REVOKED, "code": "api_key_revoked"})
        async with self._send_lock:
            self.closed = True
            with contextlib.suppress(RuntimeError):  # the client closed first
                await self.ws.close(code=1008, reason=REVOKED)

    async def handle(self, raw: str) -> None:
        try:
            message = json_input.loads(raw)
        except ValueError as exc:
            await self.send({"type": "error", "message": f"not valid JSON: {exc}"})
            return
        except InvalidRequest as exc:
            await self.send(
                {"type": "error", "message": exc.message, "code": exc.code, "param": exc.param}
            )
            return
        if not isinstance(message, dict):
            await self.send({"type": "error", "message": "a message is a JSON object"})
            return
        kind = message.get("type")
        handler = {"add": self.add, "listen": self.listen, "cancel": self.cancel}.get(
            kind if isinstance(kind, str) else ""
        )
        try:
            if handler is None:
                raise _Bad(f"unknown message type {kind!r}; expected add, listen or cancel")
            await self.state.rate_limiter.hit(self.key)  # the key's limit, as for HTTP
            await handler(message)
        except (_Bad, DomainError) as exc:
            reply: JSON = {"type": "error", "message": str(exc)}
            if isinstance(exc, DomainError):
                reply["code"] = exc.code
            if isinstance(exc, RateLimited):
                reply["retry_after"] = exc.retry_after
            for field in ("id", "job_id"):
                if isinstance(message.get(field), str):
                    reply[field] = message[field]
            await self.send(reply)

    async def add(self, message: JSON) -> None:
        client_id = message.get("id")
        query = message.get("query", "")
        if not isinstance(client_id, str) or not client_id:
            raise _Bad("'add' needs an 'id' (your name for the job)")
        if not isinstance(query, str):
            raise _Bad("'query' must be a string")
        streams = await self.assistants.streams_of(self.key, message.get("assistant"))
        bodies = await self.assistants.bodies(streams, query, message.get("history"))
        # a pin (`node`, `node_labels`) holds for every stream: it rides in each body
        # until `_submit` takes it out
        pin = {k: message[k] for k in ("node", "node_labels") if message.get(k) is not None}
        bodies = [{**body, **pin} for body in bodies] if pin else bodies
        job_id = await self._submit(bodies[0], client_id)
        await self.send({"type": "resp_add", "id": client_id, "job_id": job_id})
        self._follow(job_id, fallbacks=bodies[1:], client_id=client_id)

    async def _submit(self, body: JSON, client_id: str) -> str:
        body, node, labels = take_pin(body)
        request = JobRequest(
            endpoint="/v1/chat/completions",
            body=body,
            metadata={"ws_id": client_id},
            node=node,
            node_labels=labels,
        )
        return (await self.queue.submit(self.key, [request]))[0].job.id

    async def listen(self, message: JSON) -> None:
        job_id = message.get("job_id")
        if not isinstance(job_id, str):
            raise _Bad("'listen' needs a 'job_id'")
        await self.queue.get(self.key, job_id)  # NotFound for a job this key may not see
        self._follow(job_id)

    async def cancel(self, message: JSON) -> None:
        job_id = message.get("job_id")
        if not isinstance(job_id, str):
            raise _Bad("'cancel' needs a 'job_id'")
        job = await self.queue.cancel(self.key, job_id)
        await self.send({"type": "resp_cancel", "job_id": job_id, "status": job.status.value})

    def _follow(
        self, job_id: str, fallbacks: list[JSON] | None = None, client_id: str = ""
    ) -> None:
        if job_id in self.following and not self.following[job_id].done():
            return
        task = asyncio.create_task(self._relay(job_id, fallbacks or [], client_id))
        self.following[job_id] = task

    async def _relay(self, job_id: str, fallbacks: list[JSON], client_id: str) -> None:
        """Send the job's updates; on failure, submit the next fallback and follow it."""
        try:
            attempt = 0
            while True:
                last = await self._updates(job_id, final_failure=not fallbacks)
                if last != "failed" or not fallbacks:
                    return
                attempt += 1
                job_id = await self._submit(fallbacks.pop(0), client_id)
                await self.send(
                    {"type": "resp_add", "id": client_id, "job_id": job_id, "fallback": attempt}
                )
        except (WebSocketDisconnect, RuntimeError):
            return  # the socket closed; the job goes on
        except Exception:  # a follower must never take the connection down
            log.exception("following job %s failed", job_id)

    async def _updates(self, job_id: str, final_failure: bool) -> str:
        job = await self.queue.get(self.key, job_id)
        async for event in job_events(self.queue, job):
            if event.type == "started":
                await self.send({"type": "running", "job_id": job_id, "message": ""})
            elif event.type == "token":
                await self.send({"type": "running", "job_id": job_id, "message": event.data["t"]})
            elif event.type in ("downloading", "loading"):  # the model, fetched for the job
                progress = {"type": event.type, **event.data}
                await self.send(
                    {"type": "running", "job_id": job_id, "message": "", "progress": progress}
                )
            elif event.type == "delta":  # not choice 0's text: the OpenAI chunk choice
                choice = event.data["choice"]
                text = content_of(choice) if choice["index"] == 0 else ""
                await self.send(
                    {"type": "running", "job_id": job_id, "message": text, "choice": choice}
                )
            elif event.type == "end":
                await self.send({"type": "done", "job_id": job_id})
                return "done"
            elif event.type in ("failed", "cancelled"):
                if event.type == "cancelled":
                    code, text = "cancelled", "the job was cancelled"
                else:
                    code, text = event.data["code"], event.data["message"]
                if final_failure or event.type == "cancelled":
                    await self.send(
                        {"type": "failed", "job_id": job_id, "message": text, "code": code}
                    )
                    return "cancelled" if event.type == "cancelled" else "final"
                return "failed"
        return "done"

    async def close(self) -> None:
        for task in self.following.values():
            task.cancel()
        for task in self.following.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Bad(Exception):
    """A message this protocol cannot act on."""


def _token(ws: WebSocket) -> str | None:
    return bearer(ws.headers.get("authorization")) or ws.query_params.get("api_key")


@router.websocket("/ws")
@router.websocket("/ws/")
async def websocket_jobs(ws: WebSocket) -> None:
    state = app_state(ws)
    try:
        key = await authenticate(state, _token(ws), Role.CLIENT)
    except DomainError as exc:
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            # the handshake answered as HTTP would: 401 (or 403) with OpenAI's error body
            await ws.send_denial_response(domain_error_response(exc))
        else:
            await ws.close(code=1008, reason=str(exc)[:120])
        return
    await ws.accept()
    session = _Session(ws, key, state)
    with state.keyring.watch(key.id) as revoked:
        closer = asyncio.create_task(session.close_when(revoked))
        try:
            while True:
                frame: Any = await ws.receive()
                if frame["type"] == "websocket.disconnect" or session.closed:
                    break
                raw = frame.get("text")
                if raw is None:
                    raw = (frame.get("bytes") or b"").decode("utf-8", errors="replace")
                if len(raw) > MAX_FRAME:
                    await session.send({"type": "error", "message": "message larger than 1 MiB"})
                    continue
                await session.handle(raw)
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: closed on revocation
            pass
        finally:
            closer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closer
            await session.close()
