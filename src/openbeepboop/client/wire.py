"""What the client and the batch runner share about the job API: the final statuses,
our knobs beside OpenAI's parameters, the sizes of bulk calls, and how a submit is
described to be sent again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FINAL = frozenset({"completed", "failed", "cancelled", "expired"})
KNOBS = (
    "priority",
    "max_attempts",
    "expires_at",
    "ttl_seconds",
    "metadata",
    "custom_id",
    "node",
    "node_labels",
)
LONG_POLL = 30.0  # seconds per long-poll; the server caps it too
BULK_CHUNK = 1000
POLL_CHUNK = 5000


@dataclass(frozen=True)
class Resubmit:
    """How a job was submitted, to submit it again elsewhere (same idempotency key)."""

    model: str | None
    path: str
    body: Any
    headers: dict[str, str] | None
    bulk: bool = False  # body is {"jobs": [spec]}: the job is answer["data"][0]
