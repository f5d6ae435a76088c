"""Retention, backups and bounded uploads, as an operator and a client see them.

Pruning on both stores through `openbeepboop-server prune [--dry-run]`; file expiry and
the per-key quota through the OpenAI SDK; a batch line longer than the limit refused by a
real server with its memory bounded; a backup taken under load and restored; SQLite's
free pages given back after pruning.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from openbeepboop.server.core.retention import Retention, RetentionConfig
from openbeepboop.server.http.state import app_state
from openbeepboop.server.models import NewJob, NodeResult
from openbeepboop.server.settings import load_settings
from openbeepboop.server.store.backup import BackupError, backup_sqlite, restore_sqlite
from openbeepboop.server.store.base import Store
from openbeepboop.server.store.factory import open_store
from openbeepboop.server.store.sqlite import SqliteStore
from tests.conftest import Api, ServerProcess, cli
from tests.pg import temp_database_sync

DAY = 86_400.0
RESULT = {"object": "chat.completion", "choices": [{"message": {"content": "ok"}}]}


def new_job(text: str = "hi", model: str = "echo", **kw: Any) -> NewJob:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return NewJob(
        owner="alice",
        endpoint="/v1/chat/completions",
        model=model,
        request=body,
        request_hash="h",
        **kw,
    )


async def make_history(
    store: Store, now: float, count: int, text: str = "hi", model: str = "echo"
) -> dict[str, int]:
    """`count` jobs submitted at `now`: finished (completed, failed, cancelled) at `now`
    and, as old, one still queued and one still running. Returns the number per status."""
    outcomes = await store.submit_jobs([new_job(text, model) for _ in range(count + 2)], now)
    ids = [o.job.id for o in outcomes]
    leased = await store.fetch_jobs("node-1", [model], count, 60.0, now)
    third = count // 3
    results = [NodeResult(j.id, j.lease_id, result=RESULT) for j in leased[: count - 2 * third]]
    results += [
        NodeResult(j.id, j.lease_id, error={"message": "no"}, retryable=False)
        for j in leased[count - 2 * third : count - third]
    ]
    await store.submit_results(results, now)
    for job in leased[count - third :]:
        await store.cancel_job(job.id, now)
    await store.fetch_jobs("node-1", [model], 1, 1e9, now)  # one of the last two: running
    statuses = [j.status.value for j in await store.get_jobs(ids)]
    return {s: statuses.count(s) for s in set(statuses)}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def data_dir(request: pytest.FixtureRequest, store: str, tmp_path: Path) -> Iterator[Path]:
    """A set-up data directory on `store`."""
    if store == "sqlite":
        cli("setup", "--non-interactive", "--data-dir", str(tmp_path), "--json")
        yield tmp_path
        return
    with temp_database_sync(request.getfixturevalue("postgres")) as url:
        cli("setup", "--non-interactive", "--data-dir", str(tmp_path), "--json",
            "--database-url", url)  # fmt: skip
        yield tmp_path


def on_store(data_dir: Path, fn: Callable[[Store], Any]) -> Any:
    async def run() -> Any:
        store = open_store(load_settings(data_dir))
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def test_prune_dry_run_counts_and_prune_deletes_only_old_final_jobs(data_dir: Path) -> None:
    now = time.time()
    old = on_store(data_dir, lambda s: make_history(s, now - 40 * DAY, 30))
    recent = on_store(data_dir, lambda s: make_history(s, now - DAY, 9, model="recent"))
    assert old == {"completed": 10, "failed": 10, "cancelled": 10, "queued": 1, "in_progress": 1}
    assert recent["completed"] == 3

    env = {"OPENBEEPBOOP_KEEP_CANCELLED_JOBS_SECONDS": str(2 * DAY)}
    args = ("--data-dir", str(data_dir), "--json")
    plan = cli("prune", "--dry-run", *args, env=env)
    expected = {"completed_jobs": 10, "failed_jobs": 10, "expired_jobs": 0, "cancelled_jobs": 10}
    assert plan == {"dry_run": True, **expected, "batches": 0, "files": 0}

    done = cli("prune", *args, env=env)
    assert {k: done[k] for k in expected} == expected
    kept = on_store(data_dir, lambda s: s.stats())
    # the recent ones stay (cancelled ones a day old too: kept two days), and so does
    # every job not final, however old
    assert kept["echo"] == {"queued": 1, "in_progress": 1}
    assert kept["recent"] == recent
    again = cli("prune", "--dry-run", *args)  # without the variable: cancelled kept 7 days
    assert again == {"dry_run": True, **dict.fromkeys(expected, 0), "batches": 0, "files": 0}


async def test_the_server_prunes_in_the_background(make_api: Callable[..., Any]) -> None:
    async with make_api(rate_limit="", prune_interval_seconds=0.2) as api:
        store = app_state(api.app).files.store
        await make_history(store, time.time() - 40 * DAY, 6)
        fresh = await api.submit()
        for _ in range(100):  # the pruner's first pass is 0.2 s after start
            await asyncio.sleep(0.1)
            if not (await store.stats())["echo"].get("completed"):
                break
        assert (await store.stats())["echo"] == {"queued": 2, "in_progress": 1}
        r = await api.http.get(f"/v1/jobs/{fresh['id']}", headers=api.h(api.client))
        assert r.status_code == 200


# -- files: expiry, quota, long lines ---------------------------------------------------


@contextlib.asynccontextmanager
async def sdk(api: Api, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/v1") as http:
        yield openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=http)


def batch_lines(count: int) -> bytes:
    return b"".join(batch_line(n) for n in range(count))


def batch_line(n: int) -> bytes:
    return (
        b'{"custom_id": "r%d", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}}\n' % n
    )


async def test_files_follow_expires_after_and_the_default_expiry(
    make_api: Callable[..., Any],
) -> None:
    async with make_api(rate_limit="", file_expiry_seconds=7200) as api, sdk(api, api.client) as c:
        kept = await c.files.create(
            file=("a.txt", b"x" * 10),
            purpose="user_data",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
        assert kept.expires_at == kept.created_at + 3600
        assert (await c.files.retrieve(kept.id)).expires_at == kept.expires_at
        default = await c.files.create(file=("b.txt", b"y"), purpose="user_data")
        assert default.expires_at == default.created_at + 7200
        batch = await c.files.create(file=("in.jsonl", batch_line(1)), purpose="batch")
        assert batch.expires_at is None  # kept while batches use it (keep_batches_seconds)
        for bad in ({"anchor": "last_active_at", "seconds": 3600}, {"anchor": "created_at",
                    "seconds": 60}):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as err:
                await c.files.create(file=("c.txt", b"z"), purpose="user_data", expires_after=bad)  # type: ignore[arg-type]
            assert err.value.status_code == 400
            assert str(err.value.body["param"]).startswith("expires_after.")  # type: ignore[index]

        store = app_state(api.app).files.store
        config = RetentionConfig(completed_seconds=DAY)
        later = Retention(store, config, clock=lambda: time.time() + 3601)
        assert (await later.plan())["files"] == 1
        assert (await later.prune())["files"] == 1
        with pytest.raises(openai.NotFoundError):
            await c.files.retrieve(kept.id)
        assert {f.id for f in (await c.files.list()).data} == {default.id, batch.id}
        assert await store.read_file_part(kept.id, 0) is None


async def test_the_file_quota_counts_every_file_of_a_key(make_api: Callable[..., Any]) -> None:
    async with (
        make_api(rate_limit="", file_quota_bytes=1000) as api,
        sdk(api, api.client) as mine,
        sdk(api, api.other_client) as theirs,
    ):
        first = await mine.files.create(file=("a.txt", b"a" * 600), purpose="user_data")
        with pytest.raises(openai.APIStatusError) as err:
            await mine.files.create(file=("b.txt", b"b" * 600), purpose="user_data")
        assert err.value.status_code == 413
        assert err.value.body["code"] == "file_quota_exceeded"  # type: ignore[index]
        assert "quota of 1000 bytes" in err.value.message
        assert [f.id for f in (await mine.files.list()).data] == [first.id]  # none kept
        await theirs.files.create(file=("b.txt", b"b" * 600), purpose="user_data")  # own
        await mine.files.delete(first.id)
        await mine.files.create(file=("b.txt", b"b" * 600), purpose="user_data")


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_long_batch_line_is_refused_while_streaming_with_memory_bounded(
    server_process: Callable[..., ServerProcess], request: pytest.FixtureRequest
) -> None:
    server = server_process(OPENBEEPBOOP_MAX_BATCH_LINE_BYTES=str(1 << 20))
    assert server.proc is not None
    key = server.keys["client_key"]
    client = openai.OpenAI(api_key=key, base_url=server.url + "/v1")
    request.addfinalizer(client.close)
    client.files.create(file=("ok.jsonl", batch_lines(50)), purpose="batch")  # warm
    before = peak_rss(server.proc.pid)
    line = b'{"custom_id": "' + b"x" * (48 << 20)  # 48 MiB, no newline
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("long.jsonl", line), purpose="batch")
    assert err.value.body["code"] == "line_too_long"  # type: ignore[index]
    assert "line 1: longer than the limit of 1048576 bytes" in err.value.message
    grew = peak_rss(server.proc.pid) - before
    assert grew < 24 << 20, f"the server grew by {grew >> 20} MiB for a 48 MiB line"
    # a long line after good ones is named by its number
    second = batch_line(1) + b"[" + b" " * (2 << 20) + b"]\n"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("two.jsonl", second), purpose="batch")
    assert "line 2: longer than the limit" in err.value.message
    assert client.files.list().data[0].filename == "ok.jsonl"


# -- backups ----------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class Load:
    """A thread submitting jobs as fast as one client can; each acknowledged id with
    the moment its answer arrived."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.acked: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": "echo", "messages": [{"role": "user", "content": "backup me"}]}
        headers = {"Authorization": f"Bearer {self.key}", "Prefer": "respond-async"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as http:
            while not self.stop.is_set():
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 202, r.text
                self.acked.append((time.monotonic(), r.json()["id"]))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def test_a_backup_taken_under_load_restores_every_job_acknowledged_before_it(
    server_process: Callable[..., ServerProcess], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = server_process()
    keys, data_dir = server.keys, server.data_dir
    client = openai.OpenAI(api_key=keys["client_key"], base_url=server.url + "/v1")
    request.addfinalizer(client.close)
    upload = client.files.create(file=("in.jsonl", batch_lines(3)), purpose="batch")
    dest = tmp_path / "backups" / "obb.db"
    with Load(server.url, keys["client_key"]) as load:
        while len(load.acked) < 150:
            time.sleep(0.01)
        began = time.monotonic()
        took = run_cli("backup", str(dest), "--data-dir", str(data_dir), "--json")
        assert took.returncode == 0, took.stderr
        ended = time.monotonic()
        while len(load.acked) < 300:  # the load goes on during and after the backup
            time.sleep(0.01)
    before = [job_id for at, job_id in load.acked if at < began]
    assert len(before) >= 150
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600

    with pytest.raises(BackupError, match="is in use"):  # the server runs on it
        restore_sqlite(dest, data_dir / "openbeepboop.db")
    server.kill(signal.SIGTERM)
    restored = run_cli("restore", str(dest), "--data-dir", str(data_dir), "--json")
    assert restored.returncode == 0, restored.stderr
    server.start()

    with httpx.Client(base_url=server.url, timeout=30) as http:
        headers = {"Authorization": f"Bearer {keys['client_key']}"}
        for job_id in before:
            r = http.get(f"/v1/jobs/{job_id}", headers=headers)
            assert r.status_code == 200, (job_id, r.text)
            assert r.json()["status"] == "queued"
    assert client.files.content(upload.id).content == batch_lines(3)
    assert any(began <= at < ended for at, _ in load.acked)  # the load went on meanwhile


def test_backup_and_restore_explain_what_they_cannot_do(tmp_path: Path) -> None:
    cli("setup", "--non-interactive", "--data-dir", str(tmp_path / "d"), "--json")
    not_db = tmp_path / "junk.db"
    not_db.write_bytes(b"not a database at all" * 100)
    out = run_cli("restore", str(not_db), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 1 and "not a usable SQLite database" in out.stderr
    with pytest.raises(BackupError, match="no backup at"):
        restore_sqlite(tmp_path / "none.db", tmp_path / "d" / "openbeepboop.db")
    db = tmp_path / "d" / "openbeepboop.db"
    backup_sqlite(db, tmp_path / "b.db")
    with pytest.raises(BackupError, match="exists; pass --force"):
        backup_sqlite(db, tmp_path / "b.db")
    backup_sqlite(db, tmp_path / "b.db", replace=True)
    pg = {**os.environ, "OPENBEEPBOOP_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}
    out = subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.server", "backup", str(tmp_path / "b.db"),
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, env=pg, check=False, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "pg_dump" in out.stderr


# -- SQLite space -------------------------------------------------------------------------


def pages(path: Path) -> tuple[int, int]:
    """(page_count, freelist_count) of a SQLite file."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA page_count").fetchone()[0], db.execute(
            "PRAGMA freelist_count"
        ).fetchone()[0]


async def fill_and_prune(store: SqliteStore, retention: Retention, text: str) -> None:
    await make_history(store, time.time() - 40 * DAY, 600, text)
    await retention.prune()


async def test_sqlite_gives_pruned_space_back(tmp_path: Path) -> None:
    config = RetentionConfig(DAY, DAY, DAY, DAY, batch_rows=300, share=1.0, pause_seconds=0)
    store = SqliteStore(tmp_path / "new.db")
    await store.open()
    try:
        big = "x" * 3000
        await make_history(store, time.time() - 40 * DAY, 600, big)
        full, _ = pages(store.path)
        counts = await Retention(store, config).prune()
        assert counts["completed_jobs"] + counts["failed_jobs"] + counts["cancelled_jobs"] == 600
        assert counts["pages_reclaimed"] > full // 2
        shrunk, free = pages(store.path)
        assert shrunk < full // 3 and free < 10
    finally:
        await store.close()


async def test_sqlite_made_before_incremental_vacuum_reuses_its_free_pages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "legacy.db"
    with contextlib.closing(sqlite3.connect(path)) as db:  # as older versions made them
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE legacy (x)")
    config = RetentionConfig(DAY, DAY, DAY, DAY, batch_rows=300, share=1.0, pause_seconds=0)
    store = SqliteStore(path)
    await store.open()
    try:
        retention = Retention(store, config)
        await fill_and_prune(store, retention, "x" * 3000)
        first, free = pages(path)
        assert free > first // 2  # not given back: free
        await fill_and_prune(store, retention, "x" * 3000)
        again, _ = pages(path)
        assert again < first * 1.1  # the second history went into the free pages
    finally:
        await store.close()
