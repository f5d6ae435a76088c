"""Hostile input and secrets: JSON nested 100,000 deep, strings no store can keep (NUL, lone
surrogates) on SQLite and PostgreSQL, 1,100 slow connections under a 1,024-file limit, a
200 kB header, file modes under umask 022, and no key material in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from openbeepboop.server.core import json_input
from openbeepboop.server.errors import InvalidRequest
from tests.conftest import Api, ServerProcess, cli, free_port, serve_in_process

DEEP = b"[" * 100_000 + b"]" * 100_000
JSON_TYPE = {"content-type": "application/json"}
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


def assert_error(r: httpx.Response, code: str, param: str | None = None) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error


# -- depth ------------------------------------------------------------------------------

# every route with a JSON body, fast lane ones first; (path, role, a valid body)
ROUTES = [
    ("/v1/chat/completions", "client", CHAT),
    ("/v1/completions", "client", {"model": "echo", "prompt": "hi"}),
    ("/v1/jobs", "client", {"body": CHAT}),
    ("/internal/queue/fetch", "node", {"node_id": "n", "models": ["echo"]}),
    ("/internal/queue/submit", "node", {"results": [{"job_id": "j", "lease_id": "l"}]}),
    ("/v1/results/poll", "client", {"ids": ["job_x"]}),
    ("/internal/nodes/register", "node", {"models": [{"name": "echo"}]}),
    ("/internal/queue/heartbeat", "node", {"node_id": "n"}),
    ("/internal/queue/events", "node", {"events": []}),
]


@pytest.mark.parametrize(("path", "role", "body"), ROUTES, ids=[r[0] for r in ROUTES])
async def test_json_nested_too_deep_is_a_400_on_every_route(
    api: Api, path: str, role: str, body: dict[str, Any]
) -> None:
    headers = api.h(api.client if role == "client" else api.node, **JSON_TYPE)
    r = await api.http.post(path, content=DEEP, headers=headers)  # too deep to parse
    assert_error(r, "too_deep")
    # parseable, but 80 levels inside an otherwise valid body
    r = await api.http.post(path, json={**body, "extra": nested(80)}, headers=headers)
    assert_error(r, "too_deep", "extra" + ".a" * 63)


async def test_templates_and_a_batch_line_are_held_to_the_same_depth(api: Api) -> None:
    r = await api.http.post(
        "/v1/templates",
        json={"name": "deep", "streams": [{"settings": nested(70), "messages": []}]},
        headers=api.h(api.client),
    )
    assert_error(r, "too_deep")
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions"}
    for body, why in ((nested(70), "nests deeper"), ({**CHAT, "user": "a\x00b"}, "NUL")):
        data = json.dumps({**line, "body": body}).encode() + b"\n"
        r = await api.http.post(
            "/v1/files",
            files={"file": ("in.jsonl", data)},
            data={"purpose": "batch"},
            headers=api.h(api.client),
        )
        assert r.status_code == 400, r.text
        assert "line 1" in r.json()["error"]["message"] and why in r.text
    assert (await api.http.get("/v1/files", headers=api.h(api.client))).json()["data"] == []


def test_the_depth_limit_is_64() -> None:
    json_input.check(nested(64))
    with pytest.raises(InvalidRequest) as caught:
        json_input.check(nested(65))
    assert caught.value.code == "too_deep"


# -- strings no store can keep ------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store_api(
    request: pytest.FixtureRequest, tmp_path: Path, fast_lane: bool
) -> AsyncIterator[Api]:
    overrides: dict[str, Any] = {"rate_limit": "", "model_wait_seconds": 0.2}
    if request.param == "sqlite":
        async with serve_in_process(tmp_path, fast_lane=fast_lane, **overrides) as a:
            yield a
        return
    from tests.pg import temp_database

    async with (
        temp_database(request.getfixturevalue("postgres")) as url,
        serve_in_process(tmp_path, fast_lane=fast_lane, database_url=url, **overrides) as a,
    ):
        yield a


# (path, role, raw JSON body, the param the 400 names)
UNSTORABLE = [
    ("/v1/results/poll", "client", b'{"ids": ["job_a", "\\ud800"]}', "ids[1]"),
    ("/v1/results/poll", "client", b'{"ids": ["job_a", "\xed\xa0\x80"]}', "ids[1]"),
    (
        "/v1/chat/completions",
        "client",
        b'{"model": "echo\\u0000evil", "messages": [{"role": "user", "content": "x"}]}',
        "model",
    ),
    (
        "/v1/chat/completions",
        "client",
        b'{"model": "echo", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
        "messages[0].content",
    ),
    ("/v1/completions", "client", b'{"model": "echo", "prompt": ["ok", "\\u0000"]}', "prompt[1]"),
    ("/v1/jobs", "client", b'{"body": {"model": "echo", "k\\u0000": 1}}', "body"),
    (
        "/v1/jobs",
        "client",
        b'{"jobs": [{"body": {"model": "echo", "messages": []}, "metadata": {"m": "\\u0000"}}]}',
        "jobs[0].metadata.m",
    ),
    (
        "/internal/nodes/register",
        "node",
        b'{"models": [{"name": "echo\\u0000evil"}]}',
        "models[0].name",
    ),
    (
        "/internal/queue/fetch",
        "node",
        b'{"node_id": "n", "models": ["\\ud83d"]}',
        "models[0]",
    ),
]


async def test_a_nul_or_a_lone_surrogate_is_a_400_naming_the_field(store_api: Api) -> None:
    api = store_api
    for path, role, raw, param in UNSTORABLE:
        key = api.client if role == "client" else api.node
        headers = api.h(key, Prefer="respond-async", **JSON_TYPE)
        r = await api.http.post(path, content=raw, headers=headers)
        assert_error(r, "invalid_string", param)
    assert (await api.http.get("/v1/jobs", headers=api.h(api.admin))).json()["data"] == []


async def test_urls_and_upload_names_with_a_nul_are_refused_and_real_text_kept(
    store_api: Api,
) -> None:
    api = store_api
    for url, param in (("/v1/jobs/job_x%00", "path"), ("/v1/jobs?after=a%00b", "after")):
        assert_error(await api.http.get(url, headers=api.h(api.client)), "invalid_string", param)
    form = (  # by hand: httpx would escape the NUL
        b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n{}\n\r\n--XyZ--\r\n"
    )
    r = await api.http.post(
        "/v1/files",
        content=form,
        headers=api.h(api.client, **{"content-type": "multipart/form-data; boundary=XyZ"}),
    )
    assert_error(r, "invalid_string", "file")
    # text that only looks suspicious is kept as sent: escapes, Hangul (0xED bytes), emoji
    text = "한국어 \U0001f600 \\u0000 \u00e9"
    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
    node_id = await api.register(["echo"])
    for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode()):
        r = await api.http.post(
            "/v1/chat/completions",
            content=raw,
            headers=api.h(api.client, Prefer="respond-async", **JSON_TYPE),
        )
        assert r.status_code == 202, r.text
        fetched = await api.http.post(
            "/internal/queue/fetch",
            json={"node_id": node_id, "models": ["echo"]},
            headers=api.h(api.node),
        )
        [job] = fetched.json()["jobs"]
        assert job["request"]["messages"][0]["content"] == text


# -- real servers: WebSocket frames, headers, files, logs (one server), slow clients ------


class CommandServer(ServerProcess):
    """`openbeepboop-server start` with extra arguments, and `preexec` in the child."""

    args: tuple[str, ...] = ()

    def preexec(self) -> None:
        pass

    def _spawn(self, out: Any) -> subprocess.Popen[bytes]:
        where = ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        return subprocess.Popen(
            [sys.executable, "-m", "openbeepboop.cli.server", "start", *self.args, *where],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            preexec_fn=self.preexec,
        )


class AccessLogServer(CommandServer):
    args = ("--access-log",)


def start_server(cls: type[CommandServer], data_dir: Path, **env: str) -> CommandServer:
    keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
    server = cls(data_dir, free_port(), keys, {"OPENBEEPBOOP_RATE_LIMIT": "", **env})
    server.start()
    return server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CommandServer]:
    """One server for this section, set up and started under umask 022, access log on;
    its log is read for key material at the end."""
    old = os.umask(0o022)
    try:
        server = start_server(
            AccessLogServer,
            tmp_path_factory.mktemp("served") / "data",
            OPENBEEPBOOP_HEADER_TIMEOUT_SECONDS="2",
            OPENBEEPBOOP_BODY_TIMEOUT_SECONDS="1",
            OPENBEEPBOOP_MAX_CONNECTIONS_PER_CLIENT="20",
        )
    finally:
        os.umask(old)
    yield server
    server.kill(signal.SIGTERM)


def test_websocket_frames_are_held_to_the_same_rules(served: CommandServer) -> None:
    url = f"ws://127.0.0.1:{served.port}/ws"

    async def main() -> list[dict[str, Any]]:
        got = []
        headers = {"Authorization": f"Bearer {served.keys['client_key']}"}
        async with connect(url, additional_headers=headers) as ws:
            add = {"type": "add", "id": "a", "assistant": {"streams": []}}
            for frame in (
                json.dumps({**add, "query": "x\x00y"}),
                '{"type": "add", "id": "b", "query": "\\udc00"}',
                json.dumps({**add, "history": [nested(70)]}),
                "[" * 100_000 + "]" * 100_000,
            ):
                await ws.send(frame)
                got.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "listen", "job_id": "job_nope"}))
            got.append(json.loads(await ws.recv()))  # still open and answering
        return got

    got = asyncio.run(main())
    codes = [g.get("code") for g in got]
    assert codes == ["invalid_string", "invalid_string", "too_deep", "too_deep", "job_not_found"]
    assert [g.get("param") for g in got[:2]] == ["query", "query"]


def test_a_200_kb_header_is_refused_and_a_60_kb_one_served(served: CommandServer) -> None:
    r = httpx.get(served.url + "/health", headers={"x-big": "a" * 200_000})
    assert r.status_code == 431
    assert httpx.get(served.url + "/health", headers={"x-big": "a" * 60_000}).status_code == 200


def read_all(sock: socket.socket, limit: float) -> bytes:
    """What the server sends until it closes the connection (or `limit` seconds pass)."""
    sock.settimeout(limit)
    got = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            got += chunk
    return got


def test_slow_headers_slow_bodies_and_too_many_connections_are_cut_off(
    served: CommandServer,
) -> None:
    address = ("127.0.0.1", served.port)
    t0 = time.monotonic()
    with socket.create_connection(address) as silent, socket.create_connection(address) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert read_all(silent, 10).startswith(b"HTTP/1.1 408 ")
        assert read_all(slow, 10).startswith(b"HTTP/1.1 408 ")
    assert 1.5 < time.monotonic() - t0 < 6
    with socket.create_connection(address) as stalled:
        stalled.sendall(
            b"POST /v1/results/poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"ids": '
        )
        t0 = time.monotonic()
        read_all(stalled, 10)  # closed, the body never finished
        assert time.monotonic() - t0 < 5
    held = [socket.create_connection(address) for _ in range(20)]
    try:
        time.sleep(0.2)
        with socket.create_connection(address) as extra:
            assert read_all(extra, 5).startswith(b"HTTP/1.1 429 ")
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=other) as client:  # another address is not held back
            assert client.get(served.url + "/health").status_code == 200
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(served.url + "/health").status_code == 200  # the count went down


def test_data_files_are_private_whatever_the_umask(served: CommandServer, tmp_path: Path) -> None:
    r = httpx.post(
        served.url + "/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {served.keys['client_key']}", "Prefer": "respond-async"},
    )
    assert r.status_code == 202  # a write: the WAL holds it
    from openbeepboop.node.config import NodeConfig, write_node_config

    node_file = tmp_path / "new" / "node" / "node.toml"
    config = NodeConfig.model_validate(
        {
            "server": {"url": served.url, "api_key": "k"},
            "models": [{"name": "e", "backend": "echo"}],
        }
    )
    old = os.umask(0o022)
    try:
        write_node_config(config, node_file)
    finally:
        os.umask(old)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    data = served.data_dir
    assert mode(data) == 0o700
    db = data / "openbeepboop.db"
    for path in (data / "server.toml", db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert mode(path) == 0o600, path
    assert mode(node_file) == 0o600
    assert mode(node_file.parent) == mode(node_file.parent.parent) == 0o700


KEY_MATERIAL = re.compile(r"obb_(?:admin|client|node)_[A-Za-z0-9_-]{20,}")


def test_no_log_line_holds_a_key(served: CommandServer) -> None:
    """Last of the section: every line the shared server logged, keys given in headers,
    in `?api_key=` (HTTP and WebSocket), wrong and revoked ones too."""
    keys = served.keys
    client, admin = keys["client_key"], keys["admin_key"]
    httpx.get(f"{served.url}/health?api_key={client}")
    httpx.get(f"{served.url}/v1/jobs?token={admin}&limit=1")
    httpx.get(served.url + "/v1/jobs", headers={"Authorization": f"Bearer {client}x"})
    made = httpx.post(
        served.url + "/v1/admin/keys",
        json={"role": "client"},
        headers={"Authorization": f"Bearer {admin}"},
    ).json()

    async def ws() -> None:
        for key in (client, made["key"], client + "bad"):
            with contextlib.suppress(Exception):
                async with connect(f"ws://127.0.0.1:{served.port}/ws?api_key={key}") as w:
                    await w.send(json.dumps({"type": "listen", "job_id": "job_x"}))
                    await w.recv()

    asyncio.run(ws())
    served.kill(signal.SIGTERM)  # every line written
    log = served.log.read_text()  # type: ignore[union-attr]
    assert "/ws?api_key=obb_client_" in log and "GET /health?api_key=obb_client_" in log
    assert KEY_MATERIAL.findall(log) == []
    secrets = [v for v in (*keys.values(), made["key"]) if isinstance(v, str) and "obb_" in v]
    assert len(secrets) == 4
    for secret in secrets:
        assert secret[15:35] not in log


class LimitedServer(CommandServer):
    """A server whose open-files limit is 1,024, hard and soft: it cannot raise it."""

    def preexec(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


class SlowLoris:
    """`count` connections from 127.0.0.1, each sending a header byte every second and
    opened again when the server closes it."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.stop = threading.Event()
        self.opened = 0
        self.refused = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            s.setblocking(False)
            self.opened += 1
            return s
        except OSError:
            self.refused += 1
            return None

    def _run(self) -> None:
        socks: list[socket.socket | None] = [self._open() for _ in range(self.count)]
        while not self.stop.wait(1.0):
            for i, s in enumerate(socks):
                try:
                    if s is None:
                        raise OSError
                    s.send(b"X")
                except OSError:
                    if s is not None:
                        s.close()
                    socks[i] = self._open()
        for s in socks:
            if s is not None:
                s.close()


def test_1100_slow_connections_under_a_1024_file_limit_do_not_starve_others(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # this test's own sockets
    server = start_server(LimitedServer, tmp_path / "data", OPENBEEPBOOP_HEADER_TIMEOUT_SECONDS="2")
    loris = SlowLoris(server.port, 1100)
    loris.thread.start()
    key = server.keys["client_key"]
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # another client address
    latencies = []
    try:
        time.sleep(2.5)  # the flood is in place, and the first slow ones timed out
        with httpx.Client(base_url=server.url, transport=transport, timeout=10) as client:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = client.post(
                    "/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {key}", "Prefer": "respond-async"},
                )
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 202, r.text
                assert client.get("/health").status_code == 200
    finally:
        loris.stop.set()
        loris.thread.join(timeout=30)
        server.kill(signal.SIGTERM)
    assert loris.opened >= 1100  # the flood really came (and came back when closed)
    assert len(latencies) >= 20
    p50 = statistics.median(latencies)
    assert p50 < 0.25 and max(latencies) < 2, (p50, max(latencies))
    log = server.log.read_text()  # type: ignore[union-attr]
    assert "Too many open files" not in log and "Traceback" not in log
