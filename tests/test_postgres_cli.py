"""`openbeepboop-server` with PostgreSQL: setup creates the database, bad URLs are one
clear line, and `migrate-db` copies a SQLite database into PostgreSQL, ids and all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openbeepboop.server.core.keys import new_key
from openbeepboop.server.models import (
    Batch,
    BatchStatus,
    JobFilter,
    NewJob,
    Node,
    NodeResult,
    Role,
    StoredFile,
    Template,
)
from openbeepboop.server.store.base import Store
from openbeepboop.server.store.migrations import load_migrations
from openbeepboop.server.store.postgres import PostgresStore
from openbeepboop.server.store.sqlite import SqliteStore
from tests.conftest import cli
from tests.pg import drop_database, temp_database_sync, with_database

T0 = 1_000_000.0


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


@pytest.fixture
def database(postgres: str) -> Iterator[str]:
    with temp_database_sync(postgres) as url:
        yield url


def test_setup_creates_the_database_and_writes_the_url(postgres: str, tmp_path: Path) -> None:
    url = with_database(postgres, "obb_test_setup_" + os.urandom(4).hex())
    try:
        out = cli("setup", "--non-interactive", "--data-dir", str(tmp_path), "--json",
                  "--database-url", url)  # fmt: skip
        assert out["database_created"] is True and out["migrations_applied"] == [
            m.version for m in load_migrations("postgres")
        ]
        assert out["database"] == url and out["admin_key"].startswith("obb_admin_")
        assert tomllib.loads((tmp_path / "server.toml").read_text())["database_url"] == url
        again = cli("setup", "--non-interactive", "--data-dir", str(tmp_path), "--json")
        assert (again["database_created"], again["migrations_applied"]) == (False, [])
        listed = cli("keys", "list", "--data-dir", str(tmp_path), "--json")
        assert len(listed) == 6  # three keys per setup, all in PostgreSQL
    finally:
        asyncio.run(drop_database(postgres, url))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://postgres:s3cret@127.0.0.1:1/obb", "Connect call failed"),
        ("postgresql://nobody:s3cret@127.0.0.1:5432/obb", 'role "nobody" does not exist'),
        ("postgresql://u:s3cret@[::1/obb", "not a valid URL"),
        ("mysql://u:s3cret@host/db", "use sqlite:///PATH or postgresql://"),
    ],
)
def test_a_bad_database_url_is_one_clear_error(
    postgres: str, tmp_path: Path, url: str, says: str
) -> None:
    setup = run("setup", "--non-interactive", "--data-dir", str(tmp_path), "--database-url", url)
    start = run("start", "--data-dir", str(tmp_path), OPENBEEPBOOP_DATABASE_URL=url)
    for done in (setup, start):
        assert done.returncode != 0
        assert says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "s3cret" not in done.stderr
    assert not (tmp_path / "server.toml").exists()  # nothing written for a bad URL


# -- migrate-db ---------------------------------------------------------------------------


async def fill(store: Store) -> dict[str, Any]:
    """Something of every kind, in a few states."""
    keys = [new_key(role, "k", now=T0) for role in (Role.ADMIN, Role.CLIENT, Role.NODE)]
    for issued in keys:
        await store.create_key(issued.record)
    await store.revoke_key(keys[2].record.id, T0 + 1)
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo"}]}
    jobs = [
        NewJob("alice", "/v1/chat/completions", "m", body, f"h{i}", priority=i % 3,
               metadata={"i": i}, idempotency_key=f"k{i}", batch_id="batch_1" if i < 3 else None)
        for i in range(25)
    ]  # fmt: skip
    ids = [o.job.id for o in await store.submit_jobs(jobs, T0)]
    leased = await store.fetch_jobs("node_1", ["m"], 5, 60, T0 + 2)
    result = {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}
    await store.submit_results([NodeResult(leased[0].id, leased[0].lease_id or "", result)], T0)
    await store.cancel_job(ids[-1], T0 + 3)
    await store.register_node(
        Node("node_1", "box", keys[2].record.id, [{"name": "m"}], 2, {"gpu": 0}, "1", T0, T0)
    )
    await store.put_file_part("file_1", 0, bytes(range(256)) * 5000)
    await store.put_file_part("file_1", 1, b"tail")
    await store.create_file(StoredFile("file_1", "alice", "batch", "in.jsonl", 9, T0, lines=3))
    batch = Batch("batch_1", "alice", "/v1/chat/completions", "file_1", "24h",
                  BatchStatus.IN_PROGRESS, T0, T0 + 86400, metadata={"x": "y"})  # fmt: skip
    await store.create_batch(batch)
    await store.put_template(Template("alice", "helper", [{"provider": "p"}], T0, T0, "d"))
    return {"ids": ids}


async def snapshot(store: Store, ids: list[str]) -> dict[str, Any]:
    jobs = {j.id: j for j in await store.get_jobs(ids)}
    return {
        "jobs": [jobs[i] for i in ids],
        "listed": [j.id for j in await store.list_jobs(JobFilter(limit=100))],
        "keys": await store.list_keys(),
        "nodes": await store.list_nodes(0),
        "file": await store.get_file("file_1"),
        "parts": [await store.read_file_part("file_1", i) for i in range(3)],
        "batch": await store.get_batch("batch_1"),
        "templates": await store.list_templates(None),
        "stats": await store.stats(),
    }


def test_migrate_db_copies_everything_and_keeps_ids(database: str, tmp_path: Path) -> None:
    cli("setup", "--non-interactive", "--data-dir", str(tmp_path), "--json")  # SQLite
    lite = SqliteStore(tmp_path / "openbeepboop.db")

    async def before() -> dict[str, Any]:
        await lite.open()
        try:
            ids = (await fill(lite))["ids"]
            return {"ids": ids, **await snapshot(lite, ids)}
        finally:
            await lite.close()

    want = asyncio.run(before())
    out = cli("migrate-db", "--data-dir", str(tmp_path), "--to", database, "--json")
    assert out["tables"]["jobs"] == 25 and out["tables"]["api_keys"] == 6
    assert out["tables"]["file_parts"] == 2 and out["replaced"] is False

    async def after() -> tuple[dict[str, Any], int]:
        store = PostgresStore(database)
        await store.open()
        try:
            got = await snapshot(store, want["ids"])
            body = {"model": "m", "messages": []}
            [new] = await store.submit_jobs([NewJob("bob", "/v1/completions", "m", body, "x")], T0)
            return got, new.job.seq
        finally:
            await store.close()

    got, next_seq = asyncio.run(after())
    assert got == {k: v for k, v in want.items() if k != "ids"}
    assert next_seq > max(j.seq for j in got["jobs"])  # the sequences go on after the copy

    refused = run("migrate-db", "--data-dir", str(tmp_path), "--to", database)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert "Traceback" not in refused.stderr
    again = cli("migrate-db", "--data-dir", str(tmp_path), "--to", database, "--replace", "--json")
    assert again["replaced"] is True and again["rows"] == out["rows"]
