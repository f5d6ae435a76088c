"""Streamed choices: the pieces a node pushes for a running job, read as OpenAI chunk
choices, and what a stream still owes once the job's result is stored.

A piece is text (a `str`: content of choice 0, the common case and rbee's `token`) or a
list of OpenAI chunk choices (`{"index", "delta", "logprobs", "finish_reason"}` for chat,
`{"index", "text", "logprobs", "finish_reason"}` for text completions) for the rest:
other choices (`n` > 1), tool-call fragments, refusals, logprobs, finish reasons.

A `Tally` follows what one stream has sent; `Tally.rest(result)` is the chunk choices
that complete it from the stored result, so a stream that was joined late, resumed, or
fed by a node that pushed nothing (or lost pieces on the way) still ends with the whole
response: every choice's content, tool calls, refusal, logprobs and finish reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from openbeepboop.server.models import JSON, Piece

MAX_CHOICES = 128  # `n` is at most 128 at OpenAI


@dataclass
class _Sent:
    """What one choice's stream has carried so far."""

    content: str = ""
    refusal: str = ""
    text: str = ""  # a text completion's text
    tools: dict[int, JSON] = field(default_factory=dict)  # index -> {id, name, arguments}
    logprobs: int = 0  # entries of logprobs.content (chat) or logprobs.tokens (completions)
    refusal_logprobs: int = 0
    role: bool = False
    finish: str | None = None


class Tally:
    """What one stream of a job has sent, choice by choice. `roles`: give each chat
    choice's first delta `"role": "assistant"`, as OpenAI does (the SSE route; the job
    events leave it out)."""

    def __init__(self, chat: bool, roles: bool = True) -> None:
        self.chat = chat
        self._roles = roles and chat
        self._sent: dict[int, _Sent] = {}

    def take(self, piece: Piece) -> list[JSON]:
        """The chunk choices of `piece`, noted as sent. Malformed entries (a node's bug)
        are dropped, never raised on: the result completes the stream anyway."""
        out: list[JSON] = []
        if isinstance(piece, dict):  # the progress of a model the job waits for
            return out
        if isinstance(piece, str):
            self._emit({"index": 0, "delta" if self.chat else "text": _text(piece, self.chat)}, out)
            return out
        for raw in piece:
            choice = _clean(raw, self.chat)
            if choice is not None:
                self._emit(choice, out)
        return out

    def rest(self, result: JSON | None) -> list[JSON]:
        """The chunk choices that complete this stream with `result` (an OpenAI
        chat.completion or text_completion): what was never sent of each choice, then
        its finish reason if not sent yet."""
        out: list[JSON] = []
        choices = (result or {}).get("choices")
        if not isinstance(choices, list) or not choices:
            choices = [{"index": 0}]
        for position, choice in enumerate(choices[:MAX_CHOICES]):
            if not isinstance(choice, dict):
                continue
            index = _index(choice.get("index", position))
            if index is None:
                continue
            sent = self._sent.setdefault(index, _Sent())
            missing = self._chat_rest(sent, choice) if self.chat else self._text_rest(sent, choice)
            if missing is not None:
                self._emit({"index": index, **missing}, out)
            if sent.finish is None:
                finish = choice.get("finish_reason")
                end: JSON = {"delta": {}} if self.chat else {"text": ""}
                finish = finish if isinstance(finish, str) else "stop"
                self._emit({"index": index, **end, "finish_reason": finish}, out)
        return out

    def mark_role(self, index: int) -> None:
        """Choice `index` had its role sent (the opening chunk of a chat stream)."""
        self._sent.setdefault(index, _Sent()).role = True

    # -- bookkeeping ------------------------------------------------------------------

    def _emit(self, choice: JSON, out: list[JSON]) -> None:
        """Append `choice` to `out`, after its role chunk when it opens a chat choice (a
        chunk of its own, as OpenAI sends it: the `openai` SDK counts the logprobs of a
        choice's first chunk twice)."""
        sent = self._sent.get(choice["index"])
        if self._roles and (sent is None or not sent.role):
            delta = {"role": "assistant", "content": ""}
            out.append(self._note({"index": choice["index"], "delta": delta}))
        out.append(self._note(choice))

    def _note(self, choice: JSON) -> JSON:
        """Record `choice` as sent; it is returned in OpenAI's full chunk-choice shape."""
        sent = self._sent.setdefault(choice["index"], _Sent())
        logprobs = choice.get("logprobs")
        if self.chat:
            delta = choice["delta"]
            if sent.role and "role" in delta:  # said once per choice
                delta = {k: v for k, v in delta.items() if k != "role"}
            sent.role = sent.role or "role" in delta
            if isinstance(delta.get("content"), str):
                sent.content += delta["content"]
            if isinstance(delta.get("refusal"), str):
                sent.refusal += delta["refusal"]
            for call in delta.get("tool_calls") or ():
                _note_call(sent, call)
            if isinstance(logprobs, dict):
                sent.logprobs += len(logprobs.get("content") or ())
                sent.refusal_logprobs += len(logprobs.get("refusal") or ())
            shaped: JSON = {"index": choice["index"], "delta": delta}
        else:
            sent.text += choice.get("text") or ""
            if isinstance(logprobs, dict):
                sent.logprobs += len(logprobs.get("tokens") or ())
            shaped = {"index": choice["index"], "text": choice.get("text") or ""}
        shaped["logprobs"] = logprobs if isinstance(logprobs, dict) else None
        finish = choice.get("finish_reason")
        shaped["finish_reason"] = finish if isinstance(finish, str) else None
        if shaped["finish_reason"] is not None:
            sent.finish = shaped["finish_reason"]
        return shaped

    @staticmethod
    def _chat_rest(sent: _Sent, choice: JSON) -> JSON | None:
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        delta: JSON = {}
        for key in ("content", "refusal"):
            whole = message.get(key)
            if isinstance(whole, str):
                left = _after(whole, getattr(sent, key))
                if left:
                    delta[key] = left
        calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
        missing_calls = [m for j, call in enumerate(calls) if (m := _call_rest(sent, j, call))]
        if missing_calls:
            delta["tool_calls"] = missing_calls
        logprobs = _chat_logprobs_rest(sent, choice.get("logprobs"))
        if not delta and logprobs is None:
            return None
        return {"delta": delta, "logprobs": logprobs}

    @staticmethod
    def _text_rest(sent: _Sent, choice: JSON) -> JSON | None:
        whole = choice.get("text")
        left = _after(whole, sent.text) if isinstance(whole, str) else ""
        logprobs = choice.get("logprobs")
        left_logprobs = None
        if isinstance(logprobs, dict) and len(logprobs.get("tokens") or ()) > sent.logprobs:
            left_logprobs = {
                k: v[sent.logprobs :] if isinstance(v, list) else v for k, v in logprobs.items()
            }
        if not left and left_logprobs is None:
            return None
        return {"text": left, "logprobs": left_logprobs}


def text_of(choice: JSON) -> str | None:
    """The text of a chunk choice that carries only choice 0's text (rbee's `token`),
    else None."""
    if choice.get("index") != 0 or choice.get("finish_reason") or choice.get("logprobs"):
        return None
    if "delta" in choice:
        delta = choice["delta"]
        if set(delta) - {"content", "role"} or not isinstance(delta.get("content"), str):
            return None
        return str(delta["content"])
    text = choice.get("text")
    return text if isinstance(text, str) else None


def content_of(choice: JSON) -> str:
    """The content text a chunk choice adds to its choice (chat or completions)."""
    delta = choice.get("delta")
    value = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return value if isinstance(value, str) else ""


# -- helpers ---------------------------------------------------------------------------


def _text(text: str, chat: bool) -> Any:
    return {"content": text} if chat else text


def _index(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_CHOICES:
        return value
    return None


def _clean(raw: Any, chat: bool) -> JSON | None:
    """A node's chunk choice with the keys this endpoint streams, or None."""
    if not isinstance(raw, dict):
        return None
    index = _index(raw.get("index", 0))
    if index is None:
        return None
    choice: JSON = {"index": index}
    if chat:
        delta = raw.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        choice["delta"] = {k: v for k, v in delta.items() if v is not None}
    else:
        text = raw.get("text")
        choice["text"] = text if isinstance(text, str) else ""
    if isinstance(raw.get("logprobs"), dict):
        choice["logprobs"] = raw["logprobs"]
    if isinstance(raw.get("finish_reason"), str):
        choice["finish_reason"] = raw["finish_reason"]
    return choice


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _after(whole: str, sent: str) -> str:
    """What of `whole` was not sent; nothing when what was sent is not its beginning (the
    job ran again and said something else: a stream cannot take text back)."""
    return whole[len(sent) :] if whole.startswith(sent) else ""


def _note_call(sent: _Sent, call: Any) -> None:
    """Fold one streamed tool-call fragment in, as OpenAI's clients accumulate them."""
    if not isinstance(call, dict) or _index(call.get("index")) is None:
        return
    have = sent.tools.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
    if isinstance(call.get("id"), str) and call["id"]:
        have["id"] = call["id"]
    function = call.get("function")
    if isinstance(function, dict):
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                have[key] += function[key]


def _call_rest(sent: _Sent, index: int, call: JSON) -> JSON | None:
    """The fragment that completes tool call `index`, or None when it was all sent."""
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    name = _str(function.get("name"))
    arguments = _str(function.get("arguments"))
    have = sent.tools.get(index)
    if have is None:
        return {
            "index": index,
            "id": call.get("id"),
            "type": call.get("type") or "function",
            "function": {"name": name, "arguments": arguments},
        }
    left = _after(arguments, have["arguments"])
    if not left:
        return None
    return {"index": index, "function": {"arguments": left}}


def _chat_logprobs_rest(sent: _Sent, logprobs: Any) -> JSON | None:
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    refusal = logprobs.get("refusal")
    content_left = content[sent.logprobs :] if isinstance(content, list) else []
    refusal_left = refusal[sent.refusal_logprobs :] if isinstance(refusal, list) else []
    if not content_left and not refusal_left:
        return None
    return {"content": content_left or None, "refusal": refusal_left or None}
