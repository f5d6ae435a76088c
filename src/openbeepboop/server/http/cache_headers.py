"""The response cache on the wire (docs/cache.md): the request header
`X-OpenBeepBoop-Cache: use|skip|refresh`, and the answer's `x-openbeepboop-cache: hit |
miss | refresh | bypass`."""

from __future__ import annotations

from starlette.requests import Request

from openbeepboop.server.core.cache import MODES
from openbeepboop.server.errors import InvalidRequest
from openbeepboop.server.models import Job

CACHE_HEADER = "x-openbeepboop-cache"


def requested_cache(request: Request) -> str | None:
    """The request's cache mode from its header (None when absent); a 400 for a value
    that is not one."""
    value = request.headers.get(CACHE_HEADER)
    if value is None:
        return None
    mode = value.strip().lower()
    if mode not in MODES:
        raise InvalidRequest(
            f"{CACHE_HEADER} must be one of {', '.join(MODES)}, not {value!r}",
            param=CACHE_HEADER,
        )
    return mode


def cache_outcome(job: Job, mode: str | None) -> dict[str, str]:
    """The answer's header for `job`, submitted with cache `mode`."""
    if job.cached:
        return {CACHE_HEADER: "hit"}
    if job.cache_key is None:
        return {CACHE_HEADER: "bypass"}
    return {CACHE_HEADER: "refresh" if mode == "refresh" else "miss"}
