"""Server-sent events read from an aiohttp response body, as the WHATWG HTML standard
parses a `text/event-stream` (https://html.spec.whatwg.org/multipage/server-sent-events.html).

Here rather than a library: the `openai` backend calls its endpoint with aiohttp, and no
maintained SSE client for aiohttp is among this project's dependencies (httpx-sse works
only with httpx). Only the parsing is needed, and it is short:

- the body is UTF-8 (one leading byte order mark is ignored), read as it comes, however
  the network splits it (a line, a UTF-8 character or a CRLF may straddle two reads);
- lines end in `\\n`, `\\r\\n` or `\\r`; a blank line dispatches the event gathered so far;
- a line starting with `:` is a comment; `field: value` loses one space after the colon;
  a line without a colon is a field with an empty value;
- `event` names the event (`message` when none), each `data` adds a line to the data
  (joined with `\\n`), `id` sets the last event id (kept for the events that follow, and
  ignored when it holds a NUL); `retry` (a reconnection delay: there is no reconnection
  here) and unknown fields are ignored;
- an event without any `data` field is not dispatched, nor is one cut short at the end
  of the stream (no blank line after it).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

_LINE_END = re.compile(r"\r\n?|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event: its type, its data lines joined, the last event id seen."""

    event: str = "message"
    data: str = ""
    id: str = ""


class ByteStream(Protocol):
    """What is read: an aiohttp `StreamReader` (`response.content`), or a test's stand-in."""

    def iter_any(self) -> AsyncIterator[bytes]: ...


async def aiter_sse(content: ByteStream) -> AsyncGenerator[ServerSentEvent, None]:
    """The events of an event stream, each as soon as its blank line has come."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    parts: list[str] = []  # the line that has not ended yet
    after_cr = False  # the last read ended with "\r": a "\n" first in the next is its end
    event, last_id = "", ""
    data: list[str] = []
    async for raw in content.iter_any():
        text = decoder.decode(raw)
        if not text:  # only part of a UTF-8 character so far
            continue
        if after_cr and text[0] == "\n":
            text = text[1:]
        after_cr = text.endswith("\r")
        if "\n" not in text and "\r" not in text:
            parts.append(text)
            continue
        lines = _LINE_END.split("".join(parts) + text)
        parts = [lines.pop()]
        for line in lines:
            if not line:  # a blank line: dispatch
                if data:
                    yield ServerSentEvent(event or "message", "\n".join(data), last_id)
                event, data = "", []
                continue
            if line.startswith(":"):  # a comment
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                last_id = value
    # the end: an event not closed by a blank line is dropped, as the standard says
