"""One HTTP download into a partial file: resumed with `Range`, hashed as it is written,
checked against the free disk before the first byte."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx

from openbeepboop.node.models.errors import PullError

Progress = Callable[[int, int | None], None]  # (bytes done, total or None when unknown)
CHUNK = 1 << 20
RESERVE = 256 << 20  # what a pull leaves free on the disk beyond the file itself


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    """The hex sha256 of a file, read in chunks (with progress, when given)."""
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def check_disk(folder: Path, needed: int, reserve: int = RESERVE) -> None:
    """Raise `PullError` unless `folder`'s disk has `needed` + `reserve` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed + reserve:
        raise PullError(
            f"not enough disk space in {folder}: {_mib(needed)} to download, {_mib(free)} free "
            f"(a pull keeps {_mib(reserve)} spare)"
        )


def download(
    url: str,
    part: Path,
    *,
    size: int | None,
    headers: dict[str, str],
    progress: Progress | None = None,
    reserve: int = RESERVE,
) -> str:
    """Append `url`'s remaining bytes to `part` and return the whole file's sha256. A
    server that ignores `Range` (200, not 206) is read from the start again. An
    interrupted transfer raises `PullError`; `part` stays for the next call to resume."""
    done = part.stat().st_size if part.exists() else 0
    if size is not None and done > size:
        part.unlink()
        done = 0
    digest = _hash_prefix(part, done)
    if size is not None and done == size:  # finished, but not moved into place yet
        if progress is not None:
            progress(done, size)
        return digest.hexdigest()
    request = {**headers, "Accept-Encoding": "identity"}
    if done:
        request["Range"] = f"bytes={done}-"
    timeout = httpx.Timeout(30, read=120)
    try:
        with (
            httpx.Client(follow_redirects=True, timeout=timeout) as http,
            http.stream("GET", url, headers=request) as r,
        ):
            if r.status_code == 416 and done:
                return _past_the_end(url, part, done, r, digest, progress)
            if r.status_code not in (200, 206):
                raise PullError(f"{url}: HTTP {r.status_code} {r.reason_phrase}")
            if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(
                f"bytes {done}-"
            ):
                raise PullError(f"{url}: asked for bytes {done}- and got another range")
            if r.status_code == 200 and done:
                done, digest = 0, hashlib.sha256()  # no Range support: start over
            length = r.headers.get("Content-Length")
            total = size if size is not None else (done + int(length) if length else None)
            check_disk(part.parent, (total or done) - done, reserve)
            done = _write(r, part, done, total, digest, progress)
    except httpx.HTTPError as exc:
        kept = part.stat().st_size if part.exists() else 0
        resume = f"; {_mib(kept)} kept, pull again to resume" if kept else ""
        raise PullError(f"{url}: {_describe(exc)}{resume}") from exc
    if total is not None and done != total:
        raise PullError(
            f"{url}: the transfer stopped at {done} of {total} bytes; pull again to resume"
        )
    return digest.hexdigest()


def _past_the_end(
    url: str,
    part: Path,
    done: int,
    r: httpx.Response,
    digest: hashlib._Hash,
    progress: Progress | None,
) -> str:
    """416 to `Range: bytes=done-`: the partial holds the whole file when the server's
    size (`Content-Range: bytes */SIZE`) is `done`; else the file changed: start over."""
    if r.headers.get("Content-Range", "") == f"bytes */{done}":
        if progress is not None:
            progress(done, done)
        return digest.hexdigest()
    part.unlink(missing_ok=True)
    raise PullError(f"{url}: the file changed since the partial download; pull again")


def _write(
    r: httpx.Response,
    part: Path,
    done: int,
    total: int | None,
    digest: hashlib._Hash,
    progress: Progress | None,
) -> int:
    if progress is not None:
        progress(done, total)
    with part.open("ab" if done else "wb") as f:
        for chunk in r.iter_bytes():  # as they arrive: fine-grained progress
            f.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return done


def _hash_prefix(part: Path, length: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    if length:
        with part.open("rb") as f:
            while chunk := f.read(min(CHUNK, length)):
                digest.update(chunk)
                length -= len(chunk)
    return digest


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"the transfer was interrupted ({type(exc).__name__}: {exc})"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
