"""`openbeepboop-client batches`: every batch in one place, the server's and this machine's.

Two kinds of batch: the server's OpenAI batches (`batch_…`, made with `/v1/batches`) and
the local runs of the client's batch runner (`run_…`, a state file each, see
`openbeepboop.client.runs`). `status` lists both; `cancel`, `resume` and `results` take
either (a run also by its name or a unique prefix of its id). Exit codes as for the other
commands: 1 something failed, 2 usage, 3 server unreachable, 4 key refused, 5 not found.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from openbeepboop.cli.batch_sources import Conn, Refused, Row, cancel_row, local_row, server_row
from openbeepboop.cli.given import given, print_json
from openbeepboop.client import APIConnectionError, AsyncClient, OpenBeepBoopError, runs

F = TypeVar("F", bound=Callable[..., Any])


def _connected(fn: F) -> F:
    """The common options of `openbeepboop-client` (given before or after the command),
    the client errors and `Refused` as one line and an exit code."""

    @click.option(
        "--base-url",
        envvar=["OPENBEEPBOOP_BASE_URL", "OPENAI_BASE_URL"],
        show_envvar=True,
        help="Server URL [http://127.0.0.1:8000; a local run: the server it ran on].",
    )
    @click.option(
        "--api-key",
        envvar=["OPENBEEPBOOP_API_KEY", "OPENAI_API_KEY"],
        show_envvar=True,
        help="A client key [the one `openbeepboop serve` saved locally]. OPENAI_API_KEY "
        "is used only with a server named by OPENAI_BASE_URL.",
    )
    @click.option(
        "--bootstrap",
        envvar="OPENBEEPBOOP_BOOTSTRAP",
        show_envvar=True,
        metavar="HOST:PORT,...",
        help="A swarm's DHT address(es): use the least loaded server there.",
    )
    @click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="OPENBEEPBOOP_STATE_DIR",
        show_envvar=True,
        help="Where local runs keep their state files [$CACHE_DIR/runs, else the user "
        "state directory].",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
    @functools.wraps(fn)
    def wrapper(
        base_url: str | None,
        api_key: str | None,
        bootstrap: str | None,
        state_dir: Path | None,
        **kwargs: Any,
    ) -> Any:
        # cli/client.py imports this module to register the group: import it back lazily
        from openbeepboop.cli.client import _before_command, _fail

        ctx = click.get_current_context()
        conn = Conn(
            given(ctx, "base_url", base_url),
            given(ctx, "api_key", api_key),
            _before_command(ctx, "bootstrap", bootstrap) or None,
            state_dir,
        )
        kwargs["as_json"] = _before_command(ctx, "as_json", kwargs["as_json"])
        try:
            return fn(conn, **kwargs)
        except Refused as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.code)
        except OpenBeepBoopError as exc:
            _fail(exc)
        finally:
            conn.close()

    return wrapper  # type: ignore[return-value]


# -- status ----------------------------------------------------------------------------


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def status_table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = ("KIND", "ID", "NAME", "STATUS", "TOTAL", "COMPLETED", "FAILED", "PROGRESS", "CREATED")
    cells = [header] + [
        (
            r.kind,
            r.id,
            r.name or "-",
            r.status,
            str(r.total),
            str(r.completed),
            str(r.failed),
            f"{r.progress * 100:.0f}%",
            _when(r.created_at),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {4, 5, 6, 7}
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


@click.group()
def batches() -> None:
    """Every batch: the server's OpenAI batches and this machine's local runs."""


@batches.command()
@_connected
def status(conn: Conn, as_json: bool) -> None:
    """Every batch with its counts and progress, newest first. Local runs are listed
    even when the server cannot be reached (then the exit code is 3)."""
    local = [local_row(r) for r in conn.local_runs()]
    unreachable: APIConnectionError | None = None
    try:
        remote = [server_row(b) for b in conn.server_batches()]
    except APIConnectionError as exc:
        remote, unreachable = [], exc
    rows = sorted(remote + local, key=lambda r: r.created_at, reverse=True)
    if as_json:
        print_json([r.as_json() for r in rows])
    elif rows:
        click.echo(status_table(rows))
    elif unreachable is None:
        click.echo("no batches", err=True)
    if unreachable is not None:
        raise unreachable


# -- cancel ------------------------------------------------------------------------------


def _everything(conn: Conn) -> list[Row]:
    local = [local_row(r) for r in conn.local_runs()]
    return [server_row(b) for b in conn.server_batches()] + local


def _targets(conn: Conn, ref: str | None, prefix: str | None, every: bool) -> list[Row]:
    if sum((ref is not None, prefix is not None, every)) != 1:
        raise Refused("give one of ID, --prefix P or --all")
    if prefix is not None and not prefix.strip():
        raise Refused("--prefix must not be empty (to cancel everything, use --all)")
    if ref is not None:
        return [conn.find(ref)]
    rows = _everything(conn)
    if prefix is not None:
        matched = [r for r in rows if (r.name or "").startswith(prefix)]
        if not matched:
            raise Refused(f"no server batch or local run has a name starting with {prefix!r}", 5)
        return matched
    return [r for r in rows if r.cancellable]


@batches.command()
@click.argument("ref", metavar="[ID]", required=False)
@click.option("--prefix", help="Every batch and run whose name starts with this.")
@click.option("--all", "every", is_flag=True, help="Every batch and run not already final.")
@click.option("--yes", "-y", is_flag=True, help="With --all or --prefix: do not ask.")
@_connected
def cancel(
    conn: Conn, ref: str | None, prefix: str | None, every: bool, yes: bool, as_json: bool
) -> None:
    """Cancel a server batch (its queued lines; running ones finish) or a local run (its
    outstanding jobs), by ID, by name --prefix, or --all."""
    rows = _targets(conn, ref, prefix, every)
    if every:
        if not rows:
            click.echo("nothing to cancel: no batch or run is in progress", err=True)
            return
        if not yes and not sys.stdin.isatty():
            raise Refused(
                f"cancel --all would cancel {len(rows)} batch(es) and asks first: "
                "add --yes to run it without a terminal"
            )
        click.echo(f"{len(rows)} to cancel: " + ", ".join(_label(r) for r in rows), err=True)
        if not yes:
            click.confirm("cancel them all?", abort=True, err=True)
    elif prefix is not None:
        if len(rows) > 1 and not yes and not sys.stdin.isatty():
            raise Refused(
                f"cancel --prefix {prefix} matches {len(rows)} batch(es) and asks first: "
                "add --yes to run it without a terminal"
            )
        click.echo(f"{len(rows)} matched: " + ", ".join(_label(r) for r in rows), err=True)
        if len(rows) > 1 and not yes:
            click.confirm("cancel them all?", abort=True, err=True)
    if ref is not None:  # one batch: its error is the command's
        said, failed = cancel_row(conn, rows[0]), False
        done = [(rows[0], said, failed)]
    else:  # many: one that cannot be cancelled does not stop the others
        done = [(r, *_cancel_one_of_many(conn, r)) for r in rows]
    if as_json:
        print_json(
            [
                {"kind": r.kind, "id": r.id, "name": r.name, "result": said, "ok": not failed}
                for r, said, failed in done
            ]
        )
    else:
        for _, said, failed in done:
            click.echo(said, err=failed)
    if any(failed for _, _, failed in done):
        sys.exit(1)


def _cancel_one_of_many(conn: Conn, row: Row) -> tuple[str, bool]:
    try:
        return cancel_row(conn, row), False
    except OpenBeepBoopError as exc:
        return f"{row.id}: not cancelled: {exc}", True


def _label(row: Row) -> str:
    return f"{row.id} ({row.name})" if row.name else row.id


# -- resume ------------------------------------------------------------------------------


@batches.command()
@click.argument("ref", metavar="ID")
@click.option(
    "--heartbeat",
    "heartbeat_s",
    type=click.FloatRange(min=0.01),
    help="Seconds between progress lines on stderr [the run's].",
)
@click.option(
    "--max-failures",
    type=click.IntRange(min=0),
    help="Give up after this many failed jobs (0: never) [the run's].",
)
@_connected
def resume(
    conn: Conn,
    ref: str,
    heartbeat_s: float | None,
    max_failures: int | None,
    as_json: bool,
) -> None:
    """Continue a local run where it stopped: requests already answered are not sent
    again, jobs already submitted are collected. Heartbeat lines go to stderr."""
    row = conn.find(ref)
    if row.kind == "server":
        raise Refused(
            f"{row.id} is a server batch: the server runs it by itself and it cannot be "
            "resumed (only local runs can)"
        )
    run = runs.find_run(row.id, conn.state_dir)
    if run.status == "finished":
        click.echo(f"{run.id} has finished: nothing to resume", err=True)
    else:
        options = {"heartbeat_s": heartbeat_s, "max_failures": max_failures}
        try:
            with _progress_on_stderr():
                asyncio.run(_resume(conn, run, options))
        except runs.RunAbortedError:
            pass  # logged, and said below
        except ValueError as exc:  # a bad option
            raise Refused(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: `batches resume {run.id}` carries on", err=True)
            sys.exit(130)
    after = local_row(runs.find_run(run.id, conn.state_dir))
    if as_json:
        print_json(after.as_json())
    else:
        click.echo(
            f"{after.id} {after.status}: {after.completed} completed, {after.failed} failed "
            f"of {after.total}"
        )
    if after.failed or after.status != "finished":
        sys.exit(1)


async def _resume(conn: Conn, run: runs.RunSummary, options: dict[str, Any]) -> None:
    async with AsyncClient(conn.url_for(run.base_url) or conn.base_url, conn.api_key) as client:
        await runs.resume_run(client, run, **options)


@contextlib.contextmanager
def _progress_on_stderr() -> Iterator[None]:
    """The runner's log lines (start, heartbeats, the end) on stderr, as they are."""
    logger = logging.getLogger(runs.__name__)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- results ---------------------------------------------------------------------------


@batches.command()
@click.argument("ref", metavar="ID")
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    help="Where the results JSONL goes ('-': stdout).",
)
@_connected
def results(conn: Conn, ref: str, output: str, as_json: bool) -> None:
    """A batch's results as OpenAI batch output lines: a server batch's output file
    then its error file; a local run's answered requests in input order."""
    row = conn.find(ref)
    if row.kind == "server":
        batch = conn.client().request("GET", f"/v1/batches/{row.id}")
        files = [f for f in (batch.get("output_file_id"), batch.get("error_file_id")) if f]
        if not files:
            raise Refused(f"{row.id} is {batch['status']} and has no results yet", 1)
        with _output(output) as out:
            conn.download(files, out)
    else:
        run = runs.find_run(row.id, conn.state_dir)
        with _output(output) as out:
            for line in runs.run_results(run):
                out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    if output != "-":
        click.echo(f"wrote {row.id}'s results to {output}", err=True)


@contextlib.contextmanager
def _output(target: str) -> Iterator[IO[bytes]]:
    """stdout's bytes for '-'; else a file written beside `target` and moved onto it once
    complete, so that an interrupted download leaves no half file behind."""
    if target == "-":
        yield sys.stdout.buffer
        sys.stdout.flush()
        return
    path = Path(target)
    part = path.with_name(path.name + ".part")
    try:
        file = part.open("wb")
    except OSError as exc:
        raise Refused(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        with file:
            yield file
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(path)
