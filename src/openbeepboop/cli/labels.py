"""`--label KEY=VALUE` options, shared by the client's `submit` (a job's node labels) and
the node's `setup` (the node's own labels)."""

from __future__ import annotations

import click


def parse_labels(given: tuple[str, ...]) -> dict[str, str]:
    """`--label KEY=VALUE` options as an object (UsageError when one has no `=`)."""
    out = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--label takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out
