"""Backends are found through the `openbeepboop.backends` entry point group: each entry
names a factory `(model_config, models_dir) -> Backend`. The built-in ones are declared
in pyproject.toml exactly as a plugin would declare its own."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

# The built-in backend modules (all light: their libraries load lazily) are imported
# here, before the factories below are defined. Importing a submodule binds its name on
# this package, so a first import from inside a factory would replace the factory `echo`
# (the name the entry point gives) with the module `echo`, and a second model on the same
# backend would fail with "'module' object is not callable".
from openbeepboop.node.backends import echo as _echo  # noqa: F401
from openbeepboop.node.backends import litellm as _litellm  # noqa: F401
from openbeepboop.node.backends import llama_cpp as _llama_cpp  # noqa: F401
from openbeepboop.node.backends import openai_compat as _openai_compat  # noqa: F401
from openbeepboop.node.backends.base import Backend, BackendError

GROUP = "openbeepboop.backends"


def build_backend(config: Any, models_dir: Path) -> Backend:
    """The backend for one `[[models]]` entry."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    ep = found.get(config.backend)
    if ep is None:
        known = ", ".join(sorted(found)) or "none"
        raise BackendError(
            f"unknown backend {config.backend!r} (installed: {known})",
            code="invalid_config",
            retryable=False,
        )
    backend: Backend = ep.load()(config, models_dir)
    return backend


def echo(config: Any, models_dir: Path) -> Backend:
    from openbeepboop.node.backends.echo import EchoBackend

    return EchoBackend(config)


def llama_cpp(config: Any, models_dir: Path) -> Backend:
    from openbeepboop.node.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(config, models_dir)


def litellm(config: Any, models_dir: Path) -> Backend:
    from openbeepboop.node.backends.litellm import LiteLLMBackend

    return LiteLLMBackend(config)


def openai(config: Any, models_dir: Path) -> Backend:
    from openbeepboop.node.backends.openai_compat import OpenAIBackend

    return OpenAIBackend(config)
