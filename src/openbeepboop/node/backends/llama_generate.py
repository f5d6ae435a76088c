"""One generation on a llama.cpp context, token by token: text released as it is made
(held back while it may still become a stop string), the model's own token count, and
each token's log-probability when asked.

Log-probabilities come from a logits processor, which sees the model's raw logits for
every sampled position (before penalties, grammar and temperature), so they need no
`logits_all` buffer (n_ctx times vocabulary floats: gigabytes for Gemma's 262k tokens)."""

from __future__ import annotations

import codecs
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from openbeepboop.node.backends.base import JSON


class _Recorder:
    """Log-softmax of the logits at each sampled position; the latest one is kept whole
    until the sampled token is known."""

    def __init__(self, top: int, bias: dict[int, float]) -> None:
        self.top = top
        self.bias = bias
        self.latest: Any = None

    def __call__(self, _ids: Any, logits: Any) -> Any:
        import numpy as np

        if self.top >= 0:
            shifted = logits - logits.max()
            self.latest = shifted - np.log(np.exp(shifted).sum())
        if self.bias:
            logits = logits.copy()
            for token, value in self.bias.items():
                if 0 <= token < len(logits):
                    logits[token] += value
        return logits

    def entry(self, token: int, piece: bytes, llm: Any, before: list[int]) -> JSON:
        lp = self.latest
        entry: JSON = {
            "token": piece.decode("utf-8", errors="replace"),
            "logprob": float(lp[token]),
            "bytes": list(piece),
            "top_logprobs": [],
        }
        if self.top:
            import numpy as np

            best = np.argpartition(-lp, self.top)[: self.top]
            for alt in sorted(best.tolist(), key=lambda t: -float(lp[t])):
                alt_piece = llm.detokenize([alt], prev_tokens=before)
                entry["top_logprobs"].append(
                    {
                        "token": alt_piece.decode("utf-8", errors="replace"),
                        "logprob": float(lp[alt]),
                        "bytes": list(alt_piece),
                    }
                )
        return entry


@dataclass
class Generation:
    """What one generation made, filled in as it runs."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "length"
    logprobs: list[JSON] = field(default_factory=list)


@dataclass
class Settings:
    """How to generate: llama.cpp's sampling keys and the request's limits."""

    max_tokens: int
    sampling: JSON
    seed: int | None
    stop: list[str]
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    lstrip: bool = False  # the answer's leading whitespace belongs to the prompt format


class _Gate:
    """Decodes token bytes into text and holds back what may still become a stop
    string; `stopped` once one appears (the text before it is released)."""

    def __init__(self, stops: list[str], lstrip: bool = False) -> None:
        self.stops = stops
        self.lead = lstrip  # drop whitespace until the answer's first character
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        self.held += self.decoder.decode(piece)  # half a character waits for the rest
        if self.lead:
            self.held = self.held.lstrip()
            self.lead = not self.held
        cut = _first_stop(self.held, self.stops)
        if cut is not None:
            ready, self.held, self.stopped = self.held[:cut], "", True
            return ready
        keep = _stop_prefix(self.held, self.stops)
        ready, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return ready

    def rest(self) -> str:
        rest, self.held = self.held + self.decoder.decode(b"", final=True), ""
        return rest


def generate(
    llm: Any, prompt: list[int], settings: Settings, out: Generation, cancel: threading.Event
) -> Iterator[str]:
    """Run one generation from `prompt`, yielding text as it becomes final; `out` holds
    the whole of it when the iterator ends."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    recorder = _recorder(settings)
    room = llm.n_ctx() - len(prompt)
    if room <= 0:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens; the context window holds {llm.n_ctx()}"
        )
    limit = min(settings.max_tokens, room)
    sampling = dict(settings.sampling)
    sampling["temp"] = sampling.pop("temperature", 0.8)
    llm.set_seed(settings.seed if settings.seed is not None else _random_seed())
    vocab = llm._model.vocab
    done: list[int] = []
    gate = _Gate(settings.stop, settings.lstrip)
    tokens = llm.generate(
        prompt,
        logits_processor=[recorder] if recorder is not None else None,
        grammar=LlamaGrammar.from_string(settings.grammar) if settings.grammar else None,
        **sampling,
    )
    try:
        for token in tokens:
            if cancel.is_set():
                out.finish_reason = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                out.finish_reason = "stop"
                break
            before = prompt + done
            piece = llm.detokenize([token], prev_tokens=before)
            done.append(token)
            out.completion_tokens += 1
            if recorder is not None and settings.logprobs:
                out.logprobs.append(recorder.entry(token, piece, llm, before))
            ready = gate.feed(piece)
            if ready:
                out.text += ready
                yield ready
            if gate.stopped:
                out.finish_reason = "stop"
                break
            if out.completion_tokens >= limit:
                break
    finally:
        tokens.close()
    rest = gate.rest()
    if rest:
        out.text += rest
        yield rest
    if out.logprobs and settings.lstrip:
        _lstrip_logprobs(out)
    if out.logprobs and gate.stopped:
        _trim_logprobs(out)


def _recorder(settings: Settings) -> _Recorder | None:
    if not settings.logprobs and not settings.logit_bias:
        return None
    return _Recorder(settings.top_logprobs if settings.logprobs else -1, settings.logit_bias)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could begin a stop string."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:k]):
                keep = k
                break
    return keep


def _lstrip_logprobs(out: Generation) -> None:
    """Drop from the first tokens (and their alternatives) the leading whitespace the
    text was stripped of, so that the tokens still join to the text."""
    for entry in out.logprobs:
        for item in (entry, *entry["top_logprobs"]):  # alternatives at the same place
            item["token"] = item["token"].lstrip()
            item["bytes"] = list(item["token"].encode())
        if entry["token"]:
            break


def _trim_logprobs(out: Generation) -> None:
    """Drop the entries of tokens that fell inside a stop string."""
    kept, length = [], 0
    for entry in out.logprobs:
        if length >= len(out.text):
            break
        kept.append(entry)
        length += len(entry["token"])
    out.logprobs = kept


def _random_seed() -> int:
    import secrets

    return secrets.randbits(32)
