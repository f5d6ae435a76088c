"""Real servers in a swarm, for tests: each a `openbeepboop-server start` process with its
own DHT port, all sharing one secret, each bootstrapped from the one before (a chain)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ServerProcess
from tests.nodes import new_server, wait_until

SECRET = "a-test-swarm-secret-0123456789"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member:
    """One server of the swarm and its DHT port."""

    def __init__(self, server: ServerProcess, dht_port: int) -> None:
        self.server = server
        self.dht_port = dht_port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def dht(self) -> str:
        return f"127.0.0.1:{self.dht_port}"

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server.keys[role + '_key']}"}

    def dht_status(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/dht/status", headers=self.headers(), timeout=5)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def member_ids(self) -> set[str]:
        return {m["id"] for m in self.dht_status()["members"]}


def start_member(
    data_dir: Path, bootstrap: str = "", heartbeat: float = 0.5, dht_port: int = 0, **env: str
) -> Member:
    dht_port = dht_port or free_udp_port()
    server = new_server(
        data_dir,
        OPENBEEPBOOP_DHT_PORT=str(dht_port),
        OPENBEEPBOOP_BOOTSTRAP=bootstrap,
        OPENBEEPBOOP_SWARM_SECRET=SECRET,
        OPENBEEPBOOP_HEARTBEAT_INTERVAL=str(heartbeat),
        **env,
    )
    return Member(server, dht_port)


@contextmanager
def swarm(root: Path, size: int = 3, heartbeat: float = 0.5, **env: str) -> Iterator[list[Member]]:
    """`size` members bootstrapped in a chain, each seeing all the others before the
    block runs; every one is stopped after it."""
    members: list[Member] = []
    try:
        for i in range(size):
            boot = members[-1].dht if members else ""
            members.append(start_member(root / f"m{i}", boot, heartbeat, **env))
        wait_until(
            lambda: all(len(m.member_ids()) == size for m in members),
            30,
            "every member to see the others",
        )
        yield members
    finally:
        for m in members:
            m.server.kill()
