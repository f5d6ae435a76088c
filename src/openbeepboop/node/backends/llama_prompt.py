"""Chats made into llama.cpp prompts: the bundled Gemma 3 270M's own format, and any
other model's through the llama-cpp-python chat handler it was loaded with.

The bundled model is a base model without a chat template. bench/gemma_formats.py
measured how often it answers nothing or repeats the prompt under each candidate format
(docs/benchmarks.md); Gemma's own turn markers after a few example turns did best, so
that is its format here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openbeepboop.node.backends.base import JSON, BackendError
from openbeepboop.node.backends.llama_request import message_text

# a few short exchanges before the conversation show the base model that a turn is
# answered, briefly, rather than continued or repeated
EXAMPLES = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Write a short sentence about the moon.", "The moon glows softly over the quiet hills."),
    ("Give me two kinds of bread.", "Sourdough and rye."),
)
GEMMA_END = "<end_of_turn>"


@dataclass(frozen=True)
class Prompt:
    """Prompt tokens and the stop strings that end the answer's turn."""

    tokens: list[int]
    stop: list[str]


def gemma_text(messages: list[JSON]) -> str:
    """The bundled Gemma's prompt: example turns, then the chat in Gemma's turn markers
    (a system message leads the first user turn, as Gemma's own template does)."""
    turns = [("user", q, "model", a) for q, a in EXAMPLES]
    text = "".join(
        f"<start_of_turn>{u}\n{q}{GEMMA_END}\n<start_of_turn>{m}\n{a}{GEMMA_END}\n"
        for u, q, m, a in turns
    )
    system = "\n\n".join(
        message_text(m) for m in messages if m.get("role") in ("system", "developer")
    )
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        body = message_text(message)
        if role == "tool":
            body = f"Result of the function call: {body}"
        if role != "assistant" and system:
            body, system = f"{system}\n\n{body}", ""
        who = "model" if role == "assistant" else "user"
        text += f"<start_of_turn>{who}\n{body}{GEMMA_END}\n"
    return text + "<start_of_turn>model\n"


def gemma_prompt(llm: Any, messages: list[JSON]) -> Prompt:
    tokens = llm.tokenize(gemma_text(messages).encode(), add_bos=True, special=True)
    return Prompt(list(tokens), [GEMMA_END])


class _Captured(Exception):
    def __init__(self, prompt: Any, stop: Any) -> None:
        super().__init__("prompt captured")
        self.prompt, self.stop = prompt, stop


class _PromptOnly:
    """Stands in for the Llama a chat handler drives: the handler builds its prompt and
    asks for a completion, and this keeps the prompt instead of generating."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: Any, stop: Any = None, **_: Any) -> Any:
        raise _Captured(prompt, stop)


def handler_prompt(llm: Any, messages: list[JSON]) -> Prompt:
    """The prompt the model's llama-cpp-python chat handler (its GGUF template or its
    `chat_format`) builds for `messages`."""
    from llama_cpp import llama_chat_format

    handler: Any = (
        llm.chat_handler
        or llm._chat_handlers.get(llm.chat_format)
        or llama_chat_format.get_chat_completion_handler(llm.chat_format)
    )
    plain = [_plain(m) for m in messages]
    try:
        handler(llama=_PromptOnly(llm), messages=plain, stream=False)
    except _Captured as got:
        tokens = got.prompt
        if isinstance(tokens, str):
            tokens = llm.tokenize(tokens.encode(), add_bos=True, special=True)
        stop = [got.stop] if isinstance(got.stop, str) else list(got.stop or [])
        return Prompt(list(tokens), [s for s in stop if s])
    raise BackendError(
        f"chat format {llm.chat_format!r} did not build a prompt",
        code="invalid_config",
        retryable=False,
    )


def _plain(message: JSON) -> JSON:
    """A message as the simple chat formats read it: a role they know and text."""
    role = message.get("role")
    if role == "developer":
        role = "system"
    text = message_text(message)
    if role == "tool":
        role, text = "user", f"Result of the function call: {text}"
    return {"role": role, "content": text}
