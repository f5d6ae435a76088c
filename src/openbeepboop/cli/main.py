"""`openbeepboop`: the all-in-one `serve`, and the other CLIs as subcommands."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import click

from openbeepboop.cli.client import main as client_group
from openbeepboop.cli.loop import run as run_loop
from openbeepboop.cli.node import main as node_group
from openbeepboop.cli.server import SWARM_BOOTSTRAP, SWARM_DHT_PORT, swarm_line
from openbeepboop.cli.server import main as server_group
from openbeepboop.private_paths import write_private
from openbeepboop.server.settings import (
    ConfigError,
    ServerSettings,
    default_data_dir,
    load_settings,
    write_settings,
)

DEFAULT_MODEL = "gemma-3-270m"
NODE_KEY_FILE = "node.key"
CLIENT_KEY_FILE = "client.key"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openbeepboop")
def main() -> None:
    """OpenBeepBoop: submit LLM jobs now, collect them later."""


main.add_command(server_group, "server")
main.add_command(node_group, "node")
main.add_command(client_group, "client")


def _write_secret(path: Path, value: str) -> None:
    write_private(path, value + "\n")


async def _first_setup(settings: ServerSettings) -> dict[str, str]:
    """Config, database and keys for a new data directory."""
    from openbeepboop.server.core.auth import KeyRing
    from openbeepboop.server.core.swarm_keys import key_signer
    from openbeepboop.server.http.app import open_store
    from openbeepboop.server.models import Role

    try:
        signer = key_signer(settings)  # in a swarm: client and node keys work swarm-wide
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    write_settings(settings.data_dir, {"host": settings.host, "port": settings.port})
    store = open_store(settings)
    await store.open()
    try:
        ring = KeyRing(store, signer=signer)
        keys = {role.value: (await ring.create(role, "serve")).secret for role in Role}
    finally:
        await store.close()
    _write_secret(settings.data_dir / NODE_KEY_FILE, keys["node"])
    _write_secret(settings.data_dir / CLIENT_KEY_FILE, keys["client"])
    return keys


def _banner(url: str, model: str, settings: ServerSettings, keys: dict[str, str] | None) -> str:
    key_file = settings.data_dir / CLIENT_KEY_FILE
    if keys:
        key_line = (
            f"  client key: {keys['client']}\n"
            f"  admin key:  {keys['admin']}\n"
            f"  (shown once; the server keeps only hashes. The client key is also in {key_file})"
        )
        key = keys["client"]
    else:
        key_line = f"  client key: in {key_file} (new keys: openbeepboop server keys create ...)"
        key = "$(cat " + str(key_file) + ")"
    return f"""
OpenBeepBoop is serving {model!r} at {url}
{key_line}
  web interface: {url}/ (log in with {"a key above" if keys else "the client key"})

Try it:
  export OPENBEEPBOOP_BASE_URL={url}
  export OPENBEEPBOOP_API_KEY={key}
  openbeepboop-client submit "Write a haiku about queues" --model {model} --wait

  python -c 'from openbeepboop import Client
job = Client().chat.completions.create(model="{model}",
    messages=[{{"role": "user", "content": "Hello!"}}])
print(job.get(wait=True).choices[0].message.content)'
"""


def _node_config(settings: ServerSettings, node_key: str, models: list[dict[str, Any]]) -> Any:
    from openbeepboop.node.config import NodeConfig

    return NodeConfig.model_validate(
        {
            "server": {"url": f"http://127.0.0.1:{settings.port}", "api_key": node_key},
            "node": {
                "name": "embedded",
                "state_dir": str(settings.data_dir / "node"),
                "drain_seconds": 10,
            },
            "models": models,
        }
    )


@main.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OPENBEEPBOOP_DATA_DIR",
    show_envvar=True,
    help=f"Config, database and keys [default: {default_data_dir()}].",
)
@click.option("--host", help="Address to listen on [127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [8000].")
@click.option(
    "--model",
    "model_name",
    default=DEFAULT_MODEL,
    show_default=True,
    help="The name clients ask for.",
)
@click.option("--model-path", help="A GGUF file or hf:org/repo/file.gguf [bundled Gemma].")
@click.option(
    "--echo/--no-echo",
    default=True,
    show_default=True,
    help="Also serve the built-in `echo` model (instant answers, for checks).",
)
@SWARM_DHT_PORT
@SWARM_BOOTSTRAP
def serve(
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    model_name: str,
    model_path: str | None,
    echo: bool,
    dht_port: int | None,
    bootstrap: str | None,
) -> None:
    """A server and an embedded node on a local model, in one process.

    The first start creates the data directory and prints a client key; later starts
    reuse them. SIGTERM/SIGINT drain the node, then stop the server.
    """
    from openbeepboop.node import logs
    from openbeepboop.node.runner import NodeRunner
    from openbeepboop.server.core.keys import given_keys
    from openbeepboop.server.http.app import create_app
    from openbeepboop.server.http.serving import make_server

    try:
        settings = load_settings(
            data_dir, host=host, port=port, dht_port=dht_port, bootstrap=bootstrap
        )
        given_keys(settings)  # a wrong key given: said before anything is made
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    keys = None
    if not settings.config_path.exists():
        keys = asyncio.run(_first_setup(settings))
    node_key_path = settings.data_dir / NODE_KEY_FILE
    # a node key given to the server (OPENBEEPBOOP_NODE_KEY): the embedded node's too
    given = settings.node_key.get_secret_value().strip() if settings.node_key else ""
    if not given and not node_key_path.exists():
        raise click.ClickException(
            f"{node_key_path} is missing: create a node key with "
            f"`openbeepboop server keys create --data-dir {settings.data_dir} --role node` "
            "and save it there"
        )
    models: list[dict[str, Any]] = [{"name": model_name, "backend": "llama_cpp"}]
    if model_path:
        models[0]["path"] = model_path
    if echo and model_name != "echo":
        models.append({"name": "echo", "backend": "echo", "concurrency": 16})
    node_config = _node_config(settings, given or node_key_path.read_text().strip(), models)

    logs.configure(settings.log_level)
    # listening on every address (as in a container): clients here use the loopback
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{shown_host}:{settings.port}"
    click.echo(_banner(url, model_name, settings, keys), err=True)
    code = run_loop(_serve(settings, create_app, make_server, NodeRunner, node_config))
    sys.exit(code)


async def _serve(
    settings: ServerSettings, create_app: Any, make_server: Any, runner_cls: Any, node_config: Any
) -> int:
    from openbeepboop.cli import forwarder

    loop = asyncio.get_running_loop()
    runner = runner_cls(node_config)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(swarm_line(app), err=True, nl=False)
    forwarder.install(app)  # in a swarm: other members' models served through them
    server = make_server(app, settings, on_signal=lambda: loop.call_soon_threadsafe(runner.stop))
    node = asyncio.create_task(runner.run(install_signals=False))
    node.add_done_callback(lambda _: setattr(server, "should_exit", True))
    await server.serve()
    if not node.done():  # the server stopped on its own (e.g. the port was taken)
        runner.stop()
        runner.stop()
    code = await node
    if not server.started:
        return 3
    return int(code)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
