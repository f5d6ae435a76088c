"""Node configuration: `node_config.toml` (CONTRACT.md), validated with pydantic.

Environment variables override the file: `OPENBEEPBOOP_SERVER_URL`,
`OPENBEEPBOOP_NODE_KEY` (or `OPENBEEPBOOP_API_KEY`), `OPENBEEPBOOP_NODE_NAME`.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import platformdirs
import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG = "node_config.toml"


class NodeConfigError(Exception):
    """The node config is missing or wrong; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    url: str = Field(pattern=r"^https?://", description="The queue server's base URL.")
    api_key: str = Field(min_length=1, description="A node key (obb_node_...).")
    timeout_seconds: float = Field(60.0, gt=0, description="Per-request timeout.")


class NodeSection(_Strict):
    name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often leases are renewed.")
    poll_seconds: float = Field(30.0, ge=0, description="Long-poll length of each fetch.")
    drain_seconds: float = Field(30.0, ge=0, description="SIGTERM: time to finish jobs.")
    state_dir: Path | None = Field(None, description="Where the result outbox lives.")
    models_dir: Path | None = Field(None, description="Where downloaded models are kept.")
    log_prompts: bool = Field(False, description="Include prompt text in logs.")


class _ModelBase(_Strict):
    name: str = Field(min_length=1, description="The model name clients ask for.")
    concurrency: int = Field(1, ge=1, le=1024, description="Jobs run at once.")
    timeout_seconds: float = Field(600.0, gt=0, description="Longest single generation.")
    max_attempts: int = Field(5, ge=1, le=50, description="Tries on transient provider errors.")
    rpm: float | None = Field(None, gt=0, description="Requests per minute to pace to.")
    tpm: float | None = Field(None, gt=0, description="Tokens per minute (informational).")


class EchoModel(_ModelBase):
    """Built in: answers with the last user message after `delay_ms`."""

    backend: Literal["echo"]
    delay_ms: float = Field(0, ge=0)
    token_delay_ms: float = Field(0, ge=0, description="Pause between streamed words.")


class LlamaCppModel(_ModelBase):
    """A local GGUF on llama-cpp-python; no path = the bundled Gemma 3 270M."""

    backend: Literal["llama_cpp"]
    path: str | None = Field(None, description="A .gguf path or hf:org/repo/file.gguf.")
    chat_format: str | None = Field(
        None, description="llama.cpp chat format; default: the GGUF's template, else chatml."
    )
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = Field(None, ge=1)
    n_gpu_layers: int = Field(0, ge=-1)
    max_tokens: int = Field(512, ge=1, description="Default when a request sets none.")


class _ProviderModel(_ModelBase):
    """A model reached over the network with an optional API key."""

    api_key: str | None = None
    api_key_env: str | None = Field(None, description="Read the API key from this variable.")

    def resolved_api_key(self) -> str | None:
        """`api_key`, else the value of `api_key_env` (which must then be set), else None."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise NodeConfigError(
                    f"model {self.name!r}: api_key_env {self.api_key_env!r} is not set"
                )
            return value
        return None


class LiteLLMModel(_ProviderModel):
    """Anything LiteLLM reaches: Ollama, LM Studio, vLLM, OpenAI, Anthropic, ..."""

    backend: Literal["litellm"]
    model: str = Field(min_length=1, description="A LiteLLM model string, e.g. ollama/llama3.")
    api_base: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Passed to LiteLLM as is.")


class OpenAIModel(_ProviderModel):
    """Any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp's server, Ollama's
    /v1, LM Studio, ...), called directly; request fields pass through untouched."""

    backend: Literal["openai"]
    api_base: str = Field(
        description="The base URL the OpenAI paths follow, e.g. http://127.0.0.1:11434/v1."
    )
    model: str | None = Field(
        None, min_length=1, description="The upstream model name; default: `name`."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers sent with every request."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Merged into every request body."
    )

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:11434/v1")
        return value

    def upstream_model(self) -> str:
        """The model name sent upstream."""
        return self.model or self.name


ModelConfig = Annotated[
    EchoModel | LlamaCppModel | LiteLLMModel | OpenAIModel, Field(discriminator="backend")
]


class NodeConfig(_Strict):
    """The whole node config file."""

    server: ServerSection
    node: NodeSection = Field(default_factory=NodeSection)
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> NodeConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    def models_dir(self) -> Path:
        if self.node.models_dir is not None:
            return self.node.models_dir
        return Path(platformdirs.user_cache_dir("openbeepboop", appauthor=False)) / "models"

    def state_dir(self) -> Path:
        if self.node.state_dir is not None:
            return self.node.state_dir
        return Path(platformdirs.user_state_dir("openbeepboop", appauthor=False))


def default_config_path() -> Path:
    return Path(os.environ.get("OPENBEEPBOOP_NODE_CONFIG", DEFAULT_CONFIG))


def _env_overrides(data: dict[str, Any]) -> dict[str, Any]:
    server = dict(data.get("server") or {})
    node = dict(data.get("node") or {})
    if url := os.environ.get("OPENBEEPBOOP_SERVER_URL"):
        server["url"] = url
    key = os.environ.get("OPENBEEPBOOP_NODE_KEY") or os.environ.get("OPENBEEPBOOP_API_KEY")
    if key:
        server["api_key"] = key
    if name := os.environ.get("OPENBEEPBOOP_NODE_NAME"):
        node["name"] = name
    return {**data, "server": server, "node": node}


def load_node_config(path: Path) -> NodeConfig:
    """Read, override from the environment, and validate; NodeConfigError says what's wrong."""
    if not path.exists():
        raise NodeConfigError(
            f"no node config at {path}; create one with: openbeepboop-node setup --config {path}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return NodeConfig.model_validate(_env_overrides(data))
    except ValidationError as exc:
        lines = [f"{path}: invalid node config:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            lines.append(f"  {where or '(file)'}: {err['msg']}")
        raise NodeConfigError("\n".join(lines)) from exc


def write_node_config(config: NodeConfig, path: Path) -> None:
    """Write `config` as TOML (the key is written too: keep the file private)."""
    data = config.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# OpenBeepBoop node config (openbeepboop-node setup). Holds a key: keep private.\n"
    path.write_text(header + tomli_w.dumps(data))
    path.chmod(0o600)
