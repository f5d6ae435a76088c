"""OpenAI's Responses API over chat-completion jobs: a Responses request becomes a chat
body (instructions a system message, input items messages, function tools chat tools,
an earlier response's turns in front), and a job becomes a Response object.

A response is a job: its id is the job's with `resp_` for `job_`, and the job's
metadata keeps what the chat body cannot (under RESPONSE_KEY), so no table is needed.
"""

from __future__ import annotations

from typing import Any

from openbeepboop.server.errors import InvalidRequest
from openbeepboop.server.models import JSON, Job, JobStatus

ENDPOINT = "/v1/chat/completions"
RESPONSE_KEY = "openbeepboop.response"


def response_id(job_id: str) -> str:
    return "resp_" + job_id.removeprefix("job_")


def job_id(resp_id: str) -> str:
    return "job_" + resp_id.removeprefix("resp_")


def message_id(job: Job) -> str:
    return "msg_" + job.id.removeprefix("job_")


def is_response(job: Job) -> bool:
    return isinstance(job.metadata, dict) and RESPONSE_KEY in job.metadata


def _info(job: Job) -> JSON:
    info = (job.metadata or {}).get(RESPONSE_KEY)
    return info if isinstance(info, dict) else {}


# -- request: Responses -> chat ------------------------------------------------------


def _content(content: Any, param: str) -> str | list[JSON]:
    """A message's content: a string, or input parts as chat parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or a list of parts", param=param)
    parts: list[JSON] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise InvalidRequest(
                f"unsupported content part type {kind!r} (input_text or input_image)",
                param=f"{param}[{j}].type",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(items: str | list[Any]) -> list[JSON]:
    """The chat messages of a Responses `input`."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[JSON] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest("each input item must be an object", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(
                    f"role must be user, assistant, system or developer, not {role!r}",
                    param=f"{param}.role",
                )
            content = _content(item.get("content"), f"{param}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            if not isinstance(call["id"], str) or not isinstance(item.get("name"), str):
                raise InvalidRequest("a function_call needs call_id and name", param=param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequest("a function_call_output needs call_id", param=param)
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        else:
            raise InvalidRequest(
                f"unsupported input item type {kind!r} (message, function_call, "
                "function_call_output)",
                param=f"{param}.type",
            )
    return messages


def chat_tools(tools: list[Any]) -> list[JSON]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(
                f"only function tools can run here, not {kind!r}", param=f"tools[{i}].type"
            )
        if not isinstance(tool.get("name"), str):
            raise InvalidRequest("a function tool needs a name", param=f"tools[{i}].name")
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        }
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if choice in ("auto", "none", "required"):
        return choice
    raise InvalidRequest(
        "tool_choice must be auto, none, required or a function", param="tool_choice"
    )


def _response_format(text: Any) -> JSON | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequest(f"unsupported text format {fmt['type']!r}", param="text.format.type")


def history(previous: Job) -> list[JSON]:
    """An earlier response's turns (its input and output, not its instructions), to go
    before a chained request's input."""
    if previous.status is not JobStatus.COMPLETED or previous.result is None:
        raise InvalidRequest(
            f"response {response_id(previous.id)!r} is {previous.status.value}, not completed",
            param="previous_response_id",
        )
    messages = list(previous.request.get("messages") or [])
    if _info(previous).get("instructions") is not None and messages:
        messages = messages[1:]
    choice = (previous.result.get("choices") or [{}])[0]
    answer = choice.get("message") or {}
    turn: JSON = {"role": "assistant", "content": answer.get("content")}
    if answer.get("tool_calls"):
        turn["tool_calls"] = answer["tool_calls"]
    return [*messages, turn]


def chat_body(body: JSON, earlier: list[JSON]) -> JSON:
    """The chat-completion body for a Responses request (`earlier`: chained turns)."""
    given = input_messages(body["input"])
    if not given:
        raise InvalidRequest("input must hold at least one item", param="input")
    messages = [*earlier, *given]
    if body.get("instructions") is not None:
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    chat: JSON = {"model": body["model"], "messages": messages}
    for ours, theirs in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("user", "user"),
        ("seed", "seed"),
    ):
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    if body.get("tools"):
        chat["tools"] = chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    return chat


def job_metadata(body: JSON) -> JSON:
    """What the job keeps of a Responses request beside its chat body."""
    kept = (
        "instructions",
        "previous_response_id",
        "metadata",
        "store",
        "background",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "max_output_tokens",
        "parallel_tool_calls",
        "text",
    )
    return {RESPONSE_KEY: {k: body[k] for k in kept if body.get(k) is not None}}


def batch_request(body: JSON) -> tuple[JSON, JSON]:
    """A Batch API line's Responses request (already checked as `POST /v1/responses`
    checks its body) as the chat body and job metadata its job runs with.

    A line stands alone: `previous_response_id` is refused (the response it names may be
    another line of the same batch, not run yet, and batch lines run in no set order);
    the history goes in `input` instead. `stream` never reaches here (a batch refuses it).
    """
    if body.get("previous_response_id") is not None:
        raise InvalidRequest(
            "previous_response_id is not supported in a batch line: give the earlier "
            "turns as input items instead",
            param="previous_response_id",
        )
    return chat_body(body, []), job_metadata(body)


def is_stored(job: Job) -> bool:
    """Whether a response is kept after it is answered (`store`, true by default)."""
    return bool(_info(job).get("store", True))


# -- result: job -> Response ---------------------------------------------------------


def _usage(usage: JSON | None) -> JSON | None:
    if not usage:
        return None
    given = int(usage.get("prompt_tokens") or 0)
    made = int(usage.get("completion_tokens") or 0)
    return {
        "input_tokens": given,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": made,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": int(usage.get("total_tokens") or given + made),
    }


def text_item(job: Job, text: str, status: str) -> JSON:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": message_id(job),
        "status": status,
        "role": "assistant",
        "content": [part] if status != "in_progress" else [],
    }


def call_item(call: JSON) -> JSON:
    function = call.get("function") or {}
    call_id = str(call.get("id") or "")
    return {
        "type": "function_call",
        "id": "fc_" + call_id.removeprefix("call_"),
        "call_id": call_id,
        "name": function.get("name"),
        "arguments": function.get("arguments") or "",
        "status": "completed",
    }


def output_items(job: Job) -> list[JSON]:
    """The output items of a completed job's chat result."""
    choice = ((job.result or {}).get("choices") or [{}])[0]
    message = choice.get("message") or {}
    calls = message.get("tool_calls") or []
    text = message.get("content")
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    items = [text_item(job, str(text or ""), status)] if text or not calls else []
    return items + [call_item(c) for c in calls]


_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.IN_PROGRESS: "in_progress",
    JobStatus.COMPLETED: "completed",
    JobStatus.CANCELLED: "cancelled",
}


def response_object(job: Job, status: str | None = None) -> JSON:
    """The Response object for a job (`status` overrides the job's, for a stream)."""
    info = _info(job)
    output: list[JSON] = []
    error = None
    incomplete = None
    shown = status or _STATUS.get(job.status, "failed")
    if status is None and job.status is JobStatus.COMPLETED:
        output = output_items(job)
        choice = ((job.result or {}).get("choices") or [{}])[0]
        if choice.get("finish_reason") == "length":
            shown, incomplete = "incomplete", {"reason": "max_output_tokens"}
    elif shown == "failed":
        failure = job.error or {}
        error = {
            "code": str(failure.get("code") or "server_error"),
            "message": str(failure.get("message") or f"the job ended {job.status.value}"),
        }
    usage = _usage((job.result or {}).get("usage")) if status is None else None
    return {
        "id": response_id(job.id),
        "object": "response",
        "created_at": int(job.created_at),
        "status": shown,
        "background": bool(info.get("background", False)),
        "completed_at": int(job.finished_at) if job.finished_at and shown == "completed" else None,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": info.get("instructions"),
        "max_output_tokens": info.get("max_output_tokens"),
        "model": job.model,
        "output": output,
        "parallel_tool_calls": bool(info.get("parallel_tool_calls", True)),
        "previous_response_id": info.get("previous_response_id"),
        "store": bool(info.get("store", True)),
        "temperature": info.get("temperature"),
        "text": info.get("text") or {"format": {"type": "text"}},
        "tool_choice": info.get("tool_choice", "auto"),
        "tools": info.get("tools", []),
        "top_p": info.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "metadata": info.get("metadata") or {},
    }


def input_items(job: Job) -> list[JSON]:
    """The input items of a response, oldest first: the chained turns and its own input
    (not its instructions), as the Responses API lists them."""
    messages = list(job.request.get("messages") or [])
    if _info(job).get("instructions") is not None and messages:
        messages = messages[1:]
    suffix = job.id.removeprefix("job_")
    items: list[JSON] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "id": f"fco_{suffix}_{i}",
                    "call_id": message.get("tool_call_id"),
                    "output": message.get("content"),
                    "status": "completed",
                }
            )
            continue
        content = message.get("content")
        kind = "output_text" if role == "assistant" else "input_text"
        if isinstance(content, str):
            parts: list[JSON] = [{"type": kind, "text": content}]
        elif isinstance(content, list):
            parts = [
                {"type": kind, "text": p.get("text", "")}
                if p.get("type") == "text"
                else {"type": "input_image", "image_url": (p.get("image_url") or {}).get("url")}
                for p in content
            ]
        else:
            parts = []
        if parts:
            item: JSON = {"type": "message", "id": f"msg_{suffix}_{i}", "role": role}
            items.append({**item, "status": "completed", "content": parts})
        items.extend(call_item(c) for c in message.get("tool_calls") or [])
    return items
