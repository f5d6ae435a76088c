"""Node configuration: `node_config.toml` (docs/configuration.md), validated with pydantic.

Each `[[models]]` entry belongs to a backend, which owns the model of its keys
(`node/backends`): the entry's `backend` names the entry point, whose `Config` validates
the rest.

Environment variables override the file: `OPENBEEPBOOP_SERVER_URL`,
`OPENBEEPBOOP_NODE_KEY` (or the file `OPENBEEPBOOP_NODE_KEY_FILE` names: a Docker secret;
or `OPENBEEPBOOP_API_KEY`), `OPENBEEPBOOP_NODE_NAME`.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any

import platformdirs
import tomli_w
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from openbeepboop.node.backends import PluginError, backend_class
from openbeepboop.node.backends.base import ModelConfig
from openbeepboop.node.models.cache import default_models_dir
from openbeepboop.private_paths import private_dir, secret_from_file_variable, write_private

DEFAULT_CONFIG = "node_config.toml"
ON_DEMAND_SOURCES = ("hf:", "https://", "http://")


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
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description='Labels jobs can be pinned to (`node_labels`), e.g. {gpu = "a100"}.',
    )
    exclusive_models: bool = Field(
        False,
        description="The models take turns: one is loaded at a time (a GPU that holds one "
        "model's weights), a job of another waits for the running ones, then the node "
        "switches; the server keeps the node on its loaded model while that has work.",
    )
    on_demand: list[str] = Field(
        default_factory=list,
        description="Models the node fetches when a job names them: spec prefixes, each "
        'starting with "hf:", "https://" or "http://" (e.g. "hf:" for any hub file, '
        '"hf:unsloth/" for one organisation). None: only the [[models]] entries.',
    )
    on_demand_max_gb: float = Field(
        50.0, gt=0, description="Room the models fetched on demand may take in the cache."
    )
    on_demand_idle_unload_seconds: float | None = Field(
        600.0, gt=0, description="A model fetched on demand is unloaded after this idle."
    )

    @model_validator(mode="after")
    def _exclusive_alone(self) -> NodeSection:
        if self.exclusive_models and self.on_demand:
            raise ValueError("exclusive_models does not combine with on_demand")
        return self

    @field_validator("on_demand")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        for prefix in value:
            if not prefix.startswith(ON_DEMAND_SOURCES):
                raise ValueError(
                    f"{prefix!r}: an on-demand source starts with "
                    + ", ".join(repr(s) for s in ON_DEMAND_SOURCES)
                )
        return value


class _BackendName(BaseModel):
    backend: str = Field(min_length=1)


def _relocated(exc: ValidationError, *prefix: str) -> ValidationError:
    """`exc` with its locations under `prefix` (messages kept as they are)."""
    details: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError(err["type"], err["msg"]),
            "loc": (*prefix, *err["loc"]),
            "input": err["input"],
        }
        for err in exc.errors()
    ]
    return ValidationError.from_exception_data(exc.title, details)


def read_model_entry(entry: Any) -> Any:
    """One `[[models]]` entry, read in two steps: its `backend` names an installed
    backend (entry point), whose own `Config` model then validates the whole entry.

    Errors come as a ValidationError located within the entry: `backend` when the name is
    missing or unknown (the message lists the installed ones), `<backend>.<key>` for the
    backend's own keys, as a tagged union would put them."""
    if not isinstance(entry, dict):
        return entry  # already a ModelConfig, or not a table: pydantic says which
    name = _BackendName.model_validate(entry).backend
    try:
        config_model = backend_class(name).Config
    except PluginError as exc:
        error = PydanticCustomError("unknown_backend", str(exc))
        raise ValidationError.from_exception_data(
            "ModelConfig", [{"type": error, "loc": ("backend",), "input": name}]
        ) from exc
    try:
        return config_model.model_validate(entry)
    except ValidationError as exc:
        raise _relocated(exc, name) from exc


# A `[[models]]` entry: validated by its backend's own model, written back in full.
ModelEntry = Annotated[ModelConfig, BeforeValidator(read_model_entry), SerializeAsAny()]


class NodeConfig(_Strict):
    """The whole node config file."""

    server: ServerSection
    node: NodeSection = Field(default_factory=NodeSection)
    models: list[ModelEntry] = Field(min_length=1)

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
        return default_models_dir()  # $OPENBEEPBOOP_MODELS_DIR, else the user cache dir's

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
    key = _key_file() or os.environ.get("OPENBEEPBOOP_NODE_KEY")
    key = key or os.environ.get("OPENBEEPBOOP_API_KEY")
    if key:
        server["api_key"] = key
    if name := os.environ.get("OPENBEEPBOOP_NODE_NAME"):
        node["name"] = name
    return {**data, "server": server, "node": node}


def _key_file() -> str:
    """The node key in the file `OPENBEEPBOOP_NODE_KEY_FILE` names (stripped), or ''
    without one; NodeConfigError when it cannot be read, is empty, or
    `OPENBEEPBOOP_NODE_KEY` is set too."""
    try:
        return secret_from_file_variable("OPENBEEPBOOP_NODE_KEY")
    except ValueError as exc:
        raise NodeConfigError(str(exc)) from None


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
        raise NodeConfigError(f"{path}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """`invalid node config:` and one `  where: message` line per error."""
    lines = ["invalid node config:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        lines.append(f"  {where or '(file)'}: {err['msg']}")
    return "\n".join(lines)


def write_node_config(config: NodeConfig, path: Path) -> None:
    """Write `config` as TOML (the key is written too: keep the file private)."""
    data = config.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    if not data["node"].get("labels"):
        data["node"].pop("labels", None)  # no empty [node.labels] table
    private_dir(path.parent)
    header = "# OpenBeepBoop node config (openbeepboop-node setup). Holds a key: keep private.\n"
    write_private(path, header + tomli_w.dumps(data))
