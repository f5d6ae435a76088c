"""Files that hold secrets or tenants' data, private to the user who runs the process,
whatever the umask: directories 0700, files 0600 (server.toml, node configs, key files,
SQLite databases with their -wal and -shm, backups)."""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, tighten: bool = False) -> Path:
    """Make `path` and any missing parents, each new one 0700. An existing directory is
    left as it is, unless `tighten` (a directory of ours, such as a data directory)."""
    missing = []
    here = path
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for new in reversed(missing):
        new.mkdir(mode=DIR_MODE, exist_ok=True)
        new.chmod(DIR_MODE)  # mkdir's mode is filtered by the umask
    if tighten and not missing and (path.stat().st_mode & 0o777) != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty if it is missing, and make it 0600 either way (before anything
    secret is written to it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, a file only its owner may read."""
    private_file(path)
    path.write_text(text)


def private_sqlite(path: Path) -> None:
    """Before SQLite opens `path`: the database file 0600 (SQLite gives its -wal and -shm
    the database's mode when it makes them), and those two 0600 if they are there."""
    private_dir(path.parent)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.chmod(FILE_MODE)


def secret_from_file_variable(var: str) -> str:
    """The secret in the file that `<var>_FILE` names (stripped), the `_FILE` convention of
    official images for Docker secrets; '' when that variable is not set. ValueError,
    with a message naming the variables (never the secret), when `var` is set too, or the
    file cannot be read or is empty."""
    path = os.environ.get(var + "_FILE")
    if not path:
        return ""
    if os.environ.get(var):
        raise ValueError(f"both {var} and {var}_FILE are set: give only one")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"{var}_FILE names {path}, which cannot be read: {why}") from None
    if not text:
        raise ValueError(f"{var}_FILE names {path}, which is empty")
    return text
