"""Both kinds of batch as rows: the server's OpenAI batches and the batch runner's local
runs; found by id or name, cancelled, their files downloaded. `cli/batches.py` holds the
commands over them."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import httpx

from openbeepboop.client import (
    APIConnectionError,
    AsyncClient,
    Client,
    NotFoundError,
    run_state,
    runs,
)
from openbeepboop.client.errors import from_response

# server batch states that cancel can still act on
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = ("validating", "in_progress")
CANCEL_REASON = "cancelled with openbeepboop-client batches cancel"
PAGE = 100


class Refused(Exception):
    """A user mistake the command reports in one line, with its exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Row:
    """One batch as `status` shows it."""

    kind: str  # "server" | "local"
    id: str
    name: str | None
    status: str
    total: int
    completed: int
    failed: int
    created_at: float
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        return (self.completed + self.failed) / self.total if self.total else 0.0

    @property
    def final(self) -> bool:
        if self.kind == "server":
            return self.status not in ACTIVE
        return self.status != "incomplete"

    @property
    def cancellable(self) -> bool:
        return self.status in CANCELLABLE if self.kind == "server" else not self.final

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["progress"] = round(self.progress, 4)
        data.update(data.pop("detail"))
        return data


def server_row(batch: dict[str, Any]) -> Row:
    counts = batch.get("request_counts") or {}
    metadata = batch.get("metadata") or {}
    return Row(
        "server",
        batch["id"],
        metadata.get("name"),
        batch["status"],
        int(counts.get("total") or 0),
        int(counts.get("completed") or 0),
        int(counts.get("failed") or 0),
        float(batch.get("created_at") or 0),
        {"endpoint": batch.get("endpoint"), "metadata": metadata},
    )


def local_row(run: runs.RunSummary) -> Row:
    return Row(
        "local",
        run.id,
        run.name,
        run.status,
        run.total,
        run.done - run.failed,
        run.failed,
        run.created_at,
        {"path": str(run.path), "base_url": run.base_url, "metadata": run.metadata},
    )


# -- the connection ------------------------------------------------------------------------


@dataclass
class Conn:
    """The common options; clients are made when a command first needs one (a local
    run's results need no server)."""

    base_url: str | None
    api_key: str | None
    bootstrap: str | None
    state_dir: Path | None
    clients: dict[str | None, Client] = field(default_factory=dict)

    def client(self, url: str | None = None) -> Client:
        """The client for the server the options and environment name; `url`, a state
        file's, only when it is that server (see `url_for`)."""
        url = self.url_for(url)
        if url not in self.clients:
            bootstrap = None if url else self.bootstrap
            try:
                self.clients[url] = Client(url or self.base_url, self.api_key, bootstrap=bootstrap)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--bootstrap") from exc
        return self.clients[url]

    def url_for(self, url: str | None) -> str | None:
        """None (the usual server) for a state file's `url`: with --base-url given, or
        when it is the usual server. A state file naming another server is refused: the
        key is not sent where a file (perhaps planted) says."""
        if url is None or self.base_url:
            return None
        usual = self.client().base_url
        if url.rstrip("/").removesuffix("/v1") == usual:
            return None
        raise Refused(
            f"a run's state file names the server {url}, not {usual} (the one your "
            f"settings name); if you trust it, give --base-url {url}"
        )

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def server_batches(self) -> list[dict[str, Any]]:
        """Every batch of the key, all pages, newest first."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            query = f"?limit={PAGE}" + (f"&after={after}" if after else "")
            page = self.client().request("GET", "/v1/batches" + query)
            found += page["data"]
            if not page.get("has_more") or not page["data"]:
                return found
            after = page["last_id"]

    def local_runs(self) -> list[runs.RunSummary]:
        return runs.list_runs(self.state_dir)

    def find(self, ref: str) -> Row:
        """A server batch by id, a local run by id, unique id prefix or name, else the
        newest server batch of that name."""
        if ref.startswith("batch_"):
            try:
                return server_row(self.client().request("GET", f"/v1/batches/{ref}"))
            except NotFoundError:
                pass
        try:
            return local_row(runs.find_run(ref, self.state_dir))
        except LookupError as exc:
            local = _reason(exc)
        if not ref.startswith(("batch_", "run_")):
            named = [
                b for b in self.server_batches() if (b.get("metadata") or {}).get("name") == ref
            ]
            if named:
                return server_row(named[0])
        if ref.startswith("run_"):
            raise Refused(local, 5)
        raise Refused(f"{local}; no server batch has that id or name either", 5)

    def download(self, file_ids: list[str], out: IO[bytes]) -> None:
        """Files' bytes from the Files API into `out`, as they arrive."""
        asyncio.run(_download(self.base_url, self.api_key, file_ids, out))


async def _download(
    base_url: str | None, api_key: str | None, file_ids: list[str], out: IO[bytes]
) -> None:
    # the content is JSONL, not the JSON `Client.request` parses; the URL and key are
    # the ones the client resolves (options, environment, the local key)
    async with AsyncClient(base_url, api_key) as client:
        headers = {"Authorization": f"Bearer {client.api_key}"} if client.api_key else {}
        try:
            async with httpx.AsyncClient(base_url=client.base_url, timeout=60) as http:
                for file_id in file_ids:
                    path = f"/v1/files/{file_id}/content"
                    async with http.stream("GET", path, headers=headers) as r:
                        if r.status_code >= 400:
                            await r.aread()
                            raise from_response(r.status_code, _json_or_text(r))
                        async for chunk in r.aiter_bytes():
                            out.write(chunk)
        except httpx.HTTPError as exc:
            raise APIConnectionError(
                f"cannot reach the OpenBeepBoop server at {client.base_url}: {exc}"
            ) from exc


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return {"error": {"message": r.text[:500]}}


def _reason(exc: LookupError) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def cancel_row(conn: Conn, row: Row) -> str:
    """Cancel one batch; what happened, as a line."""
    if row.final or row.status == "cancelling":
        return f"{row.id} is already {row.status}"
    if row.kind == "server":
        if not row.cancellable:
            return f"{row.id} is {row.status} and cannot be cancelled now"
        batch = conn.client().request("POST", f"/v1/batches/{row.id}/cancel")
        return f"{row.id} {batch['status']}"
    return cancel_run(conn, runs.find_run(row.id, conn.state_dir))


def cancel_run(conn: Conn, run: runs.RunSummary) -> str:
    """Cancel a local run's jobs that have no answer yet, note each one's final state in
    the state file as the runner would (a job that finished meanwhile keeps its answer),
    then mark the run cancelled. A later `resume` runs only what was never submitted."""
    record = run_state.load(run.path)
    lines = []
    for i, submitted in sorted(record.submitted.items()):
        if i in record.done:
            continue
        client = conn.client(submitted.get("server") or run.base_url)  # refused if another
        try:
            job = client.jobs.cancel(str(submitted["job"])).data
        except NotFoundError:
            continue  # gone from the server (retention): a resume notes it
        stopped = job.get("status") == "cancelled"
        error = {"code": "cancelled", "message": CANCEL_REASON} if stopped else job.get("error")
        line = {"done": i, "job": job.get("id"), "status": job.get("status")}
        lines.append(line | {"result": job.get("result"), "error": error})
    with run_state.RunWriter(run.path) as writer:
        writer.write(lines)
    runs.mark_run(run, "cancelled", CANCEL_REASON)
    stopped = sum(line["status"] == "cancelled" for line in lines)
    label = f" ({run.name})" if run.name else ""
    return f"{run.id}{label} cancelled ({stopped} job(s) stopped)"
