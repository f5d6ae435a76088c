"""`pull_model`: a spec in, a verified file in the cache out (the engine of `models pull`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from openbeepboop.node.models.cache import CachedModel, ModelCache
from openbeepboop.node.models.download import RESERVE, Progress, check_disk, download, sha256_of
from openbeepboop.node.models.errors import PullError
from openbeepboop.node.models.sources import SHA256, resolve
from openbeepboop.node.models.specs import ModelSpec, parse_spec

__all__ = ["Progress", "pull_model"]


def pull_model(
    spec_text: str,
    cache: ModelCache,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    on_wait: Callable[[], None] | None = None,
    reserve: int = RESERVE,
) -> CachedModel:
    """Fetch `spec_text` into `cache` unless it is there already, and return its entry.

    `sha256` (hex) is checked as well as the hub's; a mismatch deletes the download.
    `progress(bytes_done, total)` is called as bytes arrive (monotonic; `total` is None
    when the source does not say). When another process is pulling the same spec,
    `on_wait()` is called once and this call waits for it, then finds the file. Every
    failure raises `PullError` with one line; an interrupted download stays as a partial
    file that the next call resumes; so does an exception raised by `progress` (a way to
    cancel), which propagates as it is. Blocking: from async code use
    `asyncio.to_thread` (then `progress` runs in that thread).
    """
    spec = parse_spec(spec_text)
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not SHA256.fullmatch(expected):
        raise PullError(f"--sha256 {sha256!r}: expected 64 hex digits")
    try:
        return _pull(spec, cache, expected, progress, on_wait, reserve)
    except OSError as exc:  # a full disk, a read-only cache, a permission
        raise PullError(f"{spec.canonical}: {exc}") from exc


def _pull(
    spec: ModelSpec,
    cache: ModelCache,
    expected: str | None,
    progress: Progress | None,
    on_wait: Callable[[], None] | None,
    reserve: int,
) -> CachedModel:
    if (hit := cache.find_spec(spec)) is not None:
        return _checked(hit, expected)
    cache.root.mkdir(parents=True, exist_ok=True)
    if spec.kind == "path":
        with cache.lock(spec, on_wait):
            if (hit := cache.find_spec(spec)) is not None:
                return _checked(hit, expected)
            return _import_local(spec, cache, expected, progress)
    remote = resolve(spec)
    if expected and remote.sha256 and expected != remote.sha256:
        raise PullError(f"{spec.canonical}: the hub says sha256 {remote.sha256}, not {expected}")
    expected = expected or remote.sha256
    with cache.lock(spec, on_wait):
        if (hit := cache.find_spec(spec)) is not None:
            return _checked(hit, expected)
        part = cache.partial_path(spec, remote.sha256)  # what the source serves, not a flag
        digest = download(
            remote.url,
            part,
            size=remote.size,
            headers=remote.headers,
            progress=progress,
            reserve=reserve,
        )
        _verify(spec, part, digest, expected)
        return cache.add(spec, part, digest, spec.kind)


def _checked(entry: CachedModel, expected: str | None) -> CachedModel:
    if expected and entry.sha256 != expected:
        raise PullError(
            f"{entry.name} is cached with sha256 {entry.sha256}, not {expected} "
            f"(`models rm {entry.name}` first to pull it again)"
        )
    return entry


def _verify(spec: ModelSpec, file: Path, digest: str, expected: str | None) -> None:
    if expected and digest != expected:
        file.unlink(missing_ok=True)
        raise PullError(
            f"{spec.canonical}: checksum mismatch: expected sha256 {expected}, got {digest}; "
            "the download was deleted"
        )


def _import_local(
    spec: ModelSpec, cache: ModelCache, expected: str | None, progress: Progress | None
) -> CachedModel:
    """Hard-link a local file into the cache (same filesystem), else copy it."""
    source = spec.path
    assert source is not None
    if not source.is_file():
        raise PullError(f"{source}: no such file")
    part = cache.partial_path(spec, None)
    part.unlink(missing_ok=True)
    try:
        os.link(source, part)
        how = "path (linked)"
    except OSError:
        check_disk(cache.root, source.stat().st_size)
        shutil.copyfile(source, part)
        how = "path (copied)"
    digest = sha256_of(part, progress)
    _verify(spec, part, digest, expected)
    return cache.add(spec, part, digest, how)
