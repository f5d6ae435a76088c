"""OpenAI response objects built from a backend's chunks."""

from __future__ import annotations

import time
from typing import Any

from openbeepboop.node.backends.base import JSON


def build_response(
    endpoint: str, job_id: str, request: JSON, text: str, finish: str, usage: JSON | None
) -> JSON:
    """A `chat.completion` or `text_completion` carrying `text`."""
    model = request.get("model", "")
    usage = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    choice: dict[str, Any]
    if endpoint == "/v1/chat/completions":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + job_id.removeprefix("job_"),
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def completion_tokens(response: JSON) -> int:
    usage = response.get("usage") or {}
    value = usage.get("completion_tokens", 0)
    return int(value) if isinstance(value, int | float) else 0
