"""Copy a SQLite database into PostgreSQL (`openbeepboop-server migrate-db`).

Both schemas are brought to the newest migration first (they share migration numbers),
then every table the PostgreSQL schema has is copied row for row — jobs, keys, nodes,
files and their parts, batches, and whatever later migrations add — keeping ids and
`seq` numbers, so job ids, cursors and keys stay valid. Identity sequences then continue
after the copied rows. The job counters (`job_counts`) are not copied: the target's
triggers count the jobs as they arrive.

Streaming: the SQLite side is read in pages (by rowid, inside one read transaction, so
the copy is one consistent snapshot even if a server is still writing) and each page is
sent with PostgreSQL's COPY; memory stays bounded by a page. The PostgreSQL side is one
transaction: the copy lands whole or not at all. A target that holds any row is refused
unless `replace` is given, which empties its tables first (in the same transaction).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from openbeepboop.server.store.base import DatabaseUnreachable
from openbeepboop.server.store.migrations import latest_version, migrate_sqlite
from openbeepboop.server.store.pg_pool import connect, prepare_database
from openbeepboop.server.store.sqlite_io import connect as sqlite_connect

FIRST = ("api_keys", "nodes", "files", "file_parts", "batches", "jobs")  # the rest after
DERIVED = ("schema_migrations", "job_counts")  # not copied: job_counts is kept by triggers
PAGE_ROWS = 2000
PAGE_BYTES = 32 << 20  # file parts are about 1 MiB each: fewer of them per page


class CopyRefused(DatabaseUnreachable):
    """The copy cannot start; the message says why (e.g. the target is not empty)."""


@dataclass
class CopyReport:
    """What was copied: rows per table."""

    source: str
    target: str
    tables: dict[str, int] = field(default_factory=dict)
    replaced: bool = False

    @property
    def rows(self) -> int:
        return sum(self.tables.values())


def copy_sqlite_to_postgres(
    source: Path,
    target_url: str,
    replace: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> CopyReport:
    """Copy the SQLite file `source` into the PostgreSQL database `target_url` (created
    if missing). `progress(table, rows so far)` is called after each page. Runs its own
    event loop (a command, not a server verb)."""
    if not source.is_file():
        raise CopyRefused(f"no SQLite database at {source}")
    if latest_version("sqlite") != latest_version("postgres"):
        raise CopyRefused("this version's SQLite and PostgreSQL schemas differ; cannot copy")
    lite = sqlite_connect(source)
    try:
        migrate_sqlite(lite)  # what `start` would do; a no-op on a current database
        report = asyncio.run(_copy_into(lite, target_url, replace, progress))
    finally:
        lite.close()
    report.source = str(source)
    return report


async def _copy_into(
    lite: sqlite3.Connection,
    target_url: str,
    replace: bool,
    progress: Callable[[str, int], None] | None,
) -> CopyReport:
    await prepare_database(target_url)
    conn = await connect(target_url)
    try:
        async with conn.transaction():
            return await _copy(lite, conn, replace, progress)
    finally:
        await conn.close()


async def _copy(
    lite: sqlite3.Connection,
    conn: Any,
    replace: bool,
    progress: Callable[[str, int], None] | None,
) -> CopyReport:
    tables = await _pg_tables(conn)
    busy = [t for t in tables if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t})")]
    if busy and not replace:
        raise CopyRefused(
            f"the target database is not empty (rows in {', '.join(busy)}); "
            "pass --replace to delete them first"
        )
    if busy:
        await conn.execute(f"TRUNCATE {', '.join([*tables, 'job_counts'])}")  # no triggers
    report = CopyReport("", "", replaced=bool(busy))
    lite.execute("BEGIN")  # one snapshot of the source for the whole copy
    try:
        for table, columns in tables.items():
            names = list(columns)
            convert = [_CONVERT.get(kind, _same) for kind in columns.values()]
            count = 0
            for page in _pages(lite, table, names):
                records = [tuple(f(v) for f, v in zip(convert, row, strict=True)) for row in page]
                try:
                    await conn.copy_records_to_table(table, records=records, columns=names)
                except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
                    why = str(exc).splitlines()[0]
                    raise CopyRefused(
                        f"copying {table} failed, nothing was written: {why}"
                    ) from exc
                count += len(records)
                if progress is not None:
                    progress(table, count)
            report.tables[table] = count
            if "seq" in columns:
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), "
                    f"coalesce((SELECT max(seq) FROM {table}), 0) + 1, false)"
                )
    finally:
        lite.execute("ROLLBACK")
    return report


async def _pg_tables(conn: Any) -> dict[str, dict[str, str]]:
    """Table -> {column: type} of the target schema, in copy order."""
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND NOT table_name = ANY($1::text[]) "
        "ORDER BY table_name, ordinal_position",
        list(DERIVED),
    )
    tables: dict[str, dict[str, str]] = {}
    for r in rows:
        tables.setdefault(r["table_name"], {})[r["column_name"]] = r["data_type"]
    order = [t for t in FIRST if t in tables] + sorted(t for t in tables if t not in FIRST)
    return {t: tables[t] for t in order}


def _pages(lite: sqlite3.Connection, table: str, columns: list[str]) -> Iterator[list[Any]]:
    """The table's rows in rowid order, a bounded page at a time."""
    sql = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? ORDER BY rowid"
    after = 0
    while True:
        cursor = lite.execute(sql, (after,))
        page: list[Any] = []
        size = 0
        for row in cursor:
            after = row[0]
            page.append(row[1:])
            size += sum(len(v) for v in row[1:] if isinstance(v, str | bytes))
            if len(page) >= PAGE_ROWS or size >= PAGE_BYTES:
                break
        cursor.close()
        if not page:
            return
        yield page


def _same(value: Any) -> Any:
    return value


def _float(value: Any) -> Any:
    return None if value is None else float(value)


def _int(value: Any) -> Any:
    return None if value is None else int(value)


def _bytes(value: Any) -> Any:
    if value is None or isinstance(value, bytes):
        return value
    return value.encode() if isinstance(value, str) else bytes(value)


def _str(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return bytes(value).decode() if isinstance(value, bytes) else str(value)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "double precision": _float,
    "bigint": _int,
    "integer": _int,
    "bytea": _bytes,
    "text": _str,
}
