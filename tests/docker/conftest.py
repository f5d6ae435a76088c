"""Fixtures of the container tests: an engine, and the images built once per run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker.engine import Engine, Images, build_images, require_engine


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
