"""Backends are plugins: each is an entry point of the `openbeepboop.backends` group that
names a backend class (see `base.BackendClass`). The class's `Config` model holds the
keys of its `[[models]]` entries; the node builds it as `cls(config, models_dir)`. The
built-in ones are declared in pyproject.toml exactly as a plugin declares its own:

    [project.entry-points."openbeepboop.backends"]
    echo = "openbeepboop.node.backends.echo:EchoBackend"

Nothing is imported until a backend is asked for by name, and then only its module.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import cast

from openbeepboop.node.backends.base import (
    Backend,
    BackendClass,
    BackendError,
    ModelConfig,
)

GROUP = "openbeepboop.backends"


class PluginError(Exception):
    """A backend name that no installed entry point gives, or one that does not load."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def installed_backends() -> list[str]:
    """The names of the installed backends, sorted (no backend module is imported)."""
    return sorted(_entry_points())


def backend_class(name: str) -> BackendClass:
    """Load the class of backend `name`; PluginError says why it cannot be had."""
    found = _entry_points()
    ep = found.get(name)
    if ep is None:
        known = ", ".join(sorted(found)) or "none"
        raise PluginError(f"unknown backend {name!r}; installed: {known}")
    try:
        loaded = ep.load()
    except Exception as exc:  # a plugin's import error is the user's to see, not a traceback
        raise PluginError(
            f"backend {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    config = getattr(loaded, "Config", None)
    if not (callable(loaded) and isinstance(config, type) and issubclass(config, ModelConfig)):
        raise PluginError(
            f"backend {name!r} ({ep.value}) is not a backend: it needs a `Config` attribute "
            "that subclasses openbeepboop.node.backends.base.ModelConfig"
        )
    return cast(BackendClass, loaded)


def build_backend(config: ModelConfig, models_dir: Path) -> Backend:
    """The backend for one validated `[[models]]` entry, not loaded yet."""
    try:
        cls = backend_class(config.backend)
    except PluginError as exc:
        raise BackendError(str(exc), code="invalid_config", retryable=False) from exc
    if not isinstance(config, cls.Config):
        raise TypeError(f"backend {config.backend!r} takes a {cls.Config.__name__}")
    return cls(config, models_dir)
