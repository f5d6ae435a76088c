"""Connections that cannot starve the server: uvicorn's httptools protocol with a deadline
for a request's line and headers, a limit on their size, a longest pause while a body
arrives, and a cap on the connections open from one client address.

uvicorn times out only idle keep-alive connections; a client that sends a header byte
every few seconds, or opens a connection and sends nothing, is kept forever, and enough
of them use up the process's open files. Here such a connection is answered 408 and
closed once `header_timeout` has passed since its request began (or since it opened),
a request whose line and headers exceed `max_header_bytes` is answered 431, and a
connection over the per-address cap is answered 429 and closed at once, before it costs
more than a moment. A WebSocket leaves these rules once upgraded (its key was checked).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from openbeepboop.server.settings import ServerSettings


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_header_bytes: int
    per_client: int  # 0: no cap

    @classmethod
    def of(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
            max_header_bytes=settings.max_header_bytes,
            per_client=settings.max_connections_per_client,
        )


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` that applies `limits`; one per
    server, holding that server's count of connections per client address."""
    open_from: Counter[str] = Counter()

    class Guarded(_GuardedProtocol):
        pass

    Guarded.limits = limits
    Guarded.open_from = open_from
    return Guarded


def _response(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _GuardedProtocol(HttpToolsProtocol):
    limits: ConnectionLimits
    open_from: Counter[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._address: str | None = None  # counted against open_from while set
        self._in_headers = True
        self._awaiting_body = False
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        if address is not None and self.limits.per_client > 0:
            if self.open_from[address] >= self.limits.per_client:
                self._refuse(429, "Too Many Requests", "too many open connections from here")
                return
            self.open_from[address] += 1
            self._address = address
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        """Stop the timers and leave the per-address count (closed, or upgraded)."""
        if self._address is not None:
            self.open_from[self._address] -= 1
            if self.open_from[self._address] <= 0:
                del self.open_from[self._address]
            self._address = None
        self._cancel_header_timer()
        self._cancel_body_timer()

    def handle_websocket_upgrade(self) -> None:
        self._forget()
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        """Timers are armed only for a request still incomplete after a read: one that
        arrives whole in one read (most do) costs none."""
        if self._refused:
            return
        self._cancel_body_timer()  # a byte came: the pause starts again
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"the request line and headers are over {self.limits.max_header_bytes} bytes",
                )
            elif self._header_timer is None:
                self._arm_header_timer()
        elif self._awaiting_body:
            self._arm_body_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()
        self._awaiting_body = self.cycle is not None and self.cycle.scope is self.scope

    def on_message_complete(self) -> None:
        self._awaiting_body = False
        self._cancel_body_timer()
        super().on_message_complete()

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._refused = True
        self._forget()
        if not self.transport.is_closing():
            self.transport.write(_response(status, reason, message))
            self.transport.close()

    # -- timers -------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._in_headers:
            self._refuse(408, "Request Timeout", "the request headers took too long")

    def _arm_body_timer(self) -> None:
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_late)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_late(self) -> None:
        """No body byte for `body_timeout`: drop the connection (the app sees the client
        leave), unless reading is paused because the app has not taken what came."""
        self._body_timer = None
        if self.flow is not None and self.flow.read_paused:
            self._arm_body_timer()
            return
        self._refused = True
        self._forget()
        self.transport.close()
