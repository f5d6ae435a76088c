"""Threads that own SQLite connections for an asyncio program.

`GroupCommitWriter` is the one writer: operations queued from any event loop are run in
batches, one transaction per batch (`synchronous=FULL`, so one fsync per batch), each
operation inside its own savepoint so that one failure does not undo the others. Every
caller is answered only after COMMIT has returned: an acknowledged write is on disk.

A write that acknowledges nothing to anyone (a lease, a heartbeat, the job of a
synchronous call whose caller has no id yet) may be queued with `durable=False`: a batch
made only of those commits without waiting for the disk (`synchronous=NORMAL`). It is
safe from a crash of the process at once, and from a power loss at the next durable
commit: in WAL mode that fsync covers every frame written before it.

`ReaderPool` runs reads on a few read-only connections; WAL lets them read while the
writer writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
_Item = tuple[Op, "asyncio.Future[Any]", asyncio.AbstractEventLoop, bool]

MAX_BATCH = 512


def connect(path: Path, *, readonly: bool = False, synchronous: str = "FULL") -> sqlite3.Connection:
    """An autocommit connection in WAL mode; `synchronous=FULL` makes commits durable."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        # takes effect only on a file without tables yet (before WAL writes its header):
        # space freed by pruning can then be given back (SqliteStore.reclaim_space)
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class GroupCommitWriter:
    """The single writer thread (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        synchronous: str = "FULL",
        prepare: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        self._path = path
        self._synchronous = synchronous
        self._prepare = prepare  # run once on the new connection, before any operation
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.batches = 0
        self.ops = 0
        self.synced = 0  # batches committed with an fsync
        self._mode = synchronous  # the connection's current setting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Finish queued operations, then close."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def run(self, op: Callable[[sqlite3.Connection], T], durable: bool = True) -> asyncio.Future[T]:
        """Queue `op` for the next batch; the future resolves after its COMMIT (with
        `durable`, the default, after the fsync too)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((op, fut, loop, durable))
        return fut

    def _run(self) -> None:
        try:
            conn = connect(self._path, synchronous=self._synchronous)
            if self._prepare is not None:
                self._prepare(conn)
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = self._drain(batch)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _drain(self, batch: list[_Item]) -> bool:
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        answers: list[tuple[asyncio.Future[Any], asyncio.AbstractEventLoop, Any, Any]] = []
        sync = self._synchronous == "FULL" and any(item[3] for item in batch)
        try:
            mode = "FULL" if sync else "NORMAL"
            if self._synchronous == "FULL" and mode != self._mode:
                conn.execute(f"PRAGMA synchronous = {mode}")
                self._mode = mode
            conn.execute("BEGIN IMMEDIATE")
            for op, fut, loop, _durable in batch:
                answers.append((fut, loop, *_in_savepoint(conn, op)))
            conn.execute("COMMIT")
        except BaseException as exc:  # the transaction is gone: every caller hears why
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            answers = [(fut, loop, None, exc) for _op, fut, loop, _durable in batch]
        self.batches += 1
        self.synced += sync
        self.ops += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for fut, loop, value, error in answers:
            by_loop.setdefault(loop, []).append((fut, value, error))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                loop.call_soon_threadsafe(_resolve_all, items)


def _in_savepoint(conn: sqlite3.Connection, op: Op) -> tuple[Any, BaseException | None]:
    conn.execute("SAVEPOINT op")
    try:
        value = op(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return None, exc
    conn.execute("RELEASE op")
    return value, None


def _resolve_all(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, error in items:
        if fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)


class ReaderPool:
    """A few threads, each with its own read-only connection."""

    def __init__(self, path: Path, size: int = 2) -> None:
        self._path = path
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="sqlite-reader")

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, op)

    def _call(self, op: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, readonly=True)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return op(conn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
