"""Results as the `openai` package's types (`ChatCompletion`, `Completion`,
`CreateEmbeddingResponse`) when it is installed, else as attribute-access dictionaries
with the same shape."""

from __future__ import annotations

from typing import Any


class AttrDict(dict[str, Any]):
    """A dict whose keys read as attributes, recursively: `r.choices[0].message.content`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self[name])
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __getitem__(self, key: str) -> Any:
        return _wrap(super().__getitem__(key))


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, AttrDict):
        return AttrDict(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def typed_result(endpoint: str, raw: dict[str, Any]) -> Any:
    """`raw` as an `openai` model for its endpoint (lenient), or an AttrDict."""
    try:
        if endpoint == "/v1/completions":
            from openai.types import Completion as Model
        elif endpoint == "/v1/embeddings":
            from openai.types import CreateEmbeddingResponse as Model  # type: ignore[assignment]
        else:
            from openai.types.chat import ChatCompletion as Model  # type: ignore[assignment]
    except ImportError:
        return AttrDict(raw)
    try:
        return Model.model_validate(raw)
    except ValueError:
        return Model.construct(**raw)
