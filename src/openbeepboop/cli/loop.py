"""Running a long-lived command's event loop: on uvloop when it is installed (it comes
with `uvicorn[standard]` on Linux and macOS; it roughly halves the loop's own cost per
request), else on asyncio's default loop. `openbeepboop-server start` gets the same from
uvicorn itself."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
