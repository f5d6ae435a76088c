"""What the client commands share: options as typed, and JSON on stdout."""

from __future__ import annotations

import json
from typing import Any

import click


def given(ctx: click.Context, name: str, value: Any) -> Any:
    """The URL or key as given on the command line (before or after the command), else
    None: the library reads the environment itself, with its rule that OPENAI_API_KEY
    goes only to the server OPENAI_BASE_URL names."""
    command_line = click.core.ParameterSource.COMMANDLINE
    if ctx.get_parameter_source(name) is command_line:
        return value
    root = ctx.find_root()
    return root.params.get(name) if root.get_parameter_source(name) is command_line else None


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))
