"""How long a provider asks us to wait, read from its answer's headers; shared by the
backends that talk HTTP to OpenAI-style providers (`litellm`, `openai`).

`Retry-After` (seconds, or an HTTP date) wins. Without it, OpenAI-style rate limit
headers tell when a used-up budget comes back: `x-ratelimit-remaining-requests: 0` with
`x-ratelimit-reset-requests: 6m0s` (the same for `tokens`).
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

# statuses worth another try: timeouts, conflicts, rate limits, overloaded or failing servers
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)?")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def retry_after(headers: Mapping[str, Any] | None, prefixes: Iterable[str] = ("",)) -> float | None:
    """Seconds to wait before trying again, or None when the headers do not say.

    `headers` is any mapping with `.get` (aiohttp's and httpx's are case-insensitive; a plain
    dict must hold lower-case names). Each name is also looked up under every prefix
    (LiteLLM passes the provider's own headers as `llm_provider-<name>`)."""
    if not headers:
        return None
    prefixes = tuple(prefixes)
    for prefix in prefixes:
        value = headers.get(f"{prefix}retry-after")
        if value:
            return _retry_after_value(value)
    # no Retry-After: the reset time of each budget that is used up
    waits = [
        duration(headers.get(f"{prefix}x-ratelimit-reset-{kind}"))
        for prefix in prefixes
        for kind in ("requests", "tokens")
        if str(headers.get(f"{prefix}x-ratelimit-remaining-{kind}", "")).strip() == "0"
    ]
    return max((w for w in waits if w is not None), default=None)


def _retry_after_value(value: Any) -> float | None:
    """`Retry-After`: delay-seconds (a decimal is tolerated) or an HTTP date."""
    text = str(value).strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": GMT, as every RFC 9110 date is
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


def duration(value: Any) -> float | None:
    """Seconds in a duration like "1.5s", "6m0s", "20ms" or "2"; None if unreadable."""
    text = str(value or "").strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _SCALE[u] for n, u in parts)
