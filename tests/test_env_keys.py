"""Keys the operator gives the server (containers): `admin_key`, `node_key`, `client_key`
from OPENBEEPBOOP_<ROLE>_KEY or the file OPENBEEPBOOP_<ROLE>_KEY_FILE names, made sure
of at every start; `keys generate`; `setup --no-keys`.

In-process tests use `create_app` with a real SQLite store; the others run real
`openbeepboop-server` processes (PostgreSQL for two replicas starting at once)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.keys import (
    KEY_PATTERN,
    GivenKey,
    given_keys,
    hash_key,
    key_problem,
    new_key,
)
from openbeepboop.server.core.signed_keys import new_signed_key
from openbeepboop.server.http.app import create_app, open_store
from openbeepboop.server.http.log_redaction import redact
from openbeepboop.server.models import ApiKey, Role
from openbeepboop.server.settings import ConfigError, StartupRefused, load_settings
from openbeepboop.swarm.secret import SwarmSecret
from tests.conftest import ServerProcess, free_port

CLI = [sys.executable, "-m", "openbeepboop.cli.server"]
VARIABLES = [
    f"OPENBEEPBOOP_{role}_KEY{tail}"
    for role in ("ADMIN", "NODE", "CLIENT")
    for tail in ("", "_FILE")
]


def secret(role: Role) -> str:
    return new_key(role).secret


@pytest.fixture(autouse=True)
def no_given_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key variable leaks in from the environment the tests run in."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@asynccontextmanager
async def running(data_dir: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """`create_app` over the SQLite database in `data_dir`, through its lifespan."""
    app = create_app(load_settings(data_dir, rate_limit="", **overrides))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def env_rows(http: httpx.AsyncClient, admin: str) -> list[dict[str, Any]]:
    r = await http.get("/v1/admin/keys", headers=bearer(admin))
    assert r.status_code == 200, r.text
    return [k for k in r.json()["data"] if k["name"] == "env"]


# -- in process ------------------------------------------------------------------------


async def test_given_keys_work_and_a_restart_keeps_one_row_each(tmp_path: Path) -> None:
    keys = {role: secret(role) for role in Role}
    given = {f"{role.value}_key": keys[role] for role in Role}
    async with running(tmp_path, **given) as http:
        first = await env_rows(http, keys[Role.ADMIN])
        assert (await http.get("/v1/models", headers=bearer(keys[Role.CLIENT]))).status_code == 200
        r = await http.post(
            "/internal/nodes/register",
            json={"name": "n", "models": [{"name": "echo"}]},
            headers=bearer(keys[Role.NODE]),
        )
        assert r.status_code == 200, r.text
        r = await http.get("/v1/admin/keys", headers=bearer(keys[Role.CLIENT]))
        assert r.status_code == 403  # a client key is a client key
    assert sorted(k["role"] for k in first) == ["admin", "client", "node"]
    async with running(tmp_path, **given) as http:
        again = await env_rows(http, keys[Role.ADMIN])
    assert again == first  # same ids, no second row


async def test_a_revoked_given_key_stays_revoked_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    admin, client = secret(Role.ADMIN), secret(Role.CLIENT)
    async with running(tmp_path, admin_key=admin, client_key=client) as http:
        (row,) = [k for k in await env_rows(http, admin) if k["role"] == "client"]
        r = await http.post(f"/v1/admin/keys/{row['id']}/revoke", headers=bearer(admin))
        assert r.status_code == 200, r.text
    with caplog.at_level(logging.WARNING, logger="openbeepboop.auth"):
        async with running(tmp_path, admin_key=admin, client_key=client) as http:
            r = await http.get("/v1/models", headers=bearer(client))
            assert r.status_code == 401
            assert len([k for k in await env_rows(http, admin) if k["role"] == "client"]) == 1
    warned = [r.getMessage() for r in caplog.records if "stays revoked" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"the setting client_key: key {row['id']}")
    assert client not in caplog.text


async def test_a_given_key_stored_under_another_role_refuses_the_start(tmp_path: Path) -> None:
    admin = secret(Role.ADMIN)
    await store_as_client(tmp_path, admin)
    app = create_app(load_settings(tmp_path, admin_key=admin))
    with pytest.raises(StartupRefused) as caught:
        async with app.router.lifespan_context(app):
            pass
    message = str(caught.value)
    assert "\n" not in message and admin not in message
    assert message.startswith("the setting admin_key is stored as a client key (key_")


async def store_as_client(data_dir: Path, key: str) -> None:
    """A client key row whose hash is that of `key` (what no key made here has)."""
    settings = load_settings(data_dir)
    store = open_store(settings)
    await store.open()
    try:
        record = ApiKey("key_00000000deadbeef", Role.CLIENT, hash_key(key), "obb_admin_", "x", 0.0)
        await store.create_key(record)
    finally:
        await store.close()


async def test_two_keyrings_at_once_store_one_row(tmp_path: Path) -> None:
    """Two servers on one database starting at once: one inserts, the other reads it."""
    store = open_store(load_settings(tmp_path))
    await store.open()
    try:
        given = GivenKey(Role.NODE, SecretStr(secret(Role.NODE)), "OPENBEEPBOOP_NODE_KEY")
        found = await asyncio.gather(*(KeyRing(store).ensure_given(given) for _ in range(4)))
        assert len({k.id for k in found}) == 1
        assert [k.id for k in await store.list_keys()] == [found[0].id]
    finally:
        await store.close()


async def test_a_swarm_key_given_keeps_its_own_id(tmp_path: Path) -> None:
    signer = SwarmSecret("a swarm secret of 16+ chars")
    issued = new_signed_key(Role.CLIENT, signer, now=0.0)
    store = open_store(load_settings(tmp_path))
    await store.open()
    try:
        given = GivenKey(Role.CLIENT, SecretStr(issued.secret), "OPENBEEPBOOP_CLIENT_KEY")
        kept = await KeyRing(store, signer=signer).ensure_given(given)
        assert (kept.id, kept.name) == (issued.record.id, "env")
        assert (await KeyRing(store, signer=signer).authenticate(issued.secret)).id == kept.id
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("hunter2hunter2hunter2hunter2hunter2hunter2", "does not look like obb_admin_<secret>"),
        ("obb_admin_" + "a" * 31, "its secret part is 31 characters; it needs at least 32"),
        ("obb_client_" + "a" * 43, "it is a client key (obb_client_...), not an admin key"),
        ("obb_admin_" + "a" * 40 + "+/=", "characters other than A-Z a-z 0-9 _ -"),
    ],
)
def test_a_wrong_key_is_refused_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    monkeypatch.setenv("OPENBEEPBOOP_ADMIN_KEY", value)
    with pytest.raises(ConfigError) as caught:
        create_app(load_settings(tmp_path))
    message = str(caught.value)
    assert message.startswith("OPENBEEPBOOP_ADMIN_KEY is not a valid admin key: ")
    assert why in message and "keys generate --role admin" in message
    assert value not in message and "\n" not in message


def test_the_shortest_key_is_accepted_and_redacted() -> None:
    key = "obb_node_" + "x" * 32
    assert key_problem(key, Role.NODE) is None and KEY_PATTERN.match(key)
    assert redact(f"auth {key} failed") == "auth obb_node_xxxx*** failed"


def test_key_file_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = secret(Role.CLIENT)
    path = tmp_path / "client_key"
    path.write_text(f"  {key}\n")
    monkeypatch.setenv("OPENBEEPBOOP_CLIENT_KEY_FILE", str(path))
    settings = load_settings(tmp_path)
    (given,) = given_keys(settings)
    assert (given.role, given.secret.get_secret_value()) == (Role.CLIENT, key)
    assert key not in repr(settings) and key not in str(settings)

    monkeypatch.setenv("OPENBEEPBOOP_CLIENT_KEY", key)
    with pytest.raises(ConfigError, match="both OPENBEEPBOOP_CLIENT_KEY and OPENBEEPBOOP_CLIENT"):
        load_settings(tmp_path)
    monkeypatch.setenv("OPENBEEPBOOP_CLIENT_KEY", "")  # empty: not given (compose's ${X:-})
    assert given_keys(load_settings(tmp_path))[0].secret.get_secret_value() == key

    monkeypatch.setenv("OPENBEEPBOOP_CLIENT_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"names .*missing, which cannot be read: No such file"):
        load_settings(tmp_path)
    path.write_text("\n")
    monkeypatch.setenv("OPENBEEPBOOP_CLIENT_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match="which is empty"):
        load_settings(tmp_path)


# -- real processes ----------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """No OPENBEEPBOOP_* variable from outside; a private user data dir."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    clean["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    clean["OPENBEEPBOOP_RATE_LIMIT"] = ""
    return clean


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def setup_no_keys(data_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    out = run(
        "setup", "--non-interactive", "--no-keys", "--data-dir", str(data_dir), "--json", env=env
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def where(data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--port", str(free_port())]


@pytest.mark.slow
def test_keys_generate_prints_a_key_and_stores_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    env["OPENBEEPBOOP_DATA_DIR"] = str(tmp_path / "nowhere")
    out = run("keys", "generate", "--role", "node", env=env)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert KEY_PATTERN.match(key) and key.startswith("obb_node_") and len(key) == 9 + 43
    assert key_problem(key, Role.NODE) is None
    assert "OPENBEEPBOOP_NODE_KEY" in out.stderr
    out = run("keys", "generate", "--role", "admin", "--json", env=env)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert set(made) == {"key", "role", "variable"}
    assert (made["role"], made["variable"]) == ("admin", "OPENBEEPBOOP_ADMIN_KEY")
    assert key_problem(made["key"], Role.ADMIN) is None and made["key"] != key
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "xdg").exists()


@pytest.mark.slow
def test_setup_no_keys_makes_none(tmp_path: Path, env: dict[str, str]) -> None:
    data_dir = tmp_path / "d"
    made = setup_no_keys(data_dir, env)
    assert not [name for name in made if name.endswith("_key")]
    assert made["data_dir"] == str(data_dir) and (data_dir / "server.toml").exists()
    listed = run("keys", "list", "--data-dir", str(data_dir), "--json", env=env)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    text = run("setup", "--non-interactive", "--no-keys", "--data-dir", str(data_dir), env=env)
    assert text.returncode == 0 and "obb_" not in text.stdout and "No keys made" in text.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("OPENBEEPBOOP_ADMIN_KEY", "obb_admin_short", "its secret part is 5 characters"),
        ("OPENBEEPBOOP_NODE_KEY", "obb_admin_" + "b" * 43, "it is an admin key"),
        ("OPENBEEPBOOP_CLIENT_KEY", "not-a-key-but-long-enough-to-be-one-0123456789", "look like"),
    ],
)
def test_start_refuses_a_wrong_key_in_one_line(
    tmp_path: Path, env: dict[str, str], variable: str, value: str, why: str
) -> None:
    data_dir = tmp_path / "d"
    setup_no_keys(data_dir, env)
    out = run(
        "start",
        "--data-dir",
        str(data_dir),
        "--port",
        str(free_port()),
        env={**env, variable: value},
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {variable} is not a valid"), out.stderr
    assert why in lines[0] and value not in out.stderr + out.stdout


@pytest.mark.slow
def test_start_refuses_a_key_stored_under_another_role(tmp_path: Path, env: dict[str, str]) -> None:
    data_dir = tmp_path / "d"
    setup_no_keys(data_dir, env)
    admin = secret(Role.ADMIN)
    asyncio.run(store_as_client(data_dir, admin))
    out = run(
        "start",
        "--data-dir",
        str(data_dir),
        "--port",
        str(free_port()),
        env={**env, "OPENBEEPBOOP_ADMIN_KEY": admin},
    )
    both = out.stdout + out.stderr
    assert out.returncode != 0
    assert "refusing to start: OPENBEEPBOOP_ADMIN_KEY is stored as a client key" in both
    assert "Traceback" not in both and admin not in both


@pytest.mark.slow
def test_start_with_key_files(tmp_path: Path, env: dict[str, str]) -> None:
    """Docker secrets: the keys in files; the server comes up and they work."""
    data_dir = tmp_path / "d"
    setup_no_keys(data_dir, env)
    keys = {role: secret(role) for role in (Role.ADMIN, Role.CLIENT)}
    for role, key in keys.items():
        (tmp_path / role.value).write_text(key + "\n")
    files = {f"OPENBEEPBOOP_{r.value.upper()}_KEY_FILE": str(tmp_path / r.value) for r in keys}
    server = ServerProcess(data_dir, free_port(), {}, {**env, **files})
    server.start()
    try:
        r = httpx.get(server.url + "/v1/models", headers=bearer(keys[Role.CLIENT]), timeout=10)
        assert r.status_code == 200, r.text
        r = httpx.get(server.url + "/v1/admin/keys", headers=bearer(keys[Role.ADMIN]), timeout=10)
        assert sorted(k["role"] for k in r.json()["data"]) == ["admin", "client"]
        assert keys[Role.ADMIN] not in (server.log.read_text() if server.log else "")
    finally:
        server.kill()


@pytest.mark.slow
def test_two_replicas_start_at_once_with_one_key(
    tmp_path: Path, env: dict[str, str], postgres: str
) -> None:
    from tests.pg import temp_database_sync

    admin = secret(Role.ADMIN)
    with temp_database_sync(postgres) as url:
        base = {**env, "OPENBEEPBOOP_DATABASE_URL": url, "OPENBEEPBOOP_ADMIN_KEY": admin}
        setup_no_keys(tmp_path / "r0", base)
        servers = [ServerProcess(tmp_path / f"r{i}", free_port(), {}, base) for i in range(2)]
        (tmp_path / "r1").mkdir()
        errors: list[BaseException] = []

        def start(server: ServerProcess) -> None:
            try:
                server.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in servers]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors
            for server in servers:
                r = httpx.get(server.url + "/v1/admin/keys", headers=bearer(admin), timeout=10)
                assert r.status_code == 200, r.text
                assert [k["name"] for k in r.json()["data"]] == ["env"]
        finally:
            for server in servers:
                server.kill()


def test_the_node_reads_its_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node (openbeepboop-node) takes OPENBEEPBOOP_NODE_KEY_FILE as the server does."""
    from openbeepboop.node.config import NodeConfigError, load_node_config

    config = tmp_path / "node.toml"
    config.write_text(
        '[server]\nurl = "http://127.0.0.1:1"\napi_key = "obb_node_from_the_file"\n\n'
        '[[models]]\nname = "echo"\nbackend = "echo"\n'
    )
    key = secret(Role.NODE)
    (tmp_path / "node_key").write_text(key + "\n")
    monkeypatch.setenv("OPENBEEPBOOP_NODE_KEY_FILE", str(tmp_path / "node_key"))
    assert load_node_config(config).server.api_key == key
    monkeypatch.setenv("OPENBEEPBOOP_NODE_KEY", key)
    with pytest.raises(NodeConfigError, match="both OPENBEEPBOOP_NODE_KEY and"):
        load_node_config(config)
    monkeypatch.delenv("OPENBEEPBOOP_NODE_KEY")
    monkeypatch.setenv("OPENBEEPBOOP_NODE_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(NodeConfigError, match="missing, which cannot be read"):
        load_node_config(config)
