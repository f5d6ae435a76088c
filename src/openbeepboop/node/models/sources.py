"""Where a remote spec's bytes are and what they should hash to: the hub's metadata (through
huggingface_hub, so HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE apply), or a plain URL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from openbeepboop.node.models.errors import PullError
from openbeepboop.node.models.specs import ModelSpec

SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Remote:
    """A download: the address, its size and sha256 when the source says, request headers."""

    url: str
    size: int | None = None
    sha256: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def resolve(spec: ModelSpec) -> Remote:
    """The download for an `hf` or `url` spec; the hub is asked for the file's metadata."""
    if spec.kind == "url":
        return Remote(spec.url)
    return _hub(spec)


def _hub(spec: ModelSpec) -> Remote:
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
    except ImportError as exc:
        raise PullError(
            "hf: specs need huggingface_hub: pip install 'openbeepboop[local]'"
        ) from exc
    url = hf_hub_url(spec.repo, spec.repo_file, revision=spec.revision)
    try:
        meta = get_hf_file_metadata(url)
        headers = build_hf_headers()
    except Exception as exc:  # offline mode, 404, gated, no network: one line each
        raise PullError(f"{spec.canonical}: {_first_line(exc)}") from exc
    etag = (meta.etag or "").lower()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a CDN's signed URL: the token stays with the hub
        headers.pop("Authorization", None)
    return Remote(
        meta.location,
        size=meta.size,
        sha256=etag if SHA256.fullmatch(etag) else None,  # an LFS file's etag is its sha256
        headers=headers,
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
