"""`pip wheel .` gives a wheel that installs into a clean venv and runs: its package data
(every migration, every asset) is inside, its console scripts work from any directory, and
its version is the one in `openbeepboop/__init__.py`.

Offline: the wheel is built without build isolation (with this environment's setuptools),
and the fresh venv borrows this environment's dependencies through a `.pth` line, so the
project itself can come only from the wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from contextlib import closing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "openbeepboop"
pytestmark = pytest.mark.slow
# quiet; every install and build below also passes --no-index: nothing is fetched
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def source_version() -> str:
    found = re.search(r'^__version__ = "([^"]+)"', (PACKAGE / "__init__.py").read_text(), re.M)
    assert found, "openbeepboop/__init__.py sets no __version__"
    return found.group(1)


def build_wheel(tmp: Path) -> Path:
    """`pip wheel .` on a copy of the sources (so no build/ or egg-info lands in the tree)."""
    source = tmp / "source"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT / "src", source / "src", ignore=junk)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp / "wheels"
    subprocess.run(
        [
            *PIP,
            "wheel",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        cwd=tmp,
    )
    (wheel,) = out.glob("openbeepboop-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv holding only the wheel, that sees this environment's site-packages after its
    own (a plain path in a .pth: the editable install's finder there stays inactive)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(own) / "test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-index", "--no-deps", str(wheel)],
        check=True,
    )
    return venv


def test_the_wheel_installs_into_a_clean_venv_and_runs(tmp_path: Path) -> None:
    version = source_version()
    wheel = build_wheel(tmp_path)
    assert wheel.name == f"openbeepboop-{version}-py3-none-any.whl"

    # every file of the package that is not Python is package data, and in the wheel
    assets = {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    migrations = {p.name for p in PACKAGE.rglob("migrations/sqlite/*.sql")}
    assert migrations and "openbeepboop/py.typed" in assets
    with zipfile.ZipFile(wheel) as whl:
        assert assets <= set(whl.namelist()), assets - set(whl.namelist())

    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # not the repo: nothing may come from the sources
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBEEPBOOP_", "PYTHON"))}
    env["HOME"] = str(tmp_path / "home")

    probe = "import openbeepboop as o; print(o.__version__, o.__file__)"
    shown = subprocess.run(
        [venv / "bin" / "python", "-c", probe],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert shown[0] == version
    assert Path(shown[1]).is_relative_to(venv), f"openbeepboop imported from {shown[1]}"

    data = tmp_path / "data"
    server = venv / "bin" / "openbeepboop-server"
    setup = subprocess.run(
        [server, "setup", "--non-interactive", "--data-dir", str(data), "--json"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    out = json.loads(setup.stdout)
    expected = sorted(int(name.partition("_")[0]) for name in migrations)
    assert out["migrations_applied"] == expected
    with closing(sqlite3.connect(out["database"])) as db:
        recorded = [row[0] for row in db.execute("SELECT version FROM schema_migrations")]
    assert sorted(recorded) == expected
