"""`openbeepboop-node`: setup (a wizard, every prompt also a flag), run, batch."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import httpx
from pydantic import ValidationError

from openbeepboop.cli.labels import parse_labels
from openbeepboop.cli.loop import run as run_loop
from openbeepboop.node.backends import PluginError, backend_class, installed_backends
from openbeepboop.node.config import (
    NodeConfig,
    NodeConfigError,
    default_config_path,
    describe,
    load_node_config,
    write_node_config,
)

CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=default_config_path,
    envvar="OPENBEEPBOOP_NODE_CONFIG",
    show_envvar=True,
    show_default="node_config.toml",
    help="The node's TOML config.",
)
# the model name each built-in backend suggests; a plugin's suggests its own name
DEFAULT_NAMES = {
    "llama_cpp": "gemma-3-270m",
    "echo": "echo",
    "openai": "llama3",
    "litellm": "gpt-4o-mini",
}


class BackendChoice(click.Choice[str]):
    """The installed backends (the `openbeepboop.backends` entry points), looked up when
    a command uses them, not when this module is imported."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> Sequence[str]:
        """The installed backends' names, sorted."""
        return installed_backends()

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        """Ignored: the entry points decide."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openbeepboop")
def main() -> None:
    """An OpenBeepBoop node: pulls jobs from a server and runs them on local or remote models.

    Environment: OPENBEEPBOOP_SERVER_URL, OPENBEEPBOOP_NODE_KEY and OPENBEEPBOOP_NODE_NAME
    override the config file.
    """


def _model_from_flags(
    name: str,
    backend: str,
    path: str | None,
    model: str | None,
    api_base: str | None,
    provider_key: str | None,
    provider_key_env: str | None,
    concurrency: int | None,
    delay_ms: float | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "backend": backend}
    if concurrency:
        entry["concurrency"] = concurrency
    if backend == "llama_cpp" and path:
        entry["path"] = path
    if backend == "echo" and delay_ms is not None:
        entry["delay_ms"] = delay_ms
    if backend == "openai" and not api_base:
        raise click.UsageError("--api-base is required for the openai backend")
    if backend == "litellm" and not model:
        raise click.UsageError("--litellm-model is required for the litellm backend")
    if backend in ("openai", "litellm"):
        if model:
            entry["model"] = model
        for key, value in (
            ("api_base", api_base),
            ("api_key", provider_key),
            ("api_key_env", provider_key_env),
        ):
            if value:
                entry[key] = value
    return entry


def _ask_model() -> dict[str, Any]:
    backend = click.prompt("Backend", type=BackendChoice(), default="llama_cpp", err=True)
    default_name = DEFAULT_NAMES.get(backend, backend)
    name = click.prompt("Model name clients will ask for", default=default_name, err=True)
    path = model = api_base = key_env = None
    if backend == "llama_cpp":
        path = (
            click.prompt(
                "GGUF path or hf:org/repo/file.gguf (empty: the bundled Gemma 3 270M)",
                default="",
                show_default=False,
                err=True,
            )
            or None
        )
    if backend == "openai":
        api_base = click.prompt(
            "Base URL of the OpenAI-compatible API", default="http://127.0.0.1:11434/v1", err=True
        )
        model = click.prompt("The model's name at that endpoint", default=name, err=True)
    if backend == "litellm":
        model = click.prompt("LiteLLM model (e.g. ollama/llama3, openai/gpt-4o-mini)", err=True)
        api_base = (
            click.prompt(
                "API base URL (empty: the provider's)", default="", show_default=False, err=True
            )
            or None
        )
    if backend in ("openai", "litellm"):
        key_env = (
            click.prompt(
                "Environment variable holding the API key (empty: none)",
                default="",
                show_default=False,
                err=True,
            )
            or None
        )
    entry = _model_from_flags(name, backend, path, model, api_base, None, key_env, None, None)
    _ask_required_keys(entry)
    if concurrency := click.prompt("Concurrent jobs", default=1, type=int, err=True):
        entry["concurrency"] = concurrency
    return entry


def _ask_required_keys(entry: dict[str, Any]) -> None:
    """Ask for the keys the backend's own model requires that no question above set (a
    plugin's, whose descriptions are the prompts); pydantic converts the answers."""
    try:
        config_model = backend_class(entry["backend"]).Config
    except PluginError as exc:
        raise click.ClickException(str(exc)) from exc
    for key, field in config_model.model_fields.items():
        if field.is_required() and key not in entry:
            entry[key] = click.prompt(f"{field.description or key} ({key})", err=True)


def _flag_default_name(backend: str, upstream: str | None) -> str:
    """What --model-name defaults to: the upstream name for openai and litellm, else the
    backend's suggestion (a plugin's own name)."""
    if backend in ("openai", "litellm"):
        return upstream or "model"
    return DEFAULT_NAMES.get(backend, backend)


def check_server(url: str, key: str) -> str | None:
    """None when the server answers and accepts the key; else what is wrong."""
    try:
        r = httpx.get(
            url.rstrip("/") + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
    except httpx.HTTPError as exc:
        return f"cannot reach the server at {url}: {exc}"
    if r.status_code in (401, 403):
        return f"the server at {url} refused the key ({r.status_code})"
    if r.status_code != 200:
        return f"the server at {url} answered {r.status_code}"
    if not key.startswith("obb_node_"):
        return "this is not a node key (node keys start with obb_node_)"
    return None


@main.command()
@CONFIG
@click.option("--server", "server_url", help="Server URL, e.g. http://127.0.0.1:8000.")
@click.option("--api-key", help="A node key (obb_node_...).")
@click.option("--name", help="This node's name [default: hostname-pid].")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="A label jobs can be pinned to (node_labels); repeat for more.",
)
@click.option("--model-name", help="The model name clients ask for.")
@click.option("--backend", type=BackendChoice(), help="How the model runs.")
@click.option("--path", help="llama_cpp: a GGUF path or hf:org/repo/file.gguf.")
@click.option("--litellm-model", help="litellm: the LiteLLM model string.")
@click.option("--upstream-model", help="openai: the model's name at the endpoint [--model-name].")
@click.option("--api-base", help="openai (required), litellm: the provider's base URL.")
@click.option("--provider-key", help="openai, litellm: the provider's key (stored in the file).")
@click.option("--provider-key-env", help="openai, litellm: variable holding the provider's key.")
@click.option("--concurrency", type=int, help="Jobs this model runs at once [1].")
@click.option("--delay-ms", type=float, help="echo: delay before answering.")
@click.option("--no-check", is_flag=True, help="Do not contact the server.")
@click.option("--non-interactive", is_flag=True, help="Never prompt; fail on missing flags.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def setup(
    config_path: Path,
    server_url: str | None,
    api_key: str | None,
    name: str | None,
    labels: tuple[str, ...],
    model_name: str | None,
    backend: str | None,
    path: str | None,
    litellm_model: str | None,
    upstream_model: str | None,
    api_base: str | None,
    provider_key: str | None,
    provider_key_env: str | None,
    concurrency: int | None,
    delay_ms: float | None,
    no_check: bool,
    non_interactive: bool,
    as_json: bool,
) -> None:
    """Write the node config (and check that the server answers and takes the key)."""
    interactive = not non_interactive and sys.stdin.isatty()
    if interactive:
        click.echo("OpenBeepBoop node setup. Press Enter to accept a default.\n", err=True)
        server_url = server_url or click.prompt(
            "Server URL", default="http://127.0.0.1:8000", err=True
        )
        api_key = api_key or click.prompt("Node key (obb_node_...)", hide_input=True, err=True)
        name = name or click.prompt("Node name", default="", show_default=False, err=True) or None
    missing = [
        flag for flag, value in (("--server", server_url), ("--api-key", api_key)) if not value
    ]
    if missing:
        raise click.UsageError(
            f"missing {' and '.join(missing)} (or run without --non-interactive)"
        )
    if backend or model_name:
        backend = backend or "llama_cpp"
        models = [
            _model_from_flags(
                model_name or _flag_default_name(backend, litellm_model or upstream_model),
                backend,
                path,
                upstream_model if backend == "openai" else litellm_model,
                api_base,
                provider_key,
                provider_key_env,
                concurrency,
                delay_ms,
            )
        ]
    elif interactive:
        models = [_ask_model()]
        while click.confirm("Add another model?", default=False, err=True):
            models.append(_ask_model())
    else:
        models = [{"name": "gemma-3-270m", "backend": "llama_cpp"}]
    data: dict[str, Any] = {"server": {"url": server_url, "api_key": api_key}, "models": models}
    if name:
        data["node"] = {"name": name}
    if labels:
        data.setdefault("node", {})["labels"] = parse_labels(labels)
    try:
        config = NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise click.UsageError(describe(exc)) from exc
    problem = None if no_check else check_server(str(server_url), str(api_key))
    if problem:
        raise click.ClickException(problem + " (use --no-check to write the config anyway)")
    write_node_config(config, config_path)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "config": str(config_path),
                    "models": [m["name"] for m in models],
                    "checked": not no_check,
                }
            )
        )
    else:
        click.echo(
            f"Wrote {config_path}. Start the node with:\n"
            f"  openbeepboop-node run --config {config_path}"
        )


def _load(config_path: Path) -> NodeConfig:
    try:
        return load_node_config(config_path)
    except NodeConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _run(config_path: Path, batch: bool, log_level: str) -> None:
    from openbeepboop.node import logs
    from openbeepboop.node.runner import NodeRunner

    config = _load(config_path)
    logs.configure(log_level)
    code = run_loop(NodeRunner(config).run(batch=batch))
    sys.exit(code)


LOG_LEVEL = click.option(
    "--log-level",
    default="info",
    envvar="OPENBEEPBOOP_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)


@main.command()
@CONFIG
@LOG_LEVEL
def run(config_path: Path, log_level: str) -> None:
    """Pull and run jobs until SIGTERM/SIGINT (the second signal releases running jobs)."""
    _run(config_path, batch=False, log_level=log_level)


@main.command()
@CONFIG
@LOG_LEVEL
def batch(config_path: Path, log_level: str) -> None:
    """Run what is queued for this node's models, then exit 0 (for cron)."""
    _run(config_path, batch=True, log_level=log_level)


# -- models: the cache shared by the nodes on this machine ------------------------------

CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OPENBEEPBOOP_MODELS_DIR",
    show_envvar=True,
    help="The model cache [default: the user cache dir's openbeepboop/models].",
)


def _cache(cache_dir: Path | None) -> Any:
    from openbeepboop.node.models import ModelCache, default_models_dir

    return ModelCache(cache_dir or default_models_dir())


@main.group()
def models() -> None:
    """Pull, list and remove GGUF models in the cache every node on this machine shares."""


@models.command()
@click.argument("spec")
@CACHE_DIR
@click.option("--sha256", help="The file's expected sha256 (hex); checked with the hub's.")
@click.option("--json", "as_json", is_flag=True, help="Print the cached entry as JSON.")
def pull(spec: str, cache_dir: Path | None, sha256: str | None, as_json: bool) -> None:
    """Fetch SPEC into the cache: resumable, checksummed, with progress.

    SPEC is hf:ORG/REPO[@REVISION]/FILE.gguf (HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE
    apply), an http(s) URL, or a local path (hard-linked when on the same disk, else
    copied). An interrupted pull resumes where it stopped; the sha256 is checked against
    the hub's and --sha256. A spec already in the cache is not fetched again.
    """
    from openbeepboop.cli.pull_progress import pull_progress
    from openbeepboop.node.models import PullError, pull_model

    def waiting() -> None:
        click.echo(f"another process is pulling {spec}; waiting for it", err=True)

    try:
        label = spec.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        with pull_progress(f"pulling {label}") as progress:
            entry = pull_model(
                spec, _cache(cache_dir), sha256=sha256, progress=progress, on_wait=waiting
            )
    except PullError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the partial download is kept; pull again to resume", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(entry.to_json()))
    else:
        click.echo(f"{entry.name}  {entry.size} bytes  sha256 {entry.sha256[:12]}  {entry.path}")


@models.command("list")
@CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_models(cache_dir: Path | None, as_json: bool) -> None:
    """The cached models: name, size, sha256, source spec and path."""
    from openbeepboop.node.models import PullError

    cache = _cache(cache_dir)
    try:
        entries = cache.entries()
    except PullError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no models in {cache.root}", err=True)
        return
    rows = [("NAME", "SIZE", "SHA256", "SPEC", "PATH")]
    rows += [(e.name, _size(e.size), e.sha256[:12], e.spec, str(e.path)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[4]]))


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


@models.command()
@click.argument("name")
@CACHE_DIR
def rm(name: str, cache_dir: Path | None) -> None:
    """Delete a cached model: NAME as `models list` shows it, or the spec it came from."""
    from openbeepboop.node.models import PullError

    try:
        entry = _cache(cache_dir).remove(name)
    except PullError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {entry.name} ({entry.path})")


if __name__ == "__main__":
    main()
