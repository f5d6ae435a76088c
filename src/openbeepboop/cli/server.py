"""`openbeepboop-server`: setup, start, keys."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.models import Role, Share
from openbeepboop.server.settings import ConfigError, ServerSettings, load_settings, write_settings
from openbeepboop.server.store.base import DatabaseUnreachable, Store

if TYPE_CHECKING:
    from openbeepboop.server.store.backup import BackupReport

T = TypeVar("T")

DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OPENBEEPBOOP_DATA_DIR",
    show_envvar=True,
    help="Where server.toml and the SQLite database live [default: the user data dir].",
)
JSON_OUT = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


SWARM_DHT_PORT = click.option(
    "--dht-port",
    type=click.IntRange(0, 65535),
    help="Join a swarm: UDP port of this server's DHT node, 0 for any "
    "(OPENBEEPBOOP_DHT_PORT or DHT_PORT).",
)
SWARM_BOOTSTRAP = click.option(
    "--bootstrap",
    metavar="HOST:PORT,...",
    help="DHT addresses of swarm members to join through "
    "(OPENBEEPBOOP_BOOTSTRAP or BOOTSTRAP_NODES).",
)


def swarm_line(app: Any) -> str:
    """One line for the console about the swarm membership ('' without one)."""
    swarm = getattr(app, "obb", None) and app.obb.swarm
    if swarm is None:
        return ""
    port = swarm.config.dht_port or "any free port"
    return (
        f"Swarm member {swarm.member_id} (swarm {swarm.secret.fingerprint()}): "
        f"DHT on UDP {swarm.config.dht_host}:{port}\n"
    )


def _settings(data_dir: Path | None, **overrides: Any) -> ServerSettings:
    try:
        return load_settings(data_dir, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _require_setup(settings: ServerSettings) -> None:
    """A one-line error unless `setup` has made this data directory."""
    if not settings.config_path.exists() and not settings.database_url:
        raise click.ClickException(
            f"{settings.data_dir} is not set up; run: "
            f"openbeepboop-server setup --data-dir {settings.data_dir}"
        )


def _with_store(settings: ServerSettings, fn: Callable[[KeyRing], Awaitable[T]]) -> T:
    return _on_store(settings, lambda store: fn(_keyring(settings, store)))


def _keyring(settings: ServerSettings, store: Store) -> KeyRing:
    """The server's keyring: with a swarm secret, client and node keys made here work on
    every member of the swarm (docs/security.md)."""
    from openbeepboop.server.core.identity import identity_of
    from openbeepboop.server.core.swarm_keys import key_signer

    return KeyRing(store, signer=key_signer(settings), origin=identity_of(settings).id)


def _on_store(settings: ServerSettings, fn: Callable[[Store], Awaitable[T]]) -> T:
    _require_setup(settings)  # rather than quietly making an empty database elsewhere
    from openbeepboop.server.store.factory import open_store

    async def run() -> T:
        store = open_store(settings)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (ConfigError, DatabaseUnreachable) as exc:
        raise click.ClickException(str(exc)) from exc


def _prepare_database(settings: ServerSettings) -> tuple[bool, list[int]]:
    """Make the database ready: create it if needed (PostgreSQL), apply migrations.
    Returns (created, migrations applied); a one-line error when it cannot."""
    from openbeepboop.server.store.factory import prepare_database

    try:
        return prepare_database(settings)
    except (ConfigError, DatabaseUnreachable) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openbeepboop")
def main() -> None:
    """The OpenBeepBoop queue server."""


@main.command()
@DATA_DIR
@click.option("--host", help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [default: 8000].")
@click.option("--lease-seconds", type=float, help="Lease length without a heartbeat [60].")
@click.option(
    "--database-url",
    help="sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, written to "
    "server.toml [default: SQLite in the data dir].",
)
@click.option("--non-interactive", is_flag=True, help="Never prompt; use flags and defaults.")
@click.option(
    "--no-keys",
    is_flag=True,
    help="Make no keys (they come from OPENBEEPBOOP_ADMIN_KEY, _NODE_KEY, _CLIENT_KEY).",
)
@JSON_OUT
def setup(
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    lease_seconds: float | None,
    database_url: str | None,
    non_interactive: bool,
    no_keys: bool,
    as_json: bool,
) -> None:
    """Create the data directory, config and database, and print new keys (shown once).

    Safe to run again: it keeps the database, applies new migrations, and makes new keys.
    With a PostgreSQL URL (--database-url or OPENBEEPBOOP_DATABASE_URL) it creates the
    database if it is missing and its tables; several servers may then share it.
    With --no-keys it makes no keys (containers: the operator gives them in
    OPENBEEPBOOP_ADMIN_KEY and the like, and the server makes sure of them at start).
    """
    interactive = not non_interactive and sys.stdin.isatty()
    if interactive:
        click.echo("OpenBeepBoop server setup. Press Enter to accept a default.\n", err=True)
        default_dir = data_dir or _settings(None).data_dir
        data_dir = Path(click.prompt("Data directory", default=str(default_dir), err=True))
        current = _settings(data_dir)
        host = host or click.prompt("Listen address", default=current.host, err=True)
        port = port or click.prompt(
            "Port", default=current.port, type=click.IntRange(0, 65535), err=True
        )
        if database_url is None:
            database_url = click.prompt(
                "Database URL (empty: SQLite in the data directory)",
                default=current.database_url,
                err=True,
            )
    settings = _settings(
        data_dir, host=host, port=port, lease_seconds=lease_seconds, database_url=database_url
    )
    created, applied = _prepare_database(settings)  # before writing: a bad URL stays out
    existed = settings.config_path.exists()
    config = write_settings(
        settings.data_dir,
        {"host": host, "port": port, "lease_seconds": lease_seconds, "database_url": database_url},
    )

    async def make_keys(keyring: KeyRing) -> dict[str, str]:
        made = {}
        for role in (Role.ADMIN, Role.NODE, Role.CLIENT):
            made[f"{role.value}_key"] = (await keyring.create(role, name="setup")).secret
        return made

    keys = {} if no_keys else _with_store(settings, make_keys)
    out = {
        "data_dir": str(settings.data_dir),
        "config": str(config),
        "database": settings.database_label,
        "database_created": created,
        "migrations_applied": applied,
        "url": f"http://{settings.host}:{settings.port}",
        **keys,
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    verb = "Updated" if existed else "Created"
    click.echo(f"{verb} {config}\nDatabase {settings.database_label} is ready.\n")
    if no_keys:
        click.echo(
            "No keys made (--no-keys): the server makes sure of the keys given in "
            "OPENBEEPBOOP_ADMIN_KEY, OPENBEEPBOOP_NODE_KEY and OPENBEEPBOOP_CLIENT_KEY "
            "(or their _FILE variants) when it starts."
        )
    else:
        click.echo("New API keys (shown once; only their hashes are stored):")
    for name, value in keys.items():
        click.echo(f"  {name:<11} {value}")
    click.echo(
        f"\nStart the server with:\n  openbeepboop-server start --data-dir {settings.data_dir}"
    )


@main.command()
@DATA_DIR
@click.option("--host", help="Address to listen on (OPENBEEPBOOP_HOST) [127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on (OPENBEEPBOOP_PORT) [8000].")
@click.option("--access-log", is_flag=True, help="Log every request.")
@SWARM_DHT_PORT
@SWARM_BOOTSTRAP
def start(
    data_dir: Path | None,
    host: str | None,
    port: int | None,
    access_log: bool,
    dht_port: int | None,
    bootstrap: str | None,
) -> None:
    """Serve the API until SIGTERM or SIGINT. Migrations are applied first.

    Settings come from DIR/server.toml; an OPENBEEPBOOP_<NAME> variable overrides each
    one (e.g. OPENBEEPBOOP_LEASE_SECONDS, OPENBEEPBOOP_DATABASE_URL), and flags override both.
    With --dht-port the server joins a swarm (docs/swarm.md).
    """
    from openbeepboop.cli import forwarder
    from openbeepboop.server.http.app import create_app
    from openbeepboop.server.http.serving import make_server

    settings = _settings(data_dir, host=host, port=port, dht_port=dht_port, bootstrap=bootstrap)
    _require_setup(settings)
    if settings.uses_postgres:
        _prepare_database(settings)  # one clear line when PostgreSQL is not there
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        app = create_app(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    forwarder.install(app)  # in a swarm: other members' models served through them
    server = make_server(app, settings, access_log)
    url = f"http://{settings.host}:{settings.port}"
    click.echo(f"OpenBeepBoop server on {url}", err=True)
    click.echo(swarm_line(app), err=True, nl=False)
    if settings.web_ui != "off":
        click.echo(f"Web interface: {url}/ (log in with an API key)", err=True)
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn logged why (e.g. the port is taken)


@main.command("migrate-db")
@DATA_DIR
@click.option(
    "--from",
    "source",
    help="The SQLite database to copy: sqlite:///PATH or a path [default: the data dir's].",
)
@click.option(
    "--to",
    "target",
    help="The PostgreSQL database: postgresql://... (created if missing) "
    "[default: database_url, when it is PostgreSQL].",
)
@click.option("--replace", is_flag=True, help="Empty a target that already holds rows first.")
@JSON_OUT
def migrate_db(
    data_dir: Path | None, source: str | None, target: str | None, replace: bool, as_json: bool
) -> None:
    """Copy a SQLite database into PostgreSQL, ids and all (for moving up to replicas).

    Jobs, keys, nodes, files, batches: everything, in one PostgreSQL transaction, read
    page by page (bounded memory). Stop the servers using the SQLite file first; then
    point database_url (or OPENBEEPBOOP_DATABASE_URL) at PostgreSQL and start them.
    A target that is not empty is refused unless --replace is given.
    """
    from openbeepboop.server.settings import POSTGRES_SCHEMES, SQLITE_SCHEME, redact_url

    settings = _settings(data_dir)
    if source is None:
        if settings.uses_postgres:
            raise click.UsageError("database_url is PostgreSQL here: give --from sqlite:///PATH")
        path = settings.sqlite_path
    else:
        path = Path(source.removeprefix(SQLITE_SCHEME)).expanduser()
    url = target or (settings.database_url if settings.uses_postgres else "")
    if not url.startswith(POSTGRES_SCHEMES):
        raise click.UsageError("give --to postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
    try:
        from openbeepboop.server.store.copy import copy_sqlite_to_postgres
    except ImportError as exc:
        raise click.ClickException(f"{exc}; pip install 'openbeepboop[postgres]'") from exc

    def progress(table: str, rows: int) -> None:
        if not as_json:
            click.echo(f"\r  {table}: {rows} rows", nl=False, err=True)

    try:
        report = copy_sqlite_to_postgres(path, url, replace, progress)
    except DatabaseUnreachable as exc:
        raise click.ClickException(str(exc)) from exc
    out = {
        "from": str(path),
        "to": redact_url(url),
        "replaced": report.replaced,
        "rows": report.rows,
        "tables": report.tables,
    }
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo("\r", nl=False, err=True)
    click.echo(f"Copied {report.rows} rows from {path} to {redact_url(url)}:")
    for table, rows in report.tables.items():
        click.echo(f"  {table:<12} {rows}")
    click.echo(
        "\nNow set database_url in server.toml (or OPENBEEPBOOP_DATABASE_URL) to that URL "
        "and start the servers."
    )


@main.command()
@DATA_DIR
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@JSON_OUT
def prune(data_dir: Path | None, dry_run: bool, as_json: bool) -> None:
    """Delete, now, the final jobs (and their results), finished batches and files that
    have outlived their settings (keep_*_seconds, file expiry).

    A running server does this by itself every prune_interval_seconds; this command is
    safe while it runs. Queued and running jobs, and the jobs and files of batches that
    are not finished, are never deleted.
    """
    from openbeepboop.server.core.retention import Retention
    from openbeepboop.server.http.app import retention_config

    settings = _settings(data_dir)

    async def run(store: Store) -> dict[str, int]:
        retention = Retention(store, retention_config(settings))
        return await (retention.plan() if dry_run else retention.prune())

    counts = _on_store(settings, run)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, **counts}))
        return
    click.echo("Would delete:" if dry_run else "Deleted:")
    for kind, n in counts.items():
        click.echo(f"  {kind.replace('_', ' '):<16} {n}")


@main.command()
@DATA_DIR
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace DEST when it exists.")
@JSON_OUT
def backup(data_dir: Path | None, dest: Path, force: bool, as_json: bool) -> None:
    """Copy the SQLite database to DEST while the server runs (a consistent snapshot,
    mode 0600). Uploaded files are inside the database, so DEST holds everything but
    server.toml. For PostgreSQL use pg_dump (docs/configuration.md#backups)."""
    from openbeepboop.server.store.backup import BackupError, backup_sqlite

    settings = _settings(data_dir)
    if settings.uses_postgres:
        raise click.ClickException(
            "database_url is PostgreSQL: back it up with pg_dump "
            "(see docs/configuration.md#backups)"
        )
    _require_setup(settings)
    try:
        report = backup_sqlite(settings.sqlite_path, dest.expanduser(), replace=force)
    except (BackupError, sqlite3.Error) as exc:
        raise click.ClickException(str(exc)) from exc
    _report_copy(report, "Backed up", as_json)


@main.command()
@DATA_DIR
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@JSON_OUT
def restore(data_dir: Path | None, src: Path, as_json: bool) -> None:
    """Put a backup made by `backup` back as the SQLite database (replacing it).

    Stop the server first: restore refuses while any process has the database open.
    Migrations newer than the backup are applied when the server starts."""
    from openbeepboop.server.store.backup import BackupError, restore_sqlite

    settings = _settings(data_dir)
    if settings.uses_postgres:
        raise click.ClickException(
            "database_url is PostgreSQL: restore it with pg_restore "
            "(see docs/configuration.md#backups)"
        )
    try:
        report = restore_sqlite(src.expanduser(), settings.sqlite_path)
    except (BackupError, sqlite3.Error) as exc:
        raise click.ClickException(str(exc)) from exc
    _report_copy(report, "Restored", as_json)


def _report_copy(report: BackupReport, verb: str, as_json: bool) -> None:
    out = {
        "from": report.source,
        "to": report.target,
        "bytes": report.bytes,
        "jobs": report.jobs,
        "files": report.files,
    }
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(
            f"{verb} {report.source} to {report.target}: {report.bytes} bytes, "
            f"{report.jobs} jobs, {report.files} files."
        )


@main.group()
def keys() -> None:
    """Create, generate, list and revoke API keys."""


@keys.command("create")
@DATA_DIR
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), required=True, help="What it may do."
)
@click.option("--name", default="", help="A label to recognise it by.")
@click.option(
    "--group",
    default=None,
    help="The share group its jobs are scheduled in (fair share; docs/scheduling.md).",
)
@JSON_OUT
def keys_create(
    data_dir: Path | None, role: str, name: str, group: str | None, as_json: bool
) -> None:
    """Make a key and print it (once)."""
    settings = _settings(data_dir)

    async def create(keyring: KeyRing) -> tuple[str, str]:
        issued = await keyring.create(Role(role), name, group)
        return issued.secret, issued.record.id

    secret, key_id = _domain(lambda: _with_store(settings, create))
    if as_json:
        out = {"key": secret, "id": key_id, "role": role, "name": name, "group": group}
        click.echo(json.dumps(out))
    else:
        click.echo(secret)
        click.echo(f"({role} key {key_id}; shown once)", err=True)


@keys.command("generate")
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), required=True, help="What it may do."
)
@JSON_OUT
def keys_generate(role: str, as_json: bool) -> None:
    """Print a new key without storing it anywhere: for OPENBEEPBOOP_<ROLE>_KEY (an .env
    file, a Docker secret), which the server makes sure of when it starts. Needs no data
    directory."""
    from openbeepboop.server.core.keys import new_key

    secret = new_key(Role(role)).secret
    variable = f"OPENBEEPBOOP_{role.upper()}_KEY"
    if as_json:
        click.echo(json.dumps({"key": secret, "role": role, "variable": variable}))
    else:
        click.echo(secret)
        click.echo(f"({role} key, not stored: give it to the server as {variable})", err=True)


@keys.command("list")
@DATA_DIR
@JSON_OUT
def keys_list(data_dir: Path | None, as_json: bool) -> None:
    """List keys (ids, roles and prefixes; never the secrets)."""
    settings = _settings(data_dir)
    found = _with_store(settings, lambda keyring: keyring.list_keys())
    rows = [
        {
            "id": k.id,
            "role": k.role.value,
            "prefix": k.prefix,
            "name": k.name,
            "created_at": k.created_at,
            "revoked": not k.active,
            "group": k.group,
        }
        for k in found
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        state = "revoked" if r["revoked"] else "active"
        group = f"  [group {r['group']}]" if r["group"] else ""
        click.echo(f"{r['id']}  {r['role']:<6}  {r['prefix']}...  {state:<7}  {r['name']}{group}")


@keys.command("group")
@DATA_DIR
@click.argument("key_id")
@click.argument("group", required=False)
@JSON_OUT
def keys_group(data_dir: Path | None, key_id: str, group: str | None, as_json: bool) -> None:
    """Put a key in a share group (no GROUP: the key is its own share again). Its queued
    jobs move with it; servers apply it within seconds."""
    settings = _settings(data_dir)
    key = _domain(lambda: _with_store(settings, lambda keyring: keyring.set_group(key_id, group)))
    if as_json:
        click.echo(json.dumps({"id": key.id, "group": key.group}))
    else:
        click.echo(f"{key.id}: group {key.group}" if key.group else f"{key.id}: no group")


@main.group()
def shares() -> None:
    """Fair-share weights and quotas of groups and keys (docs/scheduling.md)."""


@shares.command("set")
@DATA_DIR
@click.argument("name")
@click.option("--weight", type=float, default=1.0, show_default=True, help="Its turn's weight.")
@click.option("--jobs-per-hour", type=click.IntRange(min=0), default=None, help="Quota.")
@click.option("--tokens-per-hour", type=click.IntRange(min=0), default=None, help="Quota.")
@JSON_OUT
def shares_set(
    data_dir: Path | None,
    name: str,
    weight: float,
    jobs_per_hour: int | None,
    tokens_per_hour: int | None,
    as_json: bool,
) -> None:
    """Set the weight and quotas of NAME (a group, or a key id); unset quotas: none."""
    from openbeepboop.server.core.shares import ShareBook

    wanted = Share(name, weight, jobs_per_hour, tokens_per_hour)
    kept = _domain(lambda: _on_store(_settings(data_dir), lambda s: ShareBook(s).put(wanted)))
    if as_json:
        click.echo(json.dumps(_share_json(kept)))
    else:
        click.echo(_share_line(kept))


@shares.command("list")
@DATA_DIR
@JSON_OUT
def shares_list(data_dir: Path | None, as_json: bool) -> None:
    """The shares whose weight or quotas were set (every other one: weight 1, the default
    quotas), with the jobs and tokens a share with a quota used this hour."""
    from openbeepboop.server.core.quotas import QuotaConfig, Quotas
    from openbeepboop.server.core.shares import ShareBook

    settings = _settings(data_dir)
    defaults = QuotaConfig(settings.quota_jobs_per_hour, settings.quota_tokens_per_hour)

    async def listed(store: Store) -> tuple[list[Share], dict[str, tuple[int, int]]]:
        usage = await Quotas(store, defaults).usage()
        return await ShareBook(store).list(), {u.share: (u.jobs_used, u.tokens_used) for u in usage}

    found, used = _on_store(settings, listed)
    if as_json:
        out = [_share_json(s) for s in found]
        for row in out:
            if row["name"] in used:
                row["jobs_used"], row["tokens_used"] = used[row["name"]]
        click.echo(json.dumps(out))
        return
    for s in found:
        jobs, tokens = used.get(s.name, (None, None))
        usage = "" if jobs is None else f"  used this hour: {jobs} jobs, {tokens} tokens"
        click.echo(_share_line(s) + usage)


@shares.command("unset")
@DATA_DIR
@click.argument("name")
@JSON_OUT
def shares_unset(data_dir: Path | None, name: str, as_json: bool) -> None:
    """Forget NAME's weight and quotas (weight 1, no quota again)."""
    from openbeepboop.server.core.shares import ShareBook

    _domain(lambda: _on_store(_settings(data_dir), lambda s: ShareBook(s).unset(name)))
    click.echo(json.dumps({"name": name, "unset": True}) if as_json else f"unset {name}")


def _share_json(s: Share) -> dict[str, Any]:
    return {
        "name": s.name,
        "weight": s.weight,
        "jobs_per_hour": s.jobs_per_hour,
        "tokens_per_hour": s.tokens_per_hour,
    }


def _share_line(s: Share) -> str:
    jobs = "-" if s.jobs_per_hour is None else str(s.jobs_per_hour)
    tokens = "-" if s.tokens_per_hour is None else str(s.tokens_per_hour)
    return f"{s.name}  weight {s.weight:g}  jobs/hour {jobs}  tokens/hour {tokens}"


def _domain(fn: Callable[[], T]) -> T:
    """`fn()`, a domain error (a bad name or value) as the command's one-line error."""
    from openbeepboop.server.errors import DomainError

    try:
        return fn()
    except DomainError as exc:
        raise click.ClickException(exc.message) from exc


@keys.command("revoke")
@DATA_DIR
@click.argument("key_id")
@JSON_OUT
def keys_revoke(data_dir: Path | None, key_id: str, as_json: bool) -> None:
    """Revoke a key by id (see `keys list`). Servers stop accepting it within seconds."""
    settings = _settings(data_dir)
    key = _domain(lambda: _with_store(settings, lambda keyring: keyring.revoke(key_id)))
    if as_json:
        click.echo(json.dumps({"id": key.id, "revoked": True}))
    else:
        click.echo(f"revoked {key.id}")


@main.group()
def cache() -> None:
    """Look at and empty the response cache (docs/cache.md)."""


@cache.command("stats")
@DATA_DIR
@JSON_OUT
def cache_stats(data_dir: Path | None, as_json: bool) -> None:
    """How many answers the cache holds, their size, and their hits so far."""
    held = _on_store(_settings(data_dir), lambda store: store.cache_summary())
    if as_json:
        click.echo(json.dumps({"entries": held.entries, "bytes": held.bytes, "hits": held.hits}))
    else:
        click.echo(f"{held.entries} answers, {held.bytes} bytes, {held.hits} hits")


@cache.command("clear")
@DATA_DIR
@click.option("--model", default=None, help="Only the answers of this model.")
@JSON_OUT
def cache_clear(data_dir: Path | None, model: str | None, as_json: bool) -> None:
    """Delete cached answers (every one, or one model's); safe while servers run."""
    gone = _on_store(_settings(data_dir), lambda store: store.cache_clear(model))
    if as_json:
        click.echo(json.dumps({"deleted": gone, "model": model}))
    else:
        click.echo(f"deleted {gone} cached answer{'s' if gone != 1 else ''}")


if __name__ == "__main__":
    main()
