"""What JSON the server takes in, from every way in (HTTP bodies, the fast lane, WebSocket
frames, batch input lines): nested at most `MAX_DEPTH` deep, and only strings that both
stores can hold. SQLite keeps a NUL or a lone UTF-16 surrogate where PostgreSQL refuses
them (TEXT and jsonb hold no NUL; UTF-8 has no surrogates), so they are refused here, once,
with a 400 naming the field: a database of either kind can always move to the other.

`check` walks a parsed value only when its text could hold a problem (more brackets than
the depth allowed, a `\\u` escape, a NUL or an 0xED byte): the common body costs a few
byte scans.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from openbeepboop.server.errors import InvalidRequest

MAX_DEPTH = 64
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")


class _Found(Exception):
    """Raised at the bad spot and given its path on the way out."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str | int] = []


def too_deep(max_depth: int = MAX_DEPTH, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(
        f"the JSON nests deeper than {max_depth} levels", code="too_deep", param=param
    )


def unstorable(text: str) -> str | None:
    """What makes `text` unstorable (a NUL or a lone surrogate), or None."""
    if text.isascii():
        return "a NUL character (\\u0000)" if "\x00" in text else None
    found = _BAD_CHAR.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "a NUL character (\\u0000)"
    return f"a lone UTF-16 surrogate (\\u{ord(found.group()):04x})"


def check_text(text: str, param: str) -> None:
    """InvalidRequest naming `param` if `text` cannot be stored."""
    problem = unstorable(text)
    if problem is not None:
        raise _refusal(problem, param)


def could_be_bad(raw: bytes | str, max_depth: int = MAX_DEPTH) -> bool:
    """False when the JSON text `raw` surely parses to a value `check` accepts: no more
    opening brackets than `max_depth`, no escape, no NUL and no byte that starts an
    encoded surrogate (json.loads reads bytes with `surrogatepass`)."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > max_depth or "\\u" in raw or "\x00" in raw
    return (
        raw.count(b"[") + raw.count(b"{") > max_depth
        or b"\\u" in raw
        or b"\x00" in raw
        or b"\xed" in raw
    )


def loads(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text (orjson; `json.loads` for what orjson refuses, such as an escaped
    lone surrogate, so that it is refused here with its field named) and `check` it.
    ValueError when it is not JSON."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(raw)
        except RecursionError:
            raise too_deep(max_depth) from None
    check(value, raw, max_depth)
    return value


def check(value: Any, raw: bytes | str | None = None, max_depth: int = MAX_DEPTH) -> None:
    """InvalidRequest (400) naming the field if `value` nests deeper than `max_depth` or
    holds, as a key or a string, one that cannot be stored. `raw`, the text it was parsed
    from, lets a plain body skip the walk."""
    if raw is not None and not could_be_bad(raw, max_depth):
        return
    try:
        _walk(value, 0, max_depth)
    except _Found as found:
        param = _name(reversed(found.path))
        if found.problem == "deep":
            raise too_deep(max_depth, param) from None
        raise _refusal(found.problem, param) from None


def _walk(value: Any, depth: int, max_depth: int) -> None:
    if isinstance(value, str):
        problem = unstorable(value)
        if problem is not None:
            raise _Found(problem)
        return
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    if depth >= max_depth:
        raise _Found("deep")
    for name, item in items:
        if isinstance(name, str):
            problem = unstorable(name)
            if problem is not None:  # named by its parent: the key itself cannot be shown
                raise _Found(f"a key with {problem}")
        try:
            _walk(item, depth + 1, max_depth)
        except _Found as found:
            found.path.append(name)
            raise


def _name(parts: Any) -> str | None:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _refusal(problem: str, param: str | None) -> InvalidRequest:
    where = f"'{param}'" if param else "the body"
    return InvalidRequest(
        f"invalid value for {where}: it holds {problem}, which cannot be stored",
        code="invalid_string",
        param=param,
    )
