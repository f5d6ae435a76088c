"""PostgreSQL for tests: a real server, one fresh database per test.

The server is `OBB_TEST_POSTGRES_URL` (default: postgres on 127.0.0.1:5432 with trust
auth, as on this project's machines); its user must be allowed to create databases.
Each test creates `obb_test_<random>` and drops it afterwards. Without a reachable
server the PostgreSQL tests are left out with one message at the end of the run
(conftest.py), except under CI (`CI` set), where they run and fail: there they must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
HOW_TO = (
    "start PostgreSQL on 127.0.0.1:5432 with trust auth for user postgres, or point "
    "OBB_TEST_POSTGRES_URL at a server whose user may create databases"
)


def admin_url() -> str:
    return os.environ.get("OBB_TEST_POSTGRES_URL", DEFAULT_URL)


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name`."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _problem(url: str) -> str | None:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def problem_with(url: str) -> str | None:
    """Why `url` cannot be used, or None; callable with or without a running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _problem(url)).result()


def require_postgres() -> str:
    """The admin URL; skips the test without PostgreSQL (fails under CI). Called once
    per session by conftest's `postgres` fixture (outside any event loop)."""
    url = admin_url()
    problem = problem_with(url)
    if problem is not None:
        message = f"PostgreSQL tests need a server at {url} ({problem}): {HOW_TO}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


async def create_database(admin: str) -> str:
    """Create a fresh database; returns its URL."""
    name = "obb_test_" + secrets.token_hex(6)
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin, name)


async def drop_database(admin: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    assert name.startswith("obb_test_"), name
    for attempt in range(30):  # PostgreSQL may be restarting (the chaos test)
        try:
            conn = await asyncpg.connect(admin, timeout=10)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()
            return
        except (OSError, asyncpg.PostgresError):
            if attempt == 29:
                raise
            await asyncio.sleep(1)


@contextlib.asynccontextmanager
async def temp_database(admin: str) -> AsyncIterator[str]:
    """A fresh database for one test (inside an event loop)."""
    url = await create_database(admin)
    try:
        yield url
    finally:
        await drop_database(admin, url)


@contextlib.contextmanager
def temp_database_sync(admin: str) -> Iterator[str]:
    """The same, for tests without an event loop (processes)."""
    url = asyncio.run(create_database(admin))
    try:
        yield url
    finally:
        asyncio.run(drop_database(admin, url))


def psql_value(url: str, sql: str) -> object:
    """One value of one query (a short connection of its own)."""

    async def run() -> object:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


# -- restarting the server (chaos tests) ------------------------------------------------


def cluster() -> tuple[str, str] | None:
    """(version, name) of the local Debian cluster we may restart, or None."""
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        return None
    if urlsplit(admin_url()).hostname not in ("127.0.0.1", "localhost"):
        return None
    versions = sorted(p.name for p in Path("/etc/postgresql").glob("*") if p.is_dir())
    return (versions[-1], "main") if versions else None


def pg_ctl(action: str, version: str, name: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def wait_postgres(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while problem_with(admin_url()) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"PostgreSQL did not come back within {timeout:g} s")
        time.sleep(0.2)


@contextlib.contextmanager
def postgres_left_running() -> Iterator[None]:
    """Whatever happens inside, PostgreSQL is running afterwards."""
    try:
        yield
    finally:
        found = cluster()
        if found is not None and problem_with(admin_url()) is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                pg_ctl("start", *found)
            wait_postgres()
