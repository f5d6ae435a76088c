"""The passes of the server's background loops (the lease reaper, the batch driver)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from openbeepboop.server.errors import Unavailable


async def one_pass(what: str, step: Callable[[], Awaitable[object]], log: logging.Logger) -> None:
    """Run one pass; a failure is logged, never raised: the next pass must run."""
    try:
        await step()
    except Unavailable as exc:  # the database is away for a moment: one line
        log.warning("%s pass skipped: %s", what, exc.message)
    except Exception:
        log.exception("%s pass failed", what)
