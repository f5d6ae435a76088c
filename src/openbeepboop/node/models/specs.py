"""What `models pull` accepts: `hf:ORG/REPO[@REVISION]/FILE`, an http(s) URL, or a path."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from openbeepboop.node.models.errors import PullError

SpecKind = Literal["hf", "url", "path"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. `canonical` names the same file however it was written (the hub's
    revision defaults to `main`, a path is made absolute); the cache keys on it."""

    kind: SpecKind
    canonical: str
    filename: str  # the file's own name: what the cached copy is called
    repo: str = ""  # hf: ORG/REPO
    revision: str = "main"  # hf: a branch, tag or commit
    repo_file: str = ""  # hf: the path inside the repo
    url: str = ""  # url: the address
    path: Path | None = None  # path: the local file

    @property
    def key(self) -> str:
        """A short stable hash of `canonical`: names the lock and the partial file."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()[:16]


def parse_spec(text: str) -> ModelSpec:
    """Parse a spec; a malformed one raises `PullError` saying what was expected.

    >>> parse_spec("hf:org/repo@v1/sub/m.gguf").canonical
    'hf:org/repo@v1/sub/m.gguf'
    """
    text = text.strip()
    if text.startswith("hf:"):
        return _hf(text)
    if text.startswith(("http://", "https://")):
        return _url(text)
    if "://" in text:
        raise PullError(f"{text!r}: only hf:, http:// and https:// sources are supported")
    if not text:
        raise PullError("empty model spec")
    path = Path(text).expanduser().resolve()
    return ModelSpec("path", str(path), path.name, path=path)


def _hf(text: str) -> ModelSpec:
    parts = text.removeprefix("hf:").strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise PullError(f"{text!r}: expected hf:ORG/REPO/FILE.gguf or hf:ORG/REPO@REVISION/FILE")
    org, repo_rev, *rest = parts
    repo, _, revision = repo_rev.partition("@")
    revision = revision or "main"
    if not repo:
        raise PullError(f"{text!r}: the repository name is empty")
    repo_file = "/".join(rest)
    return ModelSpec(
        "hf",
        f"hf:{org}/{repo}@{revision}/{repo_file}",
        PurePosixPath(repo_file).name,
        repo=f"{org}/{repo}",
        revision=revision,
        repo_file=repo_file,
    )


def _url(text: str) -> ModelSpec:
    split = urlsplit(text)
    name = PurePosixPath(unquote(split.path)).name
    if not split.hostname or not name:
        raise PullError(f"{text!r}: a URL must name a host and a file")
    return ModelSpec("url", text, name, url=text)
