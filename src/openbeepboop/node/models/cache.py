"""The cache directory: finished files, partial downloads, locks and `index.json`.

<root>/index.json                        name -> spec, file, size, sha256, pulled_at
<root>/<name>                            a finished, verified file
<root>/.partial/<key>-<sha>-<file>.part  a download in progress (resumed by the next pull)
<root>/.locks/<key>.lock                 held by the one process pulling that spec
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs

from openbeepboop.node.models.errors import PullError
from openbeepboop.node.models.locks import file_lock
from openbeepboop.node.models.specs import ModelSpec, parse_spec

INDEX = "index.json"
ENV_VAR = "OPENBEEPBOOP_MODELS_DIR"


def default_models_dir() -> Path:
    """`$OPENBEEPBOOP_MODELS_DIR`, else the user's cache dir (e.g. ~/.cache/openbeepboop/models
    on Linux, ~/Library/Caches/openbeepboop/models on macOS): the node's default too."""
    if env := os.environ.get(ENV_VAR):
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("openbeepboop", appauthor=False)) / "models"


@dataclass(frozen=True)
class CachedModel:
    """One finished file in the cache and where it came from."""

    name: str  # the file's name in the cache; what `models rm` takes
    spec: str  # the spec as canonicalised (hf:ORG/REPO@REV/FILE, the URL, the absolute path)
    path: Path
    size: int
    sha256: str
    pulled_at: float  # unix time
    source: str  # "hf", "url", "path (linked)" or "path (copied)"

    def to_json(self) -> dict[str, Any]:
        """The entry as `models list --json` prints it."""
        return {**asdict(self), "path": str(self.path)}


class ModelCache:
    """A cache directory shared by every node (and every `models pull`) on the machine."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading ---------------------------------------------------------------------

    def entries(self) -> list[CachedModel]:
        """Every recorded model, by name."""
        return [self._entry(name, rec) for name, rec in sorted(self._read().items())]

    def find(self, name_or_spec: str) -> CachedModel | None:
        """The entry with this name, or pulled from this spec (as written or canonical)."""
        entries = {e.name: e for e in self.entries()}
        name = _pick({n: e.spec for n, e in entries.items()}, name_or_spec)
        return entries.get(name) if name else None

    def find_spec(self, spec: ModelSpec) -> CachedModel | None:
        """The finished entry for `spec`, if its file is still there."""
        for entry in self.entries():
            if entry.spec == spec.canonical and entry.path.is_file():
                return entry
        return None

    # -- writing ---------------------------------------------------------------------

    def lock(
        self, spec: ModelSpec, on_wait: Callable[[], None] | None = None
    ) -> AbstractContextManager[None]:
        """The lock one process holds while it pulls `spec`."""
        return file_lock(self.root / ".locks" / f"{spec.key}.lock", on_wait)

    def partial_path(self, spec: ModelSpec, sha256: str | None) -> Path:
        """Where `spec`'s download grows, by the sha256 its source announces (the hub's);
        a partial of the same spec for another one (an older revision) is deleted. Call
        with the spec's lock held."""
        tag = (sha256 or "nosha")[:12]
        folder = self.root / ".partial"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{spec.key}-{tag}-{spec.filename}.part"
        for stale in folder.glob(f"{spec.key}-*.part"):
            if stale != path:
                stale.unlink(missing_ok=True)
        return path

    def add(self, spec: ModelSpec, file: Path, sha256: str, source: str) -> CachedModel:
        """Move `file` (a verified partial in this cache) in under a free name, and record
        it. A different spec's file of the same name keeps its name: this one gets a
        suffix."""
        with self._index_lock():
            index = self._read()
            name = self._free_name(spec, index)
            target = self.root / name
            os.replace(file, target)
            rec = {
                "spec": spec.canonical,
                "size": target.stat().st_size,
                "sha256": sha256,
                "pulled_at": time.time(),
                "source": source,
            }
            index[name] = rec
            self._write(index)
        return self._entry(name, rec)

    def remove(self, name_or_spec: str) -> CachedModel:
        """Delete a model's file and its record; an unknown name raises `PullError`."""
        with self._index_lock():
            index = self._read()
            name = _pick({n: r["spec"] for n, r in index.items()}, name_or_spec)
            if name is None:
                raise PullError(f"no model {name_or_spec!r} in {self.root} (see `models list`)")
            entry = self._entry(name, index[name])
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as exc:
                raise PullError(f"cannot delete {entry.path}: {exc}") from exc
            del index[entry.name]
            self._write(index)
        return entry

    # -- the index -------------------------------------------------------------------

    def _free_name(self, spec: ModelSpec, index: dict[str, Any]) -> str:
        for name, rec in index.items():
            if rec["spec"] == spec.canonical:
                return name
        name = spec.filename
        if name in index or (self.root / name).exists() or name == INDEX:
            stem, dot, suffix = name.rpartition(".")
            name = f"{stem}-{spec.key[:8]}{dot}{suffix}" if dot else f"{name}-{spec.key[:8]}"
        return name

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        with file_lock(self.root / ".locks" / "index.lock"):
            yield

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / INDEX).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PullError(f"cannot read {self.root / INDEX}: {exc}") from exc
        return dict(data.get("models", {}))

    def _write(self, index: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "models": index}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the index from other users' nodes
        os.replace(tmp, self.root / INDEX)

    def _entry(self, name: str, rec: dict[str, Any]) -> CachedModel:
        return CachedModel(
            name=name,
            spec=str(rec["spec"]),
            path=self.root / name,
            size=int(rec["size"]),
            sha256=str(rec["sha256"]),
            pulled_at=float(rec["pulled_at"]),
            source=str(rec.get("source", "")),
        )


def _pick(specs: dict[str, str], text: str) -> str | None:
    """The name `text` means among `specs` (name -> spec): a name, else a spec as written,
    else the spec it parses to (`hf:o/r/f.gguf` is `hf:o/r@main/f.gguf`)."""
    if text in specs:
        return text
    for wanted in (text, _canonical(text)):
        for name, spec in specs.items():
            if spec == wanted:
                return name
    return None


def _canonical(text: str) -> str | None:
    try:
        return parse_spec(text).canonical
    except PullError:
        return None
