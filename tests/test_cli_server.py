"""`openbeepboop-server` as a user drives it: setup (flags and the wizard), keys, start,
configuration precedence and error messages. Every command runs as a real process."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest

from openbeepboop.server.core.auth import CACHE_SECONDS
from openbeepboop.server.store.migrations import load_migrations
from tests.conftest import free_port

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "openbeepboop.cli.server"]
ROLES = ("admin", "node", "client")
DB_NAME = "openbeepboop.db"


# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for every command: no OPENBEEPBOOP_* leaking in from outside, and
    a private user data dir (the default --data-dir)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    clean["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    clean["OPENBEEPBOOP_RATE_LIMIT"] = ""
    return clean


def run(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`openbeepboop-server ARGS` with stdin not a TTY; never raises on failure."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_json(*args: str, env: dict[str, str]) -> Any:
    out = run(*args, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def setup(data_dir: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    made: dict[str, Any] = run_json(
        "setup", "--non-interactive", "--data-dir", str(data_dir), "--json", *extra, env=env
    )
    return made


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_clean_failure(out: subprocess.CompletedProcess[str], *must_mention: str) -> None:
    """Non-zero exit, a message that names what is wrong, and no Python traceback."""
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip(), "no message"
    for word in must_mention:
        assert word in out.stderr, f"{word!r} not in: {out.stderr}"


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> int:
        """SIGTERM, and the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def start_server(env: dict[str, str]) -> Iterator[Callable[..., Started]]:
    """`start_server(data_dir, *args, port=P, extra_env={})`: a real `start`, ready once
    /health answers on P; every one started is stopped at the end."""
    started: list[Started] = []

    def factory(
        data_dir: Path, *args: str, port: int, extra_env: dict[str, str] | None = None
    ) -> Started:
        log = data_dir / f"start-{len(started)}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*CLI, "start", "--data-dir", str(data_dir), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**env, **(extra_env or {})},
            )
        server = Started(proc, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server did not answer on port {port}: {log.read_text()}")

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(timeout=15)


def random_part(key: str, role: str) -> str:
    prefix = f"obb_{role}_"
    assert key.startswith(prefix), key
    return key.removeprefix(prefix)


def db_bytes(data_dir: Path) -> bytes:
    """The database file and any WAL/journal beside it."""
    files = sorted(data_dir.glob(DB_NAME + "*"))
    assert data_dir / DB_NAME in files
    return b"".join(f.read_bytes() for f in files)


def db_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def submit(url: str, key: str) -> dict[str, Any]:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        headers={**auth(key), "Prefer": "respond-async"},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


# -- setup -----------------------------------------------------------------------------


def test_setup_creates_config_database_and_keys_stored_hashed(
    tmp_path: Path, env: dict[str, str]
) -> None:
    data_dir = tmp_path / "fresh" / "nested"
    out = setup(data_dir, env)

    assert (data_dir / "server.toml").is_file()
    assert (data_dir / DB_NAME).is_file()
    assert Path(out["config"]) == data_dir / "server.toml"
    assert Path(out["database"]) == data_dir / DB_NAME
    config = tomllib.loads((data_dir / "server.toml").read_text())
    assert config["port"] == 8000 and config["host"] == "127.0.0.1"

    keys = {role: out[f"{role}_key"] for role in ROLES}
    assert len(set(keys.values())) == 3
    for role, key in keys.items():
        secret = random_part(key, role)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", secret), key
        raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
        assert len(raw) * 8 >= 256, f"{role} key has only {len(raw) * 8} random bits"

    # Only SHA-256 hashes are stored: no key, nor its random part, anywhere in the files.
    stored = db_bytes(data_dir) + (data_dir / "server.toml").read_bytes()
    for role, key in keys.items():
        assert key.encode() not in stored
        assert random_part(key, role)[4:].encode() not in stored
    hashes = {h for (h,) in db_rows(data_dir, "SELECT key_hash FROM api_keys")}
    assert hashes == {hashlib.sha256(k.encode()).hexdigest() for k in keys.values()}
    roles = sorted(r for (r,) in db_rows(data_dir, "SELECT role FROM api_keys"))
    assert roles == sorted(ROLES)


def test_setup_again_keeps_data_keys_and_settings(
    tmp_path: Path, env: dict[str, str], start_server: Callable[..., Started]
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    first = setup(data_dir, env, "--port", str(port), "--lease-seconds", "42")
    assert first["migrations_applied"] == [m.version for m in load_migrations("sqlite")]
    migrations_before = db_rows(data_dir, "SELECT * FROM schema_migrations ORDER BY version")

    server = start_server(data_dir, port=port)
    job = submit(server.url, first["client_key"])
    assert server.stop() == 0

    second = setup(data_dir, env)
    assert second["migrations_applied"] == []
    assert db_rows(data_dir, "SELECT * FROM schema_migrations ORDER BY version") == (
        migrations_before
    )
    # The file kept what the first setup wrote (no flags were given this time).
    config = tomllib.loads((data_dir / "server.toml").read_text())
    assert config["port"] == port and config["lease_seconds"] == 42
    for role in ROLES:
        assert second[f"{role}_key"] != first[f"{role}_key"]

    server = start_server(data_dir, port=port)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.get(f"/v1/jobs/{job['id']}", headers=auth(first["client_key"]))
        assert r.status_code == 200 and r.json()["status"] == "queued"
        for made in (first, second):
            r = http.get("/v1/admin/keys", headers=auth(made["admin_key"]))
            assert r.status_code == 200, r.text
            assert len(r.json()["data"]) == 6
            r = http.post(
                "/internal/nodes/register",
                json={"name": "n", "models": [{"name": "echo"}]},
                headers=auth(made["node_key"]),
            )
            assert r.status_code == 200, r.text
        r = http.get("/v1/jobs", headers=auth(second["client_key"]))
        assert r.status_code == 200 and r.json()["data"] == []  # another client's job


def test_setup_without_a_tty_does_not_prompt(tmp_path: Path, env: dict[str, str]) -> None:
    """Documented behaviour: with stdin not a terminal and no --non-interactive, setup
    does not prompt (it would hang a script) but runs as if --non-interactive were given."""
    data_dir = tmp_path / "data"
    out = run("setup", "--data-dir", str(data_dir), "--json", env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["admin_key"].startswith("obb_admin_")
    assert (data_dir / "server.toml").is_file()
    assert "Data directory" not in out.stderr


# -- the interactive wizard ------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str]) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "openbeepboop.cli.server", *args],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 250),
    )


def test_interactive_wizard_writes_config_and_prints_keys(
    tmp_path: Path, env: dict[str, str]
) -> None:
    default_dir = tmp_path / "xdg" / "openbeepboop"
    port = free_port()
    child = spawn(["setup"], env)
    try:
        child.expect(r"Data directory \[(.*?)\]: ")
        assert child.match.group(1) == str(default_dir)
        child.sendline("")  # Enter accepts the default
        child.expect(r"Listen address \[127\.0\.0\.1\]: ")
        child.sendline("0.0.0.0")
        child.expect(r"Port \[8000\]: ")
        child.sendline("not-a-port")
        child.expect("not a valid integer")
        child.expect(r"Port \[8000\]: ")
        child.sendline("70000")
        child.expect("not in the range")
        child.expect(r"Port \[8000\]: ")
        child.sendline(str(port))
        child.expect(r"Database URL \(empty: SQLite in the data directory\) \[\]: ")
        child.sendline("")  # SQLite
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, output
    assert "Traceback" not in output

    config = tomllib.loads((default_dir / "server.toml").read_text())
    assert config["host"] == "0.0.0.0" and config["port"] == port
    printed = {}
    for role in ROLES:
        found = re.search(rf"{role}_key\s+(obb_{role}_[A-Za-z0-9_-]{{43,}})", output)
        assert found, f"no {role} key in: {output}"
        printed[role] = found.group(1)
    hashes = {h for (h,) in db_rows(default_dir, "SELECT key_hash FROM api_keys")}
    assert hashes == {hashlib.sha256(k.encode()).hexdigest() for k in printed.values()}
    assert f"openbeepboop-server start --data-dir {default_dir}" in output


def test_non_interactive_never_prompts_even_on_a_tty(tmp_path: Path, env: dict[str, str]) -> None:
    data_dir = tmp_path / "data"
    child = spawn(["setup", "--non-interactive", "--data-dir", str(data_dir), "--json"], env)
    try:
        index = child.expect([pexpect.EOF, r"\]: "])
        output = child.before
    finally:
        child.close(force=True)
    assert index == 0, f"it prompted: {output}"
    assert child.exitstatus == 0, output
    made = json.loads(output.strip().splitlines()[-1])
    assert made["node_key"].startswith("obb_node_")
    assert (data_dir / "server.toml").is_file()


# -- keys ------------------------------------------------------------------------------


def test_keys_create_list_revoke_against_a_running_server(
    tmp_path: Path, env: dict[str, str], start_server: Callable[..., Started]
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    made = setup(data_dir, env, "--port", str(port))
    server = start_server(data_dir, port=port)
    dd = ["--data-dir", str(data_dir)]

    created = run_json("keys", "create", *dd, "--role", "client", "--name", "ci", "--json", env=env)
    key, key_id = created["key"], created["id"]
    assert key.startswith("obb_client_") and len(random_part(key, "client")) >= 43

    with httpx.Client(base_url=server.url, timeout=30) as http:
        job = submit(server.url, key)
        r = http.get(f"/v1/jobs/{job['id']}", headers=auth(key))
        assert r.status_code == 200, r.text

        listing = run("keys", "list", *dd, "--json", env=env)
        assert listing.returncode == 0, listing.stderr
        assert key not in listing.stdout
        assert random_part(key, "client")[4:] not in listing.stdout
        for role in ROLES:
            assert made[f"{role}_key"] not in listing.stdout
        rows = {row["id"]: row for row in json.loads(listing.stdout)}
        assert len(rows) == 4
        mine = rows[key_id]
        assert mine["role"] == "client" and mine["name"] == "ci" and mine["revoked"] is False
        assert key.startswith(mine["prefix"]) and len(mine["prefix"]) < len(key) - 32

        revoked = run("keys", "revoke", *dd, key_id, env=env)
        assert revoked.returncode == 0, revoked.stderr
        done = time.monotonic()
        # The server caches a key check for CACHE_SECONDS; after that, 401.
        status = 200
        while time.monotonic() - done < CACHE_SECONDS + 3:
            status = http.get(f"/v1/jobs/{job['id']}", headers=auth(key)).status_code
            if status == 401:
                break
            assert status == 200
            time.sleep(0.2)
        assert status == 401, f"revoked key still accepted {time.monotonic() - done:.1f} s later"
        r = http.get("/v1/admin/keys", headers=auth(made["admin_key"]))
        assert r.status_code == 200  # other keys are untouched

    rows = {row["id"]: row for row in run_json("keys", "list", *dd, "--json", env=env)}
    assert rows[key_id]["revoked"] is True
    assert sum(row["revoked"] for row in rows.values()) == 1

    missing = run("keys", "revoke", *dd, "key_doesnotexist", env=env)
    assert_clean_failure(missing, "key_doesnotexist")


def test_keys_of_each_role_do_their_job(
    tmp_path: Path, env: dict[str, str], start_server: Callable[..., Started]
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    setup(data_dir, env, "--port", str(port))
    server = start_server(data_dir, port=port)
    dd = ["--data-dir", str(data_dir)]
    keys = {
        role: run_json("keys", "create", *dd, "--role", role, "--json", env=env)["key"]
        for role in ROLES
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        register = {"name": "n", "models": [{"name": "echo"}]}
        r = http.post("/internal/nodes/register", json=register, headers=auth(keys["node"]))
        assert r.status_code == 200, r.text
        r = http.post("/internal/nodes/register", json=register, headers=auth(keys["client"]))
        assert r.status_code == 403, r.text
        r = http.get("/v1/admin/keys", headers=auth(keys["client"]))
        assert r.status_code == 403, r.text
        r = http.get("/v1/admin/keys", headers=auth(keys["admin"]))
        assert r.status_code == 200, r.text


# -- start: errors and precedence ------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["start"], ["keys", "create", "--role", "client"], ["keys", "list"]],
    ids=["start", "keys-create", "keys-list"],
)
def test_commands_on_a_directory_that_is_not_set_up(
    tmp_path: Path, env: dict[str, str], command: list[str]
) -> None:
    data_dir = tmp_path / "never-set-up"
    out = run(*command, "--data-dir", str(data_dir), env=env, timeout=30)
    assert_clean_failure(out, "openbeepboop-server setup", str(data_dir))
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not data_dir.exists(), "it made a data directory that setup never made"


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One set-up data dir that the broken-config cases copy."""
    data_dir = tmp_path_factory.mktemp("template") / "data"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    setup(data_dir, clean)
    return data_dir


def _replace(text: str, key: str, line: str) -> str:
    out, n = re.subn(rf"(?m)^{key} = .*$", line, text)
    assert n == 1
    return out


BROKEN: dict[str, tuple[Callable[[str], str], dict[str, str], list[str]]] = {
    "invalid-toml": (lambda t: t + "port = \n", {}, ["server.toml", "TOML", "line"]),
    "unknown-key": (lambda t: t + "bogus_setting = 1\n", {}, ["server.toml", "bogus_setting"]),
    "wrong-type": (lambda t: _replace(t, "port", 'port = "abc"'), {}, ["server.toml", "port"]),
    "out-of-range": (
        lambda t: _replace(t, "lease_seconds", "lease_seconds = -1"),
        {},
        ["server.toml", "lease_seconds"],
    ),
    "bad-env": (lambda t: t, {"OPENBEEPBOOP_PORT": "abc"}, ["OPENBEEPBOOP_", "port"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_start_with_a_broken_config_explains_itself(
    tmp_path: Path, env: dict[str, str], template_dir: Path, case: str
) -> None:
    edit, extra_env, words = BROKEN[case]
    data_dir = tmp_path / "data"
    shutil.copytree(template_dir, data_dir)
    config = data_dir / "server.toml"
    config.write_text(edit(config.read_text()))
    # A config that starts a server would hang here until the timeout: that fails too.
    out = run("start", "--data-dir", str(data_dir), env={**env, **extra_env}, timeout=30)
    assert_clean_failure(out, *words)
    assert out.stdout == ""


def fetched_lease_seconds(url: str, keys: dict[str, Any]) -> float:
    """Submit a job, lease it, and return how far off its lease expiry is."""
    job = submit(url, keys["client_key"])
    with httpx.Client(base_url=url, timeout=30, headers=auth(keys["node_key"])) as http:
        r = http.post("/internal/nodes/register", json={"name": "n", "models": [{"name": "echo"}]})
        node_id = r.json()["node_id"]
        r = http.post(
            "/internal/queue/fetch", json={"node_id": node_id, "models": ["echo"], "max_jobs": 1}
        )
        leased = r.json()["jobs"]
    assert [j["id"] for j in leased] == [job["id"]]
    return float(leased[0]["lease_expires_at"]) - time.time()


def test_environment_overrides_the_file(
    tmp_path: Path, env: dict[str, str], start_server: Callable[..., Started]
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    keys = setup(data_dir, env, "--port", str(port), "--lease-seconds", "30")
    assert tomllib.loads((data_dir / "server.toml").read_text())["lease_seconds"] == 30

    server = start_server(data_dir, port=port)
    assert 25 < fetched_lease_seconds(server.url, keys) <= 30
    assert server.stop() == 0

    server = start_server(data_dir, port=port, extra_env={"OPENBEEPBOOP_LEASE_SECONDS": "7"})
    assert 2 < fetched_lease_seconds(server.url, keys) <= 7
    # The variable is not written back into the file.
    assert tomllib.loads((data_dir / "server.toml").read_text())["lease_seconds"] == 30


def test_port_flag_beats_environment_beats_file(
    tmp_path: Path, env: dict[str, str], start_server: Callable[..., Started]
) -> None:
    data_dir = tmp_path / "data"
    in_file, in_env, in_flag = free_port(), free_port(), free_port()
    assert len({in_file, in_env, in_flag}) == 3
    setup(data_dir, env, "--port", str(in_file))

    server = start_server(data_dir, port=in_file)
    assert server.stop() == 0

    server = start_server(data_dir, port=in_env, extra_env={"OPENBEEPBOOP_PORT": str(in_env)})
    assert not listening(in_file)
    assert server.stop() == 0

    server = start_server(
        data_dir, "--port", str(in_flag), port=in_flag, extra_env={"OPENBEEPBOOP_PORT": str(in_env)}
    )
    assert not listening(in_file) and not listening(in_env)
    assert f"http://127.0.0.1:{in_flag}" in server.log.read_text()


# -- help ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (["setup"], ["OPENBEEPBOOP_DATA_DIR"]),
        (
            ["start"],
            [
                "OPENBEEPBOOP_DATA_DIR",
                "OPENBEEPBOOP_HOST",
                "OPENBEEPBOOP_PORT",
                "OPENBEEPBOOP_<NAME>",
                "OPENBEEPBOOP_LEASE_SECONDS",
                "OPENBEEPBOOP_DATABASE_URL",
            ],
        ),
        (["keys", "create"], ["OPENBEEPBOOP_DATA_DIR"]),
        (["keys", "list"], ["OPENBEEPBOOP_DATA_DIR"]),
        (["keys", "revoke"], ["OPENBEEPBOOP_DATA_DIR"]),
    ],
    ids=["setup", "start", "keys-create", "keys-list", "keys-revoke"],
)
def test_help_names_the_environment_variables(
    env: dict[str, str], command: list[str], variables: list[str]
) -> None:
    out = run(*command, "--help", env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # click wraps lines
    for name in variables:
        assert name in text, f"{' '.join(command)} --help does not mention {name}"


def test_data_dir_from_the_environment(tmp_path: Path, env: dict[str, str]) -> None:
    """OPENBEEPBOOP_DATA_DIR stands in for --data-dir in every command."""
    data_dir = tmp_path / "from-env"
    with_dir = {**env, "OPENBEEPBOOP_DATA_DIR": str(data_dir)}
    made = run_json("setup", "--non-interactive", "--json", env=with_dir)
    assert Path(made["data_dir"]) == data_dir and (data_dir / "server.toml").is_file()
    created = run_json("keys", "create", "--role", "client", "--json", env=with_dir)
    listed = run_json("keys", "list", "--json", env=with_dir)
    assert created["id"] in {row["id"] for row in listed}
