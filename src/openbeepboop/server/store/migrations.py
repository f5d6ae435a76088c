"""Versioned schema migrations: `migrations/<dialect>/NNNN_name.sql`, applied in order,
each in its own transaction, recorded in `schema_migrations`.

The dialects keep the same numbers: migration N means the same schema change in SQLite
and in PostgreSQL (`migrate-db` relies on it). On PostgreSQL the runner holds an
advisory lock, so that replicas starting at once apply each migration exactly once.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

# pg_advisory_lock key of the migration runner: b"obb-migr" as a 64-bit integer
PG_MIGRATION_LOCK = int.from_bytes(b"obb-migr", "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered SQL script."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations shipped for `dialect`, oldest first."""
    folder = resources.files("openbeepboop.server.store").joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply pending migrations to an autocommit connection; returns the versions applied."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for migration in load_migrations("sqlite"):
        if migration.version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, datetime('now'))",
                (migration.version, migration.name),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(migration.version)
    return applied


async def migrate_postgres(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations over one connection, under the advisory lock; returns the
    versions applied (none when another replica got there first)."""
    await conn.execute("SELECT pg_advisory_lock($1)", PG_MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in load_migrations("postgres"):
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)  # a script: the simple query protocol
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.version)
        return applied
    finally:
        if not conn.is_closed():  # a closed session has released its locks
            await conn.execute("SELECT pg_advisory_unlock($1)", PG_MIGRATION_LOCK)


def latest_version(dialect: str) -> int:
    """The newest migration shipped for `dialect` (0 when none)."""
    return max((m.version for m in load_migrations(dialect)), default=0)


def _statements(script: str) -> list[str]:
    """Split a script into statements (our scripts hold no semicolons in literals; a
    trigger's body holds several, and ends where SQLite says its statement is complete)."""
    body = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    statements, part = [], ""
    for piece in body.split(";"):
        part += piece + ";"
        if sqlite3.complete_statement(part):
            if part.strip(" \t\n;"):
                statements.append(part.strip())
            part = ""
    return statements
