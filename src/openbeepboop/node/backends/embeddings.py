"""What every backend shares to serve `/v1/embeddings`: the inputs of a request, the
OpenAI response object, and `encoding_format` base64 (little-endian float32, as OpenAI
sends it and its SDK decodes it)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

from openbeepboop.node.backends.base import JSON, BackendError, Chunk

ENDPOINT = "/v1/embeddings"


def refuse(message: str, param: str) -> BackendError:
    """A 400 the caller sees, naming the parameter to blame."""
    return BackendError(message, code="invalid_request", retryable=False, status=400, param=param)


def inputs(request: JSON) -> list[str | list[int]]:
    """The request's `input` as a list: each item a text or a token array."""
    value = request.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [list(value)]
    texts = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    arrays = isinstance(value, list) and value and all(_tokens(v) for v in value)
    if isinstance(value, list) and (texts or arrays):
        return list(value)
    raise refuse(
        "'input' must be a string, a list of strings, or token arrays (not empty)", "input"
    )


def _tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def encode_base64(vector: Sequence[float]) -> str:
    """`vector` as little-endian float32 bytes in base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def in_format(response: JSON, request: JSON) -> JSON:
    """`response` with its vectors in the format the request asked for (a provider that
    ignored `encoding_format` sends floats), `model` the name the client asked for."""
    if request.get("encoding_format") == "base64":
        for item in response.get("data") or []:
            if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                item["embedding"] = encode_base64(item["embedding"])
    response["model"] = request.get("model", response.get("model"))
    return response


def embedding_response(request: JSON, vectors: list[list[float]], prompt_tokens: int) -> JSON:
    """OpenAI's `list` of `embedding` objects, in the requested format."""
    response = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(vectors)
        ],
        "model": request.get("model", ""),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return in_format(response, request)


def answer(response: JSON) -> Chunk:
    """The one chunk of an embeddings answer."""
    return Chunk(finish_reason="stop", usage=response.get("usage"), response=response)
