"""An OpenAI request read for llama.cpp: what to generate, how many times, under which
constraint; whatever llama.cpp cannot honour is refused with the parameter to blame.

`read_request` is pure (no model needed): it checks the request and returns a `Plan`.
Refusals are `BackendError`s with `status=400`, an OpenAI-style `code` and the `param`
(the sync call answers them as a 400 naming it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from openbeepboop.node.backends.base import JSON, BackendError, content_text

BAD = "invalid_value"
MAX_N = 128  # OpenAI's own limit
MAX_TOP_LOGPROBS = 20  # chat (OpenAI's limit); completions allow 5
# what llama.cpp's sampler takes by the same name as OpenAI
SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
)
UNSUPPORTED = {
    "audio": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning effort (not a reasoning model)",
    "verbosity": "verbosity",
}


def refuse(message: str, param: str, code: str = "unsupported_parameter") -> BackendError:
    return BackendError(message, code=code, retryable=False, status=400, param=param)


@dataclass
class Plan:
    """What one request asks of llama.cpp."""

    chat: bool
    n: int
    max_tokens: int
    sampling: JSON
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    schema: JSON | None = None  # constrain the answer to JSON matching this (json_object: {})
    tools: list[JSON] = field(default_factory=list)  # tools the answer may call
    tool_mode: str = "none"  # "none", "named" (one forced tool), "required" or "auto"
    messages: list[JSON] = field(default_factory=list)  # chat
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    echo: bool = False

    @property
    def calls_tools(self) -> bool:
        return self.tool_mode != "none"


def read_request(endpoint: str, request: JSON, default_max_tokens: int) -> Plan:
    """The plan for `request`, or a refusal naming the parameter llama.cpp cannot honour."""
    chat = endpoint == "/v1/chat/completions"
    if endpoint not in ("/v1/chat/completions", "/v1/completions"):
        raise refuse(f"the llama_cpp backend does not serve {endpoint}", "endpoint")
    for key, what in UNSUPPORTED.items():
        if request.get(key) is not None:
            raise refuse(f"{what} is not available on a llama.cpp model", key)
    modalities = request.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise refuse("a llama.cpp model answers in text only", "modalities")
    plan = Plan(
        chat=chat,
        n=_int(request, "n", 1, 1, MAX_N),
        max_tokens=_max_tokens(request, default_max_tokens),
        sampling={k: request[k] for k in SAMPLING if request.get(k) is not None},
        seed=_seed(request),
        stop=_stop(request),
        logit_bias=_logit_bias(request),
    )
    if chat:
        plan.messages = _messages(request)
        _chat_logprobs(request, plan)
        plan.schema = _response_format(request)
        _tools(request, plan)
    else:
        plan.prompts = _prompts(request)
        _completion_extras(request, plan)
    return plan


def _int(request: JSON, key: str, default: int, low: int, high: int) -> int:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise refuse(f"'{key}' must be an integer", key, "invalid_value")
    if not low <= value <= high:
        raise refuse(f"'{key}' must be from {low} to {high}, got {value}", key, "invalid_value")
    return value


def _max_tokens(request: JSON, default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        if request.get(key) is not None:
            return _int(request, key, default, 1, 1 << 30)
    return default


def _seed(request: JSON) -> int | None:
    seed = request.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise refuse("'seed' must be an integer", "seed", "invalid_value")
    return seed & 0xFFFFFFFF  # llama.cpp seeds are 32-bit


def _stop(request: JSON) -> list[str]:
    stop = request.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise refuse("'stop' must be a string or a list of strings", "stop", "invalid_value")
    return [s for s in stops if s]


def _logit_bias(request: JSON) -> dict[int, float]:
    bias = request.get("logit_bias")
    if not bias:
        return {}
    if not isinstance(bias, dict):
        raise refuse("'logit_bias' must map token ids to numbers", "logit_bias", "invalid_value")
    try:
        return {int(k): float(v) for k, v in bias.items()}
    except (TypeError, ValueError) as exc:
        raise refuse(
            f"'logit_bias' must map token ids to numbers: {exc}", "logit_bias", "invalid_value"
        ) from exc


def _messages(request: JSON) -> list[JSON]:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise refuse("'messages' must be a non-empty list", "messages", "invalid_value")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise refuse("a message must be an object", f"messages[{i}]", "invalid_value")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise refuse(
                        f"a llama.cpp text model reads text parts only, not {kind!r}",
                        f"messages[{i}].content[{j}].type",
                        "unsupported_content",
                    )
    return messages


def _chat_logprobs(request: JSON, plan: Plan) -> None:
    logprobs = request.get("logprobs")
    top = request.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise refuse("'logprobs' must be true or false", "logprobs", "invalid_value")
    if top is not None and not logprobs:
        raise refuse("'logprobs' must be true when 'top_logprobs' is set", "top_logprobs")
    plan.logprobs = bool(logprobs)
    plan.top_logprobs = _int(request, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)


def _response_format(request: JSON) -> JSON | None:
    fmt = request.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise refuse(
                "'response_format.json_schema.schema' must be a JSON schema object",
                "response_format.json_schema.schema",
                "invalid_value",
            )
        return schema
    raise refuse(
        f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
        "response_format.type",
        "invalid_value",
    )


def _tools(request: JSON, plan: Plan) -> None:
    tools = request.get("tools")
    choice = request.get("tool_choice")
    if tools is None and request.get("functions") is not None:  # the legacy names
        tools = [{"type": "function", "function": f} for f in request["functions"]]
        legacy = request.get("function_call")
        choice = {"type": "function", "function": legacy} if isinstance(legacy, dict) else legacy
    if not tools:
        if choice not in (None, "none"):
            raise refuse("'tool_choice' is set but 'tools' is empty", "tool_choice", BAD)
        return
    plan.tools = _checked_tools(tools)
    plan.tool_mode = _tool_mode(choice)
    if plan.tool_mode == "named" and isinstance(choice, dict):
        name = choice["function"].get("name")
        plan.tools = [t for t in plan.tools if t["function"]["name"] == name]
        if not plan.tools:
            raise refuse(
                f"tool_choice names {name!r}, which is not in 'tools'",
                "tool_choice",
                "invalid_value",
            )
    if plan.tool_mode != "none" and plan.schema is not None:
        raise refuse(
            "'response_format' and a tool call cannot both shape one answer here",
            "response_format",
        )
    if plan.tool_mode == "auto" and plan.logprobs:
        raise refuse(
            "logprobs are not available with tool_choice 'auto' on a llama.cpp model; "
            "name the tool or use tool_choice 'required'",
            "logprobs",
        )


def _checked_tools(tools: Any) -> list[JSON]:
    if not isinstance(tools, list):
        raise refuse("'tools' must be a list", "tools", "invalid_value")
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise refuse(f"tools of type {kind!r} are not available here", f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise refuse("a tool needs function.name", f"tools[{i}].function.name", BAD)
    return tools


def _tool_mode(choice: Any) -> str:
    if choice in (None, "auto", "none", "required"):
        return "auto" if choice is None else str(choice)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return "named"
    raise refuse(
        "'tool_choice' must be 'none', 'auto', 'required' or a named function",
        "tool_choice",
        "invalid_value",
    )


def _prompts(request: JSON) -> list[str | list[int]]:
    prompt = request.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        out: list[str | list[int]] = []
        for p in prompt:
            if isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p)):
                out.append(p)
            else:
                raise refuse(
                    "'prompt' items must be strings or token lists", "prompt", "invalid_value"
                )
        return out
    raise refuse(
        "'prompt' must be a string, a list of strings or tokens", "prompt", "invalid_value"
    )


def _completion_extras(request: JSON, plan: Plan) -> None:
    logprobs = request.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5:
            raise refuse("'logprobs' must be an integer from 0 to 5", "logprobs", "invalid_value")
        plan.logprobs, plan.top_logprobs = True, logprobs
    plan.echo = bool(request.get("echo"))
    if plan.echo and plan.logprobs:
        raise refuse("logprobs of the echoed prompt are not available on a llama.cpp model", "echo")
    if request.get("suffix"):
        raise refuse("'suffix' (fill in the middle) is not available here", "suffix")
    best_of = request.get("best_of")
    if best_of is not None and best_of != plan.n:
        raise refuse("'best_of' other than 'n' is not available here", "best_of")


def message_text(message: JSON) -> str:
    """A message as plain text for a prompt: its text, or its tool calls as JSON."""
    text = content_text(message.get("content"))
    calls = message.get("tool_calls")
    if calls and not text:
        text = json.dumps(
            [
                {"name": c["function"]["name"], "arguments": c["function"].get("arguments")}
                for c in calls
                if isinstance(c, dict) and isinstance(c.get("function"), dict)
            ]
        )
    return text


def tools_prompt(tools: list[JSON]) -> str:
    """A system line telling the model which functions it calls and how."""
    lines = ["Answer by calling one of these functions with JSON arguments:"]
    for tool in tools:
        function: dict[str, Any] = tool["function"]
        description = function.get("description") or ""
        parameters = json.dumps(function.get("parameters") or {})
        lines.append(f"- {function['name']}: {description} Parameters: {parameters}")
    return "\n".join(lines)
