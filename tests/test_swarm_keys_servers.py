"""One key across the swarm, for real: two `openbeepboop-server start` processes, each
with its own data directory and DHT port, sharing one swarm secret. A key made on A works
on B; revoked on A, it stops on B (the revocation gossip of B's heartbeat); the
members' revocation route admits only members."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from openbeepboop.server.core.peer_auth import HEADER, MAX_SKEW, peer_header
from openbeepboop.server.core.signed_keys import new_signed_key
from openbeepboop.server.models import Role
from openbeepboop.swarm.secret import SwarmSecret
from tests.conftest import ServerProcess, cli
from tests.nodes import wait_until
from tests.swarms import SECRET, start_member

HEARTBEAT = 0.5


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Servers A and B, B bootstrapped from A, each seeing the other."""
    root = tmp_path_factory.mktemp("swarm-keys")
    started: list[ServerProcess] = []
    try:
        first = start_member(root / "a", heartbeat=HEARTBEAT)
        a = first.server
        started.append(a)
        b = start_member(root / "b", bootstrap=first.dht, heartbeat=HEARTBEAT).server
        started.append(b)
        wait_until(lambda: all(len(_members(s)) == 2 for s in started), 30, "A and B to meet")
        yield a, b
    finally:
        for server in started:
            server.kill()


def _members(server: ServerProcess) -> list[Any]:
    r = httpx.get(server.url + "/dht/status", headers=_auth(server.keys["admin_key"]), timeout=5)
    r.raise_for_status()
    return list(r.json()["members"])


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _status(server: ServerProcess, key: str) -> int:
    return httpx.get(server.url + "/v1/models", headers=_auth(key), timeout=5).status_code


def _make_key(server: ServerProcess, role: str) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/admin/keys",
        json={"role": role, "name": "roaming"},
        headers=_auth(server.keys["admin_key"]),
        timeout=5,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_keys_made_on_one_member_work_on_the_other_until_revoked(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    client, node = _make_key(a, "client"), _make_key(a, "node")
    assert client["key"].startswith("obb_client_s1") and node["key"].startswith("obb_node_s1")
    assert _status(b, client["key"]) == 200
    assert _status(b, node["key"]) == 200
    r = httpx.post(
        b.url + "/internal/nodes/register",
        json={"name": "roaming-node", "models": [{"name": "echo"}]},
        headers=_auth(node["key"]),
        timeout=5,
    )
    assert r.status_code == 200, r.text  # a node key of A serves B
    seen = httpx.get(b.url + "/v1/admin/keys", headers=_auth(b.keys["admin_key"]), timeout=5)
    kept = {k["id"]: k for k in seen.json()["data"]}
    assert kept[client["id"]]["name"] == "swarm key" and kept[node["id"]]["role"] == "node"
    # the `keys create` command on B's data directory makes swarm keys too
    made = cli(
        "keys",
        "create",
        "--data-dir",
        str(b.data_dir),
        "--role",
        "client",
        "--json",
        env={"OPENBEEPBOOP_SWARM_SECRET": SECRET},
    )
    assert _status(a, made["key"]) == 200
    # a key of another swarm, and an admin key of A, are nothing on B
    stranger = new_signed_key(Role.CLIENT, SwarmSecret("another swarm's secret!!")).secret
    assert _status(b, stranger) == 401
    assert _status(b, a.keys["admin_key"]) == 401

    revoked_at = time.monotonic()
    r = httpx.post(
        f"{a.url}/v1/admin/keys/{client['id']}/revoke",
        headers=_auth(a.keys["admin_key"]),
        timeout=5,
    )
    assert r.status_code == 200, r.text
    assert _status(a, client["key"]) == 401  # at once where it was revoked
    wait_until(lambda: _status(b, client["key"]) == 401, 20, "B to refuse the revoked key")
    took = time.monotonic() - revoked_at
    assert took < 10, f"the revocation took {took:.1f} s to reach B"
    body = httpx.get(b.url + "/v1/models", headers=_auth(client["key"]), timeout=5).json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"] == "API key revoked"
    assert _status(b, node["key"]) == 200  # the others go on working
    # both members now know the same revocations
    known = [_revocations(s) for s in (a, b)]
    assert known[0] == known[1]
    assert client["id"] in {r["key_id"] for r in known[0]["data"]}


def _revocations(server: ServerProcess) -> dict[str, Any]:
    header = peer_header(SwarmSecret(SECRET), "GET", "/swarm/revocations", time.time())
    r = httpx.get(server.url + "/swarm/revocations", headers={HEADER: header}, timeout=5)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_the_revocation_route_is_for_members_only(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, _ = pair
    url, route = a.url + "/swarm/revocations", "/swarm/revocations"
    ours, theirs = SwarmSecret(SECRET), SwarmSecret("another swarm's secret!!")
    now = time.time()
    refused = {
        "missing_swarm_auth": {},
        "invalid_swarm_auth": {HEADER: peer_header(theirs, "GET", route, now)},
        "stale_swarm_auth": {HEADER: peer_header(ours, "GET", route, now - MAX_SKEW - 60)},
    }
    for code, headers in refused.items():
        r = httpx.get(url, headers={**headers, **_auth(a.keys["admin_key"])}, timeout=5)
        assert r.status_code == 401, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", code)
        assert set(error) == {"message", "type", "param", "code"}
    r = httpx.get(url, headers={HEADER: peer_header(ours, "GET", route, now)}, timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and isinstance(body["data"], list)
    for item in body["data"]:
        assert set(item) == {"key_id", "revoked_at", "origin"}
