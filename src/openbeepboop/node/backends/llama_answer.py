"""The OpenAI response for llama.cpp generations: one choice per generation (text, or
tool calls when the request forced one), logprobs in the endpoint's shape, and usage
counted in the model's own tokens. Also the grammar that shapes an answer."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from openbeepboop.node.backends.base import JSON, Chunk
from openbeepboop.node.backends.llama_generate import Generation
from openbeepboop.node.backends.llama_request import Plan, refuse


def grammar_for(plan: Plan) -> str | None:
    """The GBNF grammar an answer must follow: JSON for `response_format`, the tool's
    arguments for a named tool, `{"name", "arguments"}` of one tool for "required"."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if plan.tool_mode == "named":
        schema: JSON | None = _parameters(plan.tools[0])
        param = "tools"
    elif plan.tool_mode == "required":
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t["function"]["name"]},
                        "arguments": _parameters(t),
                    },
                    "required": ["name", "arguments"],
                }
                for t in plan.tools
            ]
        }
        param = "tools"
    else:
        schema, param = plan.schema, "response_format.json_schema.schema"
    if schema is None:
        return None
    if not schema:
        return str(JSON_GBNF)
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises plain errors for what it cannot map
        raise refuse(
            f"this JSON schema cannot be turned into a llama.cpp grammar: {exc}",
            param,
            "invalid_value",
        ) from exc


def _parameters(tool: JSON) -> JSON:
    parameters = tool["function"].get("parameters")
    return parameters if isinstance(parameters, dict) and parameters else {"type": "object"}


class Answer:
    """The response being assembled, a generation at a time."""

    def __init__(self, plan: Plan, model: Any) -> None:
        self.plan = plan
        self.model = model or ""
        self.choices: list[JSON] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._seen_prompts = 0

    @property
    def first(self) -> bool:
        """The next generation is choice 0 (the one whose text streams)."""
        return not self.choices

    def add(self, out: Generation, prompt_tokens: int, echo: str) -> None:
        if len(self.choices) % self.plan.n == 0:  # each prompt counts once, whatever `n`
            self.prompt_tokens += prompt_tokens
        self.completion_tokens += out.completion_tokens
        index = len(self.choices)
        if self.plan.chat:
            self.choices.append(self._chat_choice(index, out))
        else:
            self.choices.append(
                {
                    "index": index,
                    "text": echo + out.text,
                    "logprobs": _completion_logprobs(out.logprobs) if self.plan.logprobs else None,
                    "finish_reason": out.finish_reason,
                }
            )

    def _chat_choice(self, index: int, out: Generation) -> JSON:
        message: JSON = {"role": "assistant", "content": out.text, "refusal": None}
        finish = out.finish_reason
        call = self._tool_call(out) if self.plan.calls_tools else None
        if call is not None:
            message["content"] = None
            message["tool_calls"] = [call]
            if self.plan.tool_mode == "required" and finish == "stop":
                finish = "tool_calls"  # OpenAI: "stop" when the tool was named
        logprobs = {"content": out.logprobs, "refusal": None} if self.plan.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def _tool_call(self, out: Generation) -> JSON | None:
        if self.plan.tool_mode == "named":
            name, arguments = self.plan.tools[0]["function"]["name"], out.text
        else:
            try:
                parsed = json.loads(out.text)
                name, arguments = parsed["name"], json.dumps(parsed["arguments"])
            except (ValueError, KeyError, TypeError):
                return None  # cut short (max_tokens): left as text
        return {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    def final(self) -> Chunk:
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        chat = self.plan.chat
        response = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": self.choices,
            "usage": usage,
        }
        finish = self.choices[0]["finish_reason"] if self.choices else "stop"
        return Chunk(finish_reason=finish, usage=usage, response=response)


def _completion_logprobs(entries: list[JSON]) -> JSON:
    """Chat-shaped token entries in the legacy completions shape."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }
