"""PostgreSQL connections for the store: one server's pool, and the rule for retrying a
verb when the connection is lost.

Every write verb is one statement (which commits as it runs: the hot verbs, one round
trip) or, when it needs several, one explicit transaction. When the connection is lost
(PostgreSQL restarted, the backend terminated, the network dropped) a verb is retried
once, on a fresh connection, only when that cannot apply it twice:

- reads: always;
- writes that failed before anything could be applied (no connection could be had, the
  connection was found dead, or a transaction failed before its COMMIT was sent:
  PostgreSQL rolled it back): always;
- writes that may have been applied (the lone statement or the COMMIT was sent and not
  answered: the outcome is unknown): only the idempotent ones (`Kind.IDEMPOTENT`, as the
  store declares them). Any other verb answers `Unavailable` (HTTP 503): its caller
  retries as after any 503 (a node re-sends its result and learns it was recorded, a
  client re-submits with its Idempotency-Key); a claim that did commit is re-queued when
  its lease expires. Nothing is applied twice without the caller knowing.

Deadlocks and serialization failures (the transaction was rolled back) are retried once
too. A second failure answers `Unavailable` with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from asyncpg import exceptions as pgerr

from openbeepboop.server.errors import InvalidRequest, Unavailable
from openbeepboop.server.settings import redact_url
from openbeepboop.server.store.base import DatabaseUnreachable
from openbeepboop.server.store.migrations import migrate_postgres

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("openbeepboop.store.postgres")

T = TypeVar("T")
APPLICATION_NAME = "openbeepboop"
ACQUIRE_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
RETRY_DELAY = 0.2
# The connection (or the server behind it) went away: the verb did not get an answer.
LOST = (
    OSError,
    TimeoutError,
    pgerr.PostgresConnectionError,
    pgerr.AdminShutdownError,
    pgerr.CrashShutdownError,
    pgerr.CannotConnectNowError,
    pgerr.TooManyConnectionsError,
)
# The server refused a value (e.g. a NUL character in text): the caller's input.
UNSTORABLE = (pgerr.CharacterNotInRepertoireError, pgerr.UntranslatableCharacterError)


@dataclass(slots=True)
class _Attempt:
    """How far one try of a verb got: into COMMIT, or onto a closed connection."""

    committing: bool = False
    closed: bool = False


class Kind(enum.Enum):
    """How a verb may be retried after a lost connection (see the module docstring)."""

    READ = "read"
    IDEMPOTENT = "idempotent"
    ONCE = "once"


class DatabaseMissing(DatabaseUnreachable):
    """The server answers but the database does not exist."""


def describe_failure(url: str, exc: BaseException) -> str:
    """One line: what failed to connect, and why."""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot use PostgreSQL database {redact_url(url)}: {why}"


async def connect(url: str) -> asyncpg.Connection[asyncpg.Record]:
    """One connection; DatabaseUnreachable (DatabaseMissing) with one clear line."""
    try:
        return await asyncpg.connect(url, timeout=10)
    except pgerr.InvalidCatalogNameError as exc:
        raise DatabaseMissing(describe_failure(url, exc)) from exc
    except (*LOST, pgerr.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise DatabaseUnreachable(describe_failure(url, exc)) from exc


async def prepare_database(url: str) -> tuple[bool, list[int]]:
    """Create the database when it does not exist (connecting to the server's
    `postgres` database with the same credentials), then apply migrations. Returns
    (created, migrations applied)."""
    created = False
    try:
        applied = await migrate(url)
    except DatabaseMissing:
        await _create_database(url)
        created = True
        applied = await migrate(url)
    return created, applied


async def migrate(url: str) -> list[int]:
    """Connect, apply pending migrations, disconnect (used by `setup` and at open)."""
    conn = await connect(url)
    try:
        return await migrate_postgres(conn)
    except LOST as exc:
        raise DatabaseUnreachable(describe_failure(url, exc)) from exc
    finally:
        await conn.close()


async def _create_database(url: str) -> None:
    parts = urlsplit(url)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise DatabaseUnreachable(f"{redact_url(url)} names no database")
    conn = await connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await conn.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except pgerr.DuplicateDatabaseError:
        pass  # another setup made it meanwhile
    except pgerr.PostgresError as exc:
        raise DatabaseUnreachable(
            f"database {name!r} does not exist and cannot be created: {exc}"
        ) from exc
    finally:
        await conn.close()


class PgPool:
    """One server's connections to the database, and the retry rule of the module
    docstring for every verb run through `read` and `write`."""

    def __init__(self, url: str, size: int = 10) -> None:
        self.url = url
        self.size = size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    async def open(self) -> None:
        """Apply pending migrations, then open the pool; DatabaseUnreachable when we
        cannot connect."""
        await migrate(self.url)  # on a connection of its own: the pool never holds a lock
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=min(2, self.size),
                max_size=self.size,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": APPLICATION_NAME},
                timeout=10,
                reset=_keep_session,
            )
        except (*LOST, pgerr.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
            raise DatabaseUnreachable(describe_failure(self.url, exc)) from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except (TimeoutError, *LOST):
                pool.terminate()

    async def _run(self, kind: Kind, op: Callable[[Conn], Awaitable[T]], single: bool) -> T:
        """Run `op` on a pooled connection (writes in one transaction), retrying once
        when that is safe (module docstring)."""
        for attempt in (1, 2):
            tried = _Attempt()
            try:
                return await self._attempt(kind, op, tried, single)
            except UNSTORABLE as exc:
                raise InvalidRequest(f"a value cannot be stored: {exc}") from exc
            except pgerr.TransactionRollbackError as exc:  # deadlock: nothing was applied
                if attempt == 1:
                    continue
                raise Unavailable(
                    f"the database is busy: {exc}", retry_after=1, code="database_busy"
                ) from exc
            except Exception as exc:
                if not (tried.closed or isinstance(exc, LOST)):
                    raise
                await self._forget_connections()
                if attempt == 1 and (kind is not Kind.ONCE or not tried.committing):
                    log.warning("database connection lost (%s); retrying once", _why(exc))
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                unknown = " (the outcome is unknown: retry)" if tried.committing else ""
                raise Unavailable(
                    f"the database is unreachable{unknown}: {_why(exc)}",
                    retry_after=1,
                    code="database_unavailable",
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self, kind: Kind, op: Callable[[Conn], Awaitable[T]], tried: _Attempt, single: bool
    ) -> T:
        if self._pool is None:
            raise Unavailable("the database is not open", retry_after=1, code="database_closed")
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
            try:
                if kind is not Kind.READ:
                    # let the loop read what the server may have sent meanwhile (e.g. the
                    # FATAL of pg_terminate_backend): a write never goes out on a
                    # connection the server already ended
                    await asyncio.sleep(0)
                    if conn.is_closed():
                        raise pgerr.ConnectionDoesNotExistError("the server closed it")
                if kind is Kind.READ or single:
                    tried.committing = kind is not Kind.READ  # a lone write commits as it runs
                    return await op(conn)
                tx = conn.transaction()
                await tx.start()
                try:
                    value = await op(conn)
                except BaseException:
                    with contextlib.suppress(*LOST, asyncpg.InterfaceError):
                        await tx.rollback()
                    raise
                tried.committing = True
                await tx.commit()
                return value
            except asyncpg.InterfaceError:
                tried.closed = conn.is_closed()
                raise
            except asyncpg.InternalClientError:
                # the server ended the session while the connection sat idle (e.g.
                # pg_terminate_backend) and its protocol state is stuck: nothing could
                # be sent; drop it
                conn.terminate()
                tried.closed, tried.committing = True, False
                raise

    async def _forget_connections(self) -> None:
        """After a lost connection, replace the idle ones too (they likely died with it)."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.expire_connections()

    def read(self, op: Callable[[Conn], Awaitable[T]]) -> Awaitable[T]:
        """Run a read (retried once when the connection is lost)."""
        return self._run(Kind.READ, op, single=True)

    def write(
        self, op: Callable[[Conn], Awaitable[T]], kind: Kind = Kind.ONCE, single: bool = True
    ) -> Awaitable[T]:
        """`single`: `op` makes one write statement (any reads after it need not be
        atomic with it), run without BEGIN/COMMIT; else `op` runs in a transaction."""
        return self._run(kind, op, single)


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset between two users of a connection. asyncpg's default (UNLISTEN,
    RESET ALL, advisory unlock: a round trip per verb) has nothing to undo here: the
    verbs set no session state, and an open transaction is rolled back by the pool."""


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
