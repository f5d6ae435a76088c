"""Backups of a SQLite database, taken while the server runs, and putting one back.

`backup_sqlite` copies the database with SQLite's online backup API in a single step:
one read transaction, so the copy is the database as of one moment (every write
acknowledged before the copy began is in it), and in WAL mode the server keeps writing
meanwhile. Uploaded files live in the database (their bytes in `file_parts`), so the one
file holds everything but `server.toml`. The copy is written beside its destination
with mode 0600 and renamed into place once it is whole and checked.

`restore_sqlite` writes a backup over the database, and refuses while any process
(a running server) has that database open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

PRIVATE = 0o600


class BackupError(Exception):
    """A backup or restore cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class BackupReport:
    """What a backup or restore copied."""

    source: str
    target: str
    bytes: int
    jobs: int
    files: int


def backup_sqlite(source: Path, dest: Path, replace: bool = False) -> BackupReport:
    """Copy the live database `source` to `dest` (mode 0600)."""
    if not source.is_file():
        raise BackupError(f"no SQLite database at {source}")
    if dest.exists() and not replace:
        raise BackupError(f"{dest} exists; pass --force to replace it")
    if dest.resolve() == source.resolve():
        raise BackupError("the backup cannot be the database itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    _create_private(tmp)
    try:
        with (
            contextlib.closing(_open(source, timeout=30)) as src,
            contextlib.closing(_open(tmp)) as out,
        ):
            src.backup(out)  # pages=-1: one step, one snapshot
            out.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
            _check(out, tmp)
            jobs, files = _counts(out)
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BackupReport(str(source), str(dest), dest.stat().st_size, jobs, files)


def restore_sqlite(backup: Path, target: Path) -> BackupReport:
    """Write the backup `backup` over the database `target` (made if missing), unless a
    process has `target` open."""
    if not backup.is_file():
        raise BackupError(f"no backup at {backup}")
    with contextlib.closing(_open(backup, timeout=30)) as src:
        _check(src, backup)
        if not _is_ours(src):
            raise BackupError(f"{backup} is not an OpenBeepBoop database")
        if target.exists():
            _claim(target)
        else:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_private(target)
        with contextlib.closing(_open(target)) as out:
            src.backup(out)
            out.execute("PRAGMA journal_mode = DELETE")
            _check(out, target)
            jobs, files = _counts(out)
    os.chmod(target, PRIVATE)
    _fsync(target)
    return BackupReport(str(backup), str(target), target.stat().st_size, jobs, files)


def _claim(target: Path) -> None:
    """Refuse when another connection has `target` open: leaving WAL mode needs the
    database to itself, and a running server always holds connections to it."""
    with contextlib.closing(_open(target, timeout=0)) as conn:
        try:
            conn.execute("PRAGMA journal_mode = DELETE").fetchall()
        except sqlite3.OperationalError as exc:
            raise BackupError(
                f"{target} is in use (is the server running?); stop it, then restore ({exc})"
            ) from exc


def _open(path: Path, timeout: float = 30) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, timeout=timeout)


def _create_private(path: Path) -> None:
    """An empty file that only its owner may read (SQLite takes it as a new database)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, PRIVATE)
    os.close(fd)
    os.chmod(path, PRIVATE)  # the umask may have taken bits off; never added any


def _check(conn: sqlite3.Connection, path: Path) -> None:
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a usable SQLite database: {exc}") from exc
    if verdict != "ok":
        raise BackupError(f"{path} failed its integrity check: {verdict}")


def _is_ours(conn: sqlite3.Connection) -> bool:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"schema_migrations", "jobs", "api_keys"} <= names


def _counts(conn: sqlite3.Connection) -> tuple[int, int]:
    if not _is_ours(conn):
        return 0, 0
    jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    files = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    return int(jobs), int(files)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
