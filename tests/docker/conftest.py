"""Fixtures of the container tests: an engine, and the images built once per run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docker.engine import HOW_TO, Engine, Images, build_images, missing, require_engine

HERE = Path(__file__).resolve().parent
ENGINE_ABSENT = pytest.StashKey[str]()


def _ours(item: pytest.Item) -> bool:
    return HERE in item.path.parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """No engine here and none to start: leave the container tests out with one message
    at the end (not one skip line per test). Under CI they stay in, and fail."""
    ours = [item for item in items if _ours(item)]
    if not ours or os.environ.get("CI"):
        return
    problem = missing()
    if problem is None:
        return
    config.stash[ENGINE_ABSENT] = (
        f"{len(ours)} container tests not run: they need a Docker engine ({problem}); "
        f"{HOW_TO} (docs/docker.md, Tests)"
    )
    config.hook.pytest_deselected(items=ours)
    items[:] = [item for item in items if not _ours(item)]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    note = config.stash.get(ENGINE_ABSENT, None)
    if note:
        terminalreporter.write_sep("-", "containers", yellow=True)
        terminalreporter.write_line(note, yellow=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing left to run because the engine is missing is not a failure of `make
    test-docker` outside CI (pytest would exit 5, "no tests collected")."""
    if session.config.stash.get(ENGINE_ABSENT, None) and exitstatus == 5:
        session.exitstatus = 0


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    found = require_engine(tmp_path_factory.mktemp("dockerd"))
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="session")
def images(engine: Engine) -> Images:
    return build_images()


@pytest.fixture
def keys() -> dict[str, str]:
    """A fresh key of each role, as an operator would put in compose/.env."""
    from openbeepboop.server.core.keys import new_key
    from openbeepboop.server.models import Role

    return {role.value: new_key(role).secret for role in (Role.ADMIN, Role.NODE, Role.CLIENT)}


@pytest.fixture(scope="session")
def repo() -> Path:
    return Path(__file__).resolve().parents[2]
