"""The one error of the model cache: its message is what a person reads."""

from __future__ import annotations


class PullError(Exception):
    """A pull, a listing or a removal failed; `str(exc)` is one line saying why."""
