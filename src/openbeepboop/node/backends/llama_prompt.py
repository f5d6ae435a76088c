"""Chats made into llama.cpp prompts: the bundled Gemma 3 270M's own format, and any
other model's through the llama-cpp-python chat handler it was loaded with.

The bundled model is a base model without a chat template. bench/gemma_formats.py
measured how often it answers nothing or repeats the prompt under each candidate format
(docs/benchmarks.md): a plain "User:/Assistant:" transcript that starts with a few
example exchanges did best, and its answers end (a blank line or the next "User:")
instead of running on, so that is its format here (`chat_format = "examples"`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openbeepboop.node.backends.base import JSON, BackendError
from openbeepboop.node.backends.llama_request import message_text

# a few short exchanges before the conversation show the base model that a turn is
# answered, briefly, rather than continued or repeated (the same as the benchmark's)
EXAMPLES = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Write a short sentence about the moon.", "The moon glows softly over the quiet hills."),
    ("Give me two kinds of bread.", "Sourdough and rye."),
)
EXAMPLES_STOP = ["\nUser:", "\n\n"]


@dataclass(frozen=True)
class Prompt:
    """Prompt tokens, the stop strings that end the answer's turn, and whether the
    answer's leading whitespace is the format's (a space after "Assistant:")."""

    tokens: list[int]
    stop: list[str]
    lstrip: bool = False


def examples_text(messages: list[JSON]) -> str:
    """The bundled model's prompt: system text, the example exchanges, then the chat as
    a transcript, ending where the assistant's answer starts."""
    system = "\n\n".join(
        message_text(m) for m in messages if m.get("role") in ("system", "developer")
    )
    text = f"{system}\n\n" if system else ""
    text += "".join(f"User: {q}\nAssistant: {a}\n\n" for q, a in EXAMPLES)
    for message in messages:
        role = message.get("role")
        body = message_text(message).strip()
        if role == "assistant":
            text += f"Assistant: {body}\n\n"
        elif role == "tool":
            text += f"User: (result of the function call) {body}\n"
        elif role not in ("system", "developer"):
            text += f"User: {body}\n"
    return text + "Assistant:"


def examples_prompt(llm: Any, messages: list[JSON]) -> Prompt:
    tokens = llm.tokenize(examples_text(messages).encode(), add_bos=True, special=False)
    return Prompt(list(tokens), list(EXAMPLES_STOP), lstrip=True)


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
