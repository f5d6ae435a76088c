"""Fair share, end to end: a real server, a real echo node and three keys. One key floods
the queue; the others' jobs are served at once, not after the flood, and the position a
job is told counts the turns before it, not the rows. Groups and weights are set with
the server's CLI while it runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from openbeepboop.cli.server import main
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Procs,
    auth,
    echo_model,
    new_server,
    node_id_of,
    start_node,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)
FLOOD = 400


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("fair")
    server = new_server(tmp / "data")
    procs = Procs()
    try:
        models = [echo_model(delay_ms=10, concurrency=4)]
        config = write_config(tmp / "node.toml", server, models)
        node_id_of(start_node(procs, config))
        yield server, tmp
    finally:
        procs.close()
        server.kill()


def run(*args: str, code: int = 0) -> Any:
    """`openbeepboop-server ARGS` in this process (the same command, without a process
    start per call): its JSON output, or its error message when `code` is not 0."""
    out = CliRunner().invoke(main, list(args))
    assert out.exit_code == code, (args, out.output, out.exception)
    if code:
        assert "Traceback" not in out.output
        return out.output
    return json.loads(out.output)


def new_client_key(server: ServerProcess, name: str) -> str:
    data = str(server.data_dir)
    made = run("keys", "create", "--data-dir", data, "--role", "client", "--name", name, "--json")
    return str(made["key"])


def body(text: str) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}]}


def submit(server: ServerProcess, key: str, texts: list[str]) -> list[dict[str, Any]]:
    jobs = [{"body": body(t)} for t in texts]
    r = httpx.post(f"{server.url}/v1/jobs", json={"jobs": jobs}, headers=auth(key), timeout=30)
    assert r.status_code in (200, 201, 202), r.text
    return list(r.json()["data"])


def submit_one(server: ServerProcess, key: str, text: str) -> dict[str, Any]:
    one = {"body": body(text)}
    r = httpx.post(f"{server.url}/v1/jobs", json=one, headers=auth(key), timeout=30)
    assert r.status_code == 202, r.text
    return dict(r.json())


def job(server: ServerProcess, key: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_flood_does_not_hold_back_the_others(rig: tuple[ServerProcess, Path]) -> None:
    server, _ = rig
    flooder, b, c = (new_client_key(server, n) for n in ("flood", "bee", "sea"))
    flood = submit(server, flooder, [f"line {i}" for i in range(FLOOD)])
    told = [submit_one(server, k, f"mine {i}") for i in range(3) for k in (b, c)]
    # each is told the turns before it (one of the flooder's, the others' before it), not
    # the hundreds of rows queued ahead
    assert all(t["queue_position"] is not None and t["queue_position"] <= 6 for t in told), [
        t["queue_position"] for t in told
    ]
    owners = [k for _ in range(3) for k in (b, c)]

    def finished() -> list[dict[str, Any]] | None:
        now = [job(server, k, t["id"]) for k, t in zip(owners, told, strict=True)]
        return now if all(j["status"] == "completed" for j in now) else None

    done = wait_until(finished, 60, "the others' jobs to complete")
    last_started = max(float(j["started_at"]) for j in done)
    # the flood was far from done when the last of theirs started
    flood_started = [
        j for j in (job(server, flooder, f["id"]) for f in flood[-40:]) if j["started_at"]
    ]
    assert all(float(j["started_at"]) > last_started for j in flood_started)
    queued = job(server, flooder, flood[-1]["id"])
    if queued["status"] == "queued":  # its position: the flood ahead of it, counted
        assert queued["queue_position"] >= 1


def test_groups_and_weights_from_the_cli(rig: tuple[ServerProcess, Path]) -> None:
    server, _ = rig
    data = str(server.data_dir)
    made = run("keys", "create", "--data-dir", data, "--role", "client", "--group", "lab", "--json")
    assert made["group"] == "lab"
    listed = {k["id"]: k for k in run("keys", "list", "--data-dir", data, "--json")}
    assert listed[made["id"]]["group"] == "lab"
    moved = run("keys", "group", made["id"], "--data-dir", data, "--json")
    assert moved == {"id": made["id"], "group": None}
    run(
        "shares",
        "set",
        "lab",
        "--weight",
        "2.5",
        "--jobs-per-hour",
        "9",
        "--data-dir",
        data,
        "--json",
    )
    [lab] = [s for s in run("shares", "list", "--data-dir", data, "--json") if s["name"] == "lab"]
    assert (lab["weight"], lab["jobs_per_hour"], lab["tokens_per_hour"]) == (2.5, 9, None)
    run("shares", "unset", "lab", "--data-dir", data, "--json")
    assert all(s["name"] != "lab" for s in run("shares", "list", "--data-dir", data, "--json"))
    for bad, says in (
        (["shares", "set", "a b"], "a group's name or a key id"),
        (["shares", "set", "lab", "--weight", "0"], "above 0"),
        (["shares", "set", "lab", "--weight", "nan"], "above 0"),
        (["shares", "unset", "nobody"], "no share 'nobody'"),
        (["keys", "create", "--role", "client", "--group", "key_x"], "may not start"),
        (["keys", "group", "key_0123456789abcdef", "lab"], "no key with id"),
    ):
        assert says in run(*bad, "--data-dir", data, code=1)


def test_groups_and_weights_over_http(rig: tuple[ServerProcess, Path]) -> None:
    server, _ = rig
    admin = auth(server.keys["admin_key"])

    def call(method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, server.url + path, headers=admin, timeout=10, **kw)

    made = call("POST", "/v1/admin/keys", json={"role": "client", "group": "lab2"})
    assert made.status_code == 201 and made.json()["group"] == "lab2"
    key_id = made.json()["id"]
    moved = call("POST", f"/v1/admin/keys/{key_id}/group", json={"group": "lab3"})
    assert moved.status_code == 200 and moved.json()["group"] == "lab3"
    put = call("PUT", "/v1/admin/shares/lab3", json={"weight": 4, "tokens_per_hour": 1000})
    assert put.status_code == 200, put.text
    assert (put.json()["weight"], put.json()["tokens_per_hour"]) == (4.0, 1000)
    listed = call("GET", "/v1/admin/shares").json()["data"]
    assert [s["weight"] for s in listed if s["name"] == "lab3"] == [4.0]
    assert call("DELETE", "/v1/admin/shares/lab3").status_code == 200
    for method, path, payload, status, param in (
        ("PUT", "/v1/admin/shares/lab3", {"weight": 0}, 400, "weight"),
        ("PUT", "/v1/admin/shares/a%20b", {}, 400, "name"),
        ("POST", f"/v1/admin/keys/{key_id}/group", {"group": "key_1"}, 400, "group"),
        ("POST", "/v1/admin/keys/key_0123456789abcdef/group", {"group": "x"}, 404, "key_id"),
        ("DELETE", "/v1/admin/shares/lab3", None, 404, "name"),
    ):
        r = call(method, path, json=payload)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]["param"] == param, r.text
    r = httpx.get(
        server.url + "/v1/admin/shares", headers=auth(server.keys["client_key"]), timeout=10
    )
    assert r.status_code == 403
