"""`openbeepboop-client`: submit, poll, get, cancel, list, models, status, swarm.

Data goes to stdout (`--json` for scripts), progress and errors to stderr. Exit codes:
0 ok, 1 the job failed (or was cancelled or expired), 2 usage, 3 server unreachable,
4 key refused, 5 not found, 6 timed out waiting, 7 any other API error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from openbeepboop.cli.given import given, print_json
from openbeepboop.cli.labels import parse_labels
from openbeepboop.client import (
    APIConnectionError,
    AuthenticationError,
    Client,
    Job,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    OpenBeepBoopError,
    PermissionDeniedError,
)
from openbeepboop.client.runs import RunAbortedError

F = TypeVar("F", bound=Callable[..., Any])
URL_VARS = ["OPENBEEPBOOP_BASE_URL", "OPENAI_BASE_URL"]
KEY_VARS = ["OPENBEEPBOOP_API_KEY", "OPENAI_API_KEY"]
KEY_HELP = (
    "A client key [the one `openbeepboop serve` saved locally]. OPENAI_API_KEY is used "
    "only with a server named by OPENAI_BASE_URL."
)
EXIT = {
    RunAbortedError: 1,
    JobFailedError: 1,
    APIConnectionError: 3,
    AuthenticationError: 4,
    PermissionDeniedError: 4,
    NotFoundError: 5,
    JobTimeoutError: 6,
}


def _fail(exc: OpenBeepBoopError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(next((code for cls, code in EXIT.items() if isinstance(exc, cls)), 7))


def _connected(fn: F) -> F:
    """Build the Client from the common options and turn client errors into one line."""

    @click.option(
        "--base-url",
        envvar=URL_VARS,
        show_envvar=True,
        help="Server URL [http://127.0.0.1:8000].",
    )
    @click.option(
        "--api-key",
        envvar=KEY_VARS,
        show_envvar=True,
        help=KEY_HELP,
    )
    @click.option(
        "--bootstrap",
        envvar="OPENBEEPBOOP_BOOTSTRAP",
        show_envvar=True,
        metavar="HOST:PORT,...",
        help="A swarm's DHT address(es): find the least loaded server there, and fail over.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
    @functools.wraps(fn)
    def wrapper(
        base_url: str | None, api_key: str | None, bootstrap: str | None, **kwargs: Any
    ) -> Any:
        ctx = click.get_current_context()
        base_url = given(ctx, "base_url", base_url)
        api_key = given(ctx, "api_key", api_key)
        bootstrap = _before_command(ctx, "bootstrap", bootstrap)
        kwargs["as_json"] = _before_command(ctx, "as_json", kwargs["as_json"])
        try:
            client = Client(base_url, api_key, bootstrap=bootstrap or None)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--bootstrap") from exc
        try:
            return fn(client, **kwargs)
        except OpenBeepBoopError as exc:
            _fail(exc)
        finally:
            client.close()

    return wrapper  # type: ignore[return-value]


def _before_command(ctx: click.Context, name: str, value: Any) -> Any:
    """The common option `name` as given after the command, else as given before it
    (`openbeepboop-client --api-key K models`), else from the environment or default."""
    root = ctx.find_root()
    given_before = root.params.get(name)
    if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
        return value
    if root.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
        return given_before
    return given_before if given_before not in (None, False) else value


def _answer_text(job: Job) -> str:
    result = job.data.get("result") or {}
    choice = (result.get("choices") or [{}])[0]
    if "message" in choice:
        return str((choice["message"] or {}).get("content") or "")
    return str(choice.get("text") or "")


def _batch_options(fn: F) -> F:
    """The batch runner's options of `submit --file`, gathered into `batch`."""
    options = [
        click.option(
            "--max-outstanding",
            type=click.IntRange(min=1),
            envvar="MAX_OUTSTANDING",
            show_envvar=True,
            help="With --file: jobs submitted and not finished at once [1000].",
        ),
        click.option(
            "--workers",
            "num_workers",
            type=click.IntRange(min=1),
            envvar="BATCH_NUM_WORKERS",
            show_envvar=True,
            help="With --file: loops that submit and poll a share of them each [4].",
        ),
        click.option(
            "--rpm",
            type=click.IntRange(min=0),
            envvar="RPM",
            show_envvar=True,
            help="With --file: submits per minute, 0 for no limit [0].",
        ),
        click.option(
            "--request-timeout",
            "timeout_s",
            type=click.FloatRange(min=0),
            envvar="TIMEOUT_S",
            show_envvar=True,
            help="With --file: cancel a job not done this many seconds after its submit "
            "(it counts as failed), 0 for no limit [0].",
        ),
        click.option(
            "--max-failures",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="With --file: give up after this many failed jobs (0: never).",
        ),
        click.option(
            "--heartbeat",
            "heartbeat_s",
            type=click.FloatRange(min=0.01),
            default=10.0,
            show_default=True,
            help="With --file: seconds between progress lines on stderr.",
        ),
        click.option(
            "--state-dir",
            type=click.Path(file_okay=False, path_type=Path),
            envvar="OPENBEEPBOOP_STATE_DIR",
            show_envvar=True,
            help="With --file: where run state files live [$CACHE_DIR/runs, else the "
            "user state directory].",
        ),
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        kwargs["batch"] = {k: kwargs.pop(k) for k in BATCH_KNOBS}
        return fn(**kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


BATCH_KNOBS = (
    "max_outstanding",
    "num_workers",
    "rpm",
    "timeout_s",
    "max_failures",
    "heartbeat_s",
    "state_dir",
)


def _log_heartbeats() -> None:
    """The batch runner's log lines (heartbeats, resume, abort) on stderr."""
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("openbeepboop.client.runs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _Stderr:
    """sys.stderr as it is when written to (a progress display may have replaced it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openbeepboop")
# the common options may come before the command too; after it they win
@click.option(
    "--base-url",
    envvar=URL_VARS,
    show_envvar=True,
    help="Server URL (also accepted after the command).",
)
@click.option("--api-key", envvar=KEY_VARS, show_envvar=True, help=KEY_HELP)
@click.option(
    "--bootstrap",
    envvar="OPENBEEPBOOP_BOOTSTRAP",
    show_envvar=True,
    help="A swarm's DHT address(es) (also accepted after the command).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def main(base_url: str | None, api_key: str | None, bootstrap: str | None, as_json: bool) -> None:
    """Submit jobs to an OpenBeepBoop server and collect their results."""
    # the DHT library logs an error for every peer that did not reply in time: routine for a
    # client's lookups, noise on a terminal (the client's own warnings stay)
    for name in ("rpcudp", "kademlia"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@main.command()
@click.argument("prompt", required=False)
@click.option(
    "--model",
    "-m",
    default="gemma-3-270m",
    envvar=["OPENBEEPBOOP_MODEL", "OPENAI_MODEL"],
    show_default=True,
    show_envvar=True,
)
@click.option("--system", help="A system message before the prompt.")
@click.option("--max-tokens", type=int)
@click.option("--temperature", type=float)
@click.option("--priority", type=int, default=0, help="Higher runs first.")
@click.option("--node", help="Run only on the node of this name (or id); waits for it.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Run only on a node carrying this label (repeat: all of them).",
)
@click.option("--wait", is_flag=True, help="Wait and print the answer.")
@click.option(
    "--stream", is_flag=True, help="Print the answer's tokens as they are made, then a summary."
)
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A JSONL file of OpenAI batch lines or prompts (see docs/client.md).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --file: results JSONL [FILE.results.jsonl].",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="With --file: run lines again that an earlier run of the same content submitted.",
)
@click.option(
    "--cache",
    type=click.Choice(["use", "skip", "refresh"]),
    help="The server's response cache: use it, skip it, or run again and store the "
    "answer [use; with --fresh: refresh].",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    envvar="MAX_ATTEMPTS",
    show_envvar=True,
    help="Attempts the server gives each job [the server's setting].",
)
@_batch_options
@_connected
def submit(
    client: Client,
    prompt: str | None,
    model: str,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    priority: int,
    node: str | None,
    labels: tuple[str, ...],
    wait: bool,
    stream: bool,
    timeout: float | None,
    file: Path | None,
    output: Path | None,
    fresh: bool,
    cache: str | None,
    max_attempts: int | None,
    batch: dict[str, Any],
    as_json: bool,
) -> None:
    """Queue PROMPT (prints the job id), or with --wait print the answer. With --file,
    run a file of requests as one resumable run (heartbeat lines on stderr)."""
    if file is not None:
        from openbeepboop.cli.batch_file import run_file

        _log_heartbeats()
        summary = run_file(
            client,
            file,
            output,
            model=model,
            timeout=timeout,
            fresh=fresh,
            cache=cache,
            max_attempts=max_attempts,
            **batch,
        )
        if as_json:
            print_json(summary)
        sys.exit(1 if summary["failed"] else 0)
    if not prompt:
        raise click.UsageError("give a PROMPT or --file FILE")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    params: dict[str, Any] = {"model": model, "messages": messages, "priority": priority}
    given = {"max_tokens": max_tokens, "temperature": temperature, "node": node}
    given |= {"max_attempts": max_attempts, "cache": cache}
    params.update({k: v for k, v in given.items() if v is not None})
    if labels:
        params["node_labels"] = parse_labels(labels)
    job = client.chat.completions.create(**params)
    if stream:
        try:
            _stream_tokens(job)
        except KeyboardInterrupt:
            _cancel_on_interrupt(job)
        return
    if not wait:
        print_json(job.data) if as_json else click.echo(job.id)
        return
    click.echo(f"queued {job.id}; waiting...", err=True)
    try:
        job.get(wait=True, timeout=timeout)
    except KeyboardInterrupt:
        click.echo(
            f"\n{job.id} keeps running; cancel it with openbeepboop-client cancel {job.id}",
            err=True,
        )
        sys.exit(130)
    finally:
        if as_json:
            print_json(job.data)
    if not as_json:
        click.echo(_answer_text(job))


def _show_progress(event: dict[str, Any]) -> None:
    """A progress line on stderr, rewritten in place: `downloading 42% 105/253 MB`,
    `loading 50%`; a line of its own when it completes."""
    fraction = float(event.get("fraction") or 0.0)
    bar = "#" * int(fraction * 30)
    line = f"{event['type']:<11} [{bar:<30}] {fraction * 100:3.0f}%"
    if event["type"] == "downloading" and event.get("total"):
        line += f" {int(event.get('bytes') or 0) / 1e6:.0f}/{int(event['total']) / 1e6:.0f} MB"
    click.echo("\r" + line, nl=fraction >= 1.0, err=True)


def _cancel_on_interrupt(job: Job) -> None:
    """Ctrl+C while tokens stream: the job is cancelled (its node stops generating
    within about a second), then exit 130 as a shell expects after SIGINT."""
    click.echo()
    try:
        job.cancel()
    except OpenBeepBoopError as exc:
        click.echo(f"could not cancel {job.id}: {exc}", err=True)
        sys.exit(130)
    status = job.data.get("status")
    said = f"cancelled {job.id}" if status == "cancelled" else f"{job.id} already {status}"
    click.echo(said, err=True)
    sys.exit(130)


def _stream_tokens(job: Job) -> None:
    """Tokens to stdout as they come; a one-line summary (tokens, time, tokens/s) to
    stderr; exit 1 when the job fails."""
    click.echo(f"queued {job.id}", err=True)
    calls: dict[int, list[str]] = {}  # the first choice's tool calls: [name, arguments]
    for event in job.events():
        kind = event["type"]
        if kind == "queued" and event.get("waiting_for"):
            wanted = ", ".join(f"{k} {v}" for k, v in event["waiting_for"].items())
            click.echo(f"waiting for {wanted}: no live node matches yet...", err=True)
        if kind == "queued" and event.get("position"):
            eta = _starts_in(event.get("estimated_start_at"))
            click.echo(f"position {event['position']} in the queue{eta}...", err=True)
        elif kind in ("downloading", "loading"):  # the node fetches or loads the model
            _show_progress(event)
        elif kind == "token":
            click.echo(event["t"], nl=False)
            sys.stdout.flush()
        elif kind == "delta" and event["choice"].get("index") == 0:
            delta = event["choice"].get("delta") or {}
            if delta.get("content"):
                click.echo(delta["content"], nl=False)
            for call in delta.get("tool_calls") or ():
                have = calls.setdefault(call.get("index", 0), ["", ""])
                have[0] += (call.get("function") or {}).get("name") or ""
                have[1] += (call.get("function") or {}).get("arguments") or ""
        elif kind == "end":
            for name, arguments in calls.values():
                click.echo(f"\n[tool call] {name}({arguments})", nl=False)
            seconds = event["decode_time_ms"] / 1000
            rate = event["tokens_out"] / seconds if seconds > 0 else 0.0
            click.echo()
            click.echo(
                f"[{event['tokens_out']} tokens in {seconds:.2f} s, {rate:.1f} tokens/s, "
                f"stop: {event['stop_reason']}]",
                err=True,
            )
        elif kind in ("failed", "cancelled"):
            click.echo()
            detail = f": {event.get('code')}: {event.get('message')}" if kind == "failed" else ""
            click.echo(f"job {job.id} {kind}{detail}", err=True)
            sys.exit(1)


@main.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait until the job is done.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@_connected
def poll(client: Client, job_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Print a job's status, or its answer once it is done."""
    job = client.jobs.get(job_id)
    if wait:
        with contextlib.suppress(JobFailedError):  # reported below like any final state
            job.get(wait=True, timeout=timeout)
    if as_json:
        print_json(job.data)
    elif job.data["status"] == "completed":
        click.echo(_answer_text(job))
    elif job.data["status"] == "queued":
        click.echo("queued" + _queued_detail(job.data))
    else:
        error = job.error or {}
        detail = f": {error.get('code')}: {error.get('message')}" if error else ""
        click.echo(f"{job.data['status']}{detail}")
    if job.data["status"] in ("failed", "cancelled", "expired"):
        sys.exit(1)


def _queued_detail(data: dict[str, Any]) -> str:
    """': position 3, starts in about 12 s' for a queued job (what is known of it)."""
    position = data.get("queue_position")
    eta = _starts_in(data.get("estimated_start_at"))
    if not eta:
        return f": position {position}" if position else ""
    return f": position {position}{eta}"


def _starts_in(at: Any) -> str:
    """', starts in about 12 s' (or ', starts now') for an estimated start (epoch
    seconds); '' for none."""
    if not isinstance(at, int | float):
        return ""
    return f", {_starts_text(at - time.time())}"


def _starts_text(seconds: float) -> str:
    wait = _wait_text(seconds)
    return "starts now" if wait == "now" else f"starts in about {wait}"


def _wait_text(seconds: float) -> str:
    """'now', '12 s', '4m05s', '2h03m'."""
    if seconds < 1:
        return "now" if seconds < 0.5 else "1 s"
    return f"{seconds:.0f} s" if seconds < 60 else _duration(seconds)


@main.command()
@click.argument("job_id")
@_connected
def get(client: Client, job_id: str, as_json: bool) -> None:
    """Print a job in full."""
    job = client.jobs.get(job_id)
    if as_json:
        print_json(job.data)
        return
    for key in ("id", "status", "model", "priority", "attempts", "queue_position", "node_id"):
        click.echo(f"{key:<15} {job.data.get(key)}")
    at = job.data.get("estimated_start_at")
    if isinstance(at, int | float):
        click.echo(f"{'estimate':<15} {_starts_text(at - time.time())}")
    if job.data.get("error"):
        click.echo(f"{'error':<15} {job.data['error']}")
    if job.data["status"] == "completed":
        click.echo(f"{'answer':<15} {_answer_text(job)}")


@main.command()
@click.argument("job_id")
@_connected
def cancel(client: Client, job_id: str, as_json: bool) -> None:
    """Cancel a job that has not finished."""
    job = client.jobs.cancel(job_id)
    print_json(job.data) if as_json else click.echo(f"{job.id} {job.data['status']}")


@main.command("list")
@click.option(
    "--status",
    type=click.Choice(["queued", "in_progress", "completed", "failed", "cancelled", "expired"]),
)
@click.option("--model")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--after", help="A job id: list older jobs (paging).")
@_connected
def list_jobs(
    client: Client,
    status: str | None,
    model: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """Your jobs, newest first."""
    jobs = client.jobs.list(status=status, model=model, limit=limit, after=after)
    if as_json:
        print_json([j.data for j in jobs])
        return
    for j in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.data["created_at"]))
        click.echo(f"{j.id}  {j.data['status']:<11}  {j.data['model']:<20}  {created}")


@main.command()
@_connected
def models(client: Client, as_json: bool) -> None:
    """Models that live nodes serve now."""
    data = client.request("GET", "/v1/models")["data"]
    if as_json:
        print_json(data)
        return
    for m in data:
        click.echo(f"{m['id']:<30} {m.get('nodes', 0)} node(s)")


def _status_text(stats: dict[str, Any], nodes: list[dict[str, Any]]) -> str:
    lines = [
        f"{'model':<24} {'queued':>8} {'running':>8} {'done':>8} {'failed':>8} "
        f"{'jobs/s':>8} {'wait':>8}"
    ]
    etas = stats.get("eta") or {}
    for model, counts in sorted(stats["models"].items()):
        lines.append(
            f"{model:<24} {counts.get('queued', 0):>8} {counts.get('in_progress', 0):>8} "
            f"{counts.get('completed', 0):>8} {counts.get('failed', 0):>8} "
            + _pace_columns(etas.get(model) or {})
        )
    lines.append(f"\n{len(nodes)} live node(s)")
    for n in nodes:
        s = n.get("stats") or {}
        models_ = ", ".join(f"{m['name']} ({m.get('state', '?')})" for m in n["models"])
        lines.append(
            f"  {n['name']:<20} load {s.get('load', 0):<5} "
            f"{s.get('tokens_per_second', 0)} tok/s  {models_}"
        )
    return "\n".join(lines)


def _pace_columns(eta: dict[str, Any]) -> str:
    """A model's measured jobs per second, and how long a job queued now would wait
    ('-' where unknown)."""
    rate, wait = eta.get("jobs_per_second"), eta.get("wait_seconds")
    rate_text = f"{rate:.2f}" if isinstance(rate, int | float) else "-"
    wait_text = _wait_text(wait) if isinstance(wait, int | float) else "-"
    return f"{rate_text:>8} {wait_text:>8}"


def _model_line(model: dict[str, Any]) -> str:
    state = str(model.get("state", "?"))
    if state in ("downloading", "loading"):
        state += f" {float(model.get('progress') or 0) * 100:.0f}%"
    elif state == "error" and model.get("error"):
        state += f" ({model['error']})"
    return f"{model.get('name')}: {state}"


def _nodes_text(nodes: list[dict[str, Any]], now: float) -> str:
    if not nodes:
        return "no live node"
    lines = []
    for n in nodes:
        s = n.get("stats") or {}
        hw = n.get("hardware") or {}
        ago = max(0, round(now - float(n.get("last_seen") or now)))
        models_ = (s.get("models") if isinstance(s.get("models"), list) else None) or n["models"]
        lines.append(
            f"{n['name']}  ({n['id']}, {n.get('version', '?')})  heartbeat {ago} s ago  "
            f"load {s.get('load', 0)}  running {s.get('running', 0)}  "
            f"{s.get('tokens_per_second', 0)} tok/s"
        )
        if n.get("labels"):
            labels = ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))
            lines.append(f"  labels: {labels}")
        lines.append("  models: " + " · ".join(_model_line(m) for m in models_))
        gpus = ", ".join(g.get("name", "?") for g in hw.get("gpus") or []) or "none"
        ram = f"{hw['ram_bytes'] / 2**30:.0f} GiB RAM" if hw.get("ram_bytes") else "RAM ?"
        lines.append(
            f"  hardware: {hw.get('cpu', '?')}, {hw.get('cpus', '?')} cpus, {ram}, GPUs: {gpus}"
        )
    return "\n".join(lines)


@main.command()
@click.option("--watch", is_flag=True, help="Refresh until Ctrl+C.")
@click.option("--interval", type=float, default=1.0, show_default=True)
@_connected
def nodes(client: Client, watch: bool, interval: float, as_json: bool) -> None:
    """Live nodes: their models' states (with download and loading progress), load,
    speed, last heartbeat and hardware."""
    if not watch:
        data = client.request("GET", "/v1/nodes")["data"]
        print_json(data) if as_json else click.echo(_nodes_text(data, time.time()))
        return
    from rich.live import Live
    from rich.text import Text

    try:
        with Live(Text("..."), refresh_per_second=4, screen=False) as live:
            while True:
                data = client.request("GET", "/v1/nodes")["data"]
                live.update(Text(_nodes_text(data, time.time())))
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--watch", is_flag=True, help="Refresh until Ctrl+C.")
@click.option("--interval", type=float, default=2.0, show_default=True)
@_connected
def status(client: Client, watch: bool, interval: float, as_json: bool) -> None:
    """Queue depth per model (with its measured jobs/s and how long a job queued now
    would wait), and the live nodes."""

    def snapshot() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return client.request("GET", "/v1/stats"), client.request("GET", "/v1/nodes")["data"]

    if not watch:
        stats, nodes = snapshot()
        print_json({"stats": stats, "nodes": nodes}) if as_json else click.echo(
            _status_text(stats, nodes)
        )
        return
    from rich.live import Live
    from rich.text import Text

    try:
        with Live(Text("..."), refresh_per_second=4, screen=False) as live:
            while True:
                stats, nodes = snapshot()
                live.update(Text(_status_text(stats, nodes)))
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


def _swarm_rows(client: Client) -> list[dict[str, Any]]:
    """What the swarm's DHT lists, one dict per member (the record, plus its uptime,
    the record's age and whether the member answered its `/status` just now)."""
    now = time.time()
    discovery = client.discovery
    rows = []
    for record in client.swarm_members():
        row = record.model_dump(exclude={"sig", "v"})
        row["uptime"] = round(record.uptime, 1)
        row["age"] = round(max(0.0, now - record.ts), 1)
        row["reachable"] = discovery is None or not discovery.is_down(record.url)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["name"] or r["id"], r["id"]))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _swarm_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "the swarm lists no member"
    lines = [f"{len(rows)} member(s)"]
    for r in rows:
        state = "" if r["reachable"] else "  UNREACHABLE"
        lines.append(
            f"{r['name'] or '-'}  ({r['id']}, {r['version'] or '?'})  {r['url']}{state}\n"
            f"  queued {r['queued']}  running {r['running']}  nodes {r['nodes']}  "
            f"{r['tokens_per_s']:.1f} tok/s  up {_duration(r['uptime'])}  "
            f"record {r['age']:.0f} s old"
        )
        for name, load in sorted(r["models"].items()):
            lines.append(
                f"  {name:<28} queued {load['queued']:<6} running {load['running']:<4} "
                f"nodes {load['nodes']}"
            )
    return "\n".join(lines)


@main.command()
@click.option("--watch", is_flag=True, help="Refresh until Ctrl+C.")
@click.option("--interval", type=float, default=3.0, show_default=True)
@_connected
def swarm(client: Client, watch: bool, interval: float, as_json: bool) -> None:
    """The servers a swarm's DHT lists (--bootstrap): id, name, URL, models with their
    queue depth, running jobs and nodes, tokens/s, uptime and the record's age."""
    if client.discovery is None:
        raise click.UsageError("give --bootstrap HOST:PORT (or set OPENBEEPBOOP_BOOTSTRAP)")
    if not watch:
        rows = _swarm_rows(client)
        print_json(rows) if as_json else click.echo(_swarm_text(rows))
        return
    try:
        if as_json:  # one JSON document a line, for scripts that follow the swarm
            while True:
                print_json(_swarm_rows(client))
                sys.stdout.flush()
                time.sleep(interval)
        from rich.live import Live
        from rich.text import Text

        with Live(Text("..."), refresh_per_second=4, screen=False) as live:
            while True:
                live.update(Text(_swarm_text(_swarm_rows(client))))
                time.sleep(interval)
    except KeyboardInterrupt:
        pass


main.add_command(__import__("openbeepboop.cli.batches", fromlist=["batches"]).batches)

if __name__ == "__main__":
    main()
