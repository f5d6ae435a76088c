"""The client's environment: where the server is, which key, which model, and the batch
runner's knobs.

`OPENBEEPBOOP_BASE_URL`, `OPENBEEPBOOP_API_KEY` and `OPENBEEPBOOP_MODEL` come first;
`OPENAI_BASE_URL`, `OPENAI_API_KEY` and `OPENAI_MODEL` are their fallbacks, so a program
set up for an OpenAI-compatible endpoint works unchanged. One rule guards the key:
`OPENAI_API_KEY` is sent only to a server named by `OPENAI_BASE_URL`, never to one given
as an argument or by `OPENBEEPBOOP_BASE_URL` (someone's OpenAI key does not leave for a
queue server it was not meant for).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Endpoint:
    """The server and key a client uses, and where the URL came from."""

    base_url: str
    api_key: str | None
    explicit: bool  # the URL was given (argument or variable), not the default


def endpoint(base_url: str | None = None, api_key: str | None = None) -> Endpoint:
    """The server and key from the arguments, else the environment (see the module's
    docstring), else the local all-in-one server and the key it saved."""
    from_openai = False
    url = base_url or os.environ.get("OPENBEEPBOOP_BASE_URL")
    if not url and os.environ.get("OPENAI_BASE_URL"):
        url, from_openai = os.environ["OPENAI_BASE_URL"], True
    key = api_key or os.environ.get("OPENBEEPBOOP_API_KEY")
    if not key and from_openai:
        key = os.environ.get("OPENAI_API_KEY")
    explicit = bool(url)
    url = (url or DEFAULT_BASE_URL).rstrip("/").removesuffix("/v1")
    return Endpoint(url, key or local_client_key(), explicit)


def default_model(model: str | None = None) -> str | None:
    """`model`, else `OPENBEEPBOOP_MODEL`, else `OPENAI_MODEL`."""
    return model or os.environ.get("OPENBEEPBOOP_MODEL") or os.environ.get("OPENAI_MODEL")


def local_client_key() -> str | None:
    """The client key `openbeepboop serve` saved in its default data directory, if any:
    on the machine that runs the all-in-one server, clients need no setup."""
    import platformdirs

    data_dir = os.environ.get("OPENBEEPBOOP_DATA_DIR") or platformdirs.user_data_dir(
        "openbeepboop", appauthor=False
    )
    path = Path(data_dir) / "client.key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def env_number(name: str, default: float, *, minimum: float = 0, integer: bool = True) -> float:
    """The number in variable `name` (unset or empty: `default`); a ValueError naming the
    variable when it is not a finite number of the right kind or below `minimum`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, not {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {raw!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, not {raw!r}")
    return value
