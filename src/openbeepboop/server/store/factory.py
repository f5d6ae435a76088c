"""The store a server's settings name: SQLite by default, PostgreSQL for replicas."""

from __future__ import annotations

import asyncio

from openbeepboop.private_paths import private_dir
from openbeepboop.server.settings import ConfigError, ServerSettings
from openbeepboop.server.store.base import Store

POSTGRES_EXTRA = "install the PostgreSQL driver: pip install 'openbeepboop[postgres]'"


def open_store(settings: ServerSettings) -> Store:
    """A store for `settings.database_url` (not opened yet)."""
    if settings.uses_postgres:
        try:
            from openbeepboop.server.store.postgres import PostgresStore
        except ImportError as exc:  # asyncpg is an optional extra
            raise ConfigError(f"database_url is PostgreSQL but {exc}; {POSTGRES_EXTRA}") from exc
        return PostgresStore(settings.database_url, pool_size=settings.database_pool_size)
    from openbeepboop.server.store.sqlite import SqliteStore

    return SqliteStore(settings.sqlite_path, synchronous=settings.sqlite_synchronous)


def prepare_database(settings: ServerSettings) -> tuple[bool, list[int]]:
    """Make the database ready (outside any event loop): create it when PostgreSQL has
    no such database yet, apply pending migrations. Returns (created, versions applied);
    DatabaseUnreachable or ConfigError when it cannot."""
    if settings.uses_postgres:
        try:
            from openbeepboop.server.store.pg_pool import prepare_database as prepare
        except ImportError as exc:
            raise ConfigError(f"database_url is PostgreSQL but {exc}; {POSTGRES_EXTRA}") from exc
        return asyncio.run(prepare(settings.database_url))
    from openbeepboop.server.store.sqlite import SqliteStore

    existed = settings.sqlite_path.exists()
    private_dir(settings.sqlite_path.parent)
    return not existed, SqliteStore(settings.sqlite_path).migrate()
