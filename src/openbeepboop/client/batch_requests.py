"""What a batch may hold, as one rule for `run_batched` and `submit --file`.

Each request is one of:
- an OpenAI batch line: `{"custom_id"?, "method"?, "url"?, "body": {...}}` (the url one
  of ENDPOINTS, chat completions by default);
- an OpenAI chat body: `{"model"?, "messages": [...], ...}`;
- a prompt object: `{"prompt": "...", "custom_id"?, "model"?}`;
- a string: the prompt itself.

Our knobs (`priority`, `max_attempts`, `metadata`, `node`, ...; see `_async.KNOBS`) may
ride in a body or beside it, and `idempotency_key` beside it. A request without a model
takes the default one.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from openbeepboop.client.wire import KNOBS

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def parse_request(value: Any, default_id: str, model: str | None) -> dict[str, Any]:
    """One request as {"custom_id", "url", "body", "knobs", "key"}; ValueError says
    what is wrong with it."""
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise ValueError("expected an object, a string or plain text")
    if "body" in value:
        url = value.get("url", ENDPOINTS[0])
        if url not in ENDPOINTS or not isinstance(value["body"], dict):
            raise ValueError(f"url must be one of {', '.join(ENDPOINTS)} and body an object")
        body, outer = dict(value["body"]), value
    elif "messages" in value:
        url, body, outer = ENDPOINTS[0], dict(value), {}
    elif isinstance(value.get("prompt"), str):
        url, outer = ENDPOINTS[0], value
        body = {"messages": [{"role": "user", "content": value["prompt"]}]}
        if "model" in value:
            body["model"] = value["model"]
    else:
        raise ValueError("needs 'body' (batch line), 'messages' (chat body) or 'prompt'")
    knobs = {k: body.pop(k) for k in KNOBS if k in body}
    knobs.update({k: outer[k] for k in KNOBS if k in outer})
    key = body.pop("idempotency_key", None) or outer.get("idempotency_key")
    custom_id = str(knobs.pop("custom_id", None) or default_id)
    if not body.get("model"):
        if not model:
            raise ValueError("no model: give one in the request, model=, or OPENBEEPBOOP_MODEL")
        body["model"] = model
    request = {"custom_id": custom_id, "url": url, "body": body, "knobs": knobs}
    if key:
        request["key"] = str(key)
    return request


def prepare(requests: Iterable[Any], model: str | None) -> list[dict[str, Any]]:
    """Every request parsed (`request-<i>` the default custom_id); ValueError naming the
    first bad one, or repeated custom_ids."""
    items = []
    for i, value in enumerate(requests):
        try:
            items.append(parse_request(value, f"request-{i}", model))
        except ValueError as exc:
            raise ValueError(f"request {i}: {exc}") from None
    unique(items)
    return items


def unique(items: Sequence[dict[str, Any]]) -> None:
    """ValueError when two requests share a custom_id."""
    counts = Counter(i["custom_id"] for i in items)
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        raise ValueError(f"custom_id values must be unique; repeated: {', '.join(dupes[:5])}")


def fingerprint(items: Sequence[dict[str, Any]], *extra: Any) -> str:
    """A digest of the requests (and `extra`): the same requests, the same run."""
    digest = hashlib.sha256()
    for part in (*extra, *items):
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]
