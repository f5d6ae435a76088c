#!/usr/bin/env python3
"""The swarm's timings: how long members take to find each other, how long a client
takes to discover them from one address, how long a client takes to fail over when the
server it uses is killed, how long a killed member's record lives on, and what
forwarding adds to a request.

Three real servers (`openbeepboop-server start --dht-port`), each with an echo node
(model `echo`; C's node also serves `only-c`), bootstrapped in a chain: B from A, C from
B. With `--netns` (root, iproute2) each server runs in its own network namespace with its
own address on a bridge (10.77.0.11-13), as on three machines; otherwise all on loopback.

- join: from starting C until all three list all three in /dht/status
- discovery: a fresh client (`openbeepboop.client.discovery.Discovery`) from A's DHT
  address until it has all three members (median of `--rounds`)
- failover: a client (`Client(bootstrap=A)`) sends a synchronous request every 20 ms to
  the member it ranks first; that member is killed (SIGKILL); the time from the kill to
  the first answer from another member (median of `--rounds`, the member restarted
  between rounds)
- expiry: from the kill until the dead member's record is gone from A's /dht/status
- forwarding: p50 latency of a synchronous `only-c` request asked of C directly and of A
  (forwarded to C), side by side

Run: ``python3 bench/bench_swarm.py`` (about a minute; ``--netns`` as root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import tomli_w

SECRET = "bench-swarm-secret-0123456789abcdef"
BRIDGE = "obbbr0"
SUBNET = "10.77.0"
PY = sys.executable


def wait_for(check: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError, KeyError, ValueError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(step)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- network namespaces ----------------------------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[str]]:
    """`count` namespaces on one bridge, each with its own address; removed after."""
    names = [f"obbns{i}" for i in range(count)]
    try:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i, ns in enumerate(names):
            veth, peer = f"obbv{i}", f"obbv{i}p"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", ns)
            sh("ip", "link", "set", veth, "master", BRIDGE)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{11 + i}/24", "dev", peer)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", f"{SUBNET}.1")
        yield names
    finally:
        for i, ns in enumerate(names):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            subprocess.run(["ip", "link", "del", f"obbv{i}"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


# -- servers ---------------------------------------------------------------------------


class Member:
    """One server (and its echo node) of the benchmark's swarm."""

    def __init__(self, root: Path, name: str, ns: str | None, index: int) -> None:
        self.name = name
        self.ns = ns
        self.dir = root / name
        self.host = f"{SUBNET}.{11 + index}" if ns else "127.0.0.1"
        self.port = 8000 if ns else free_port()
        self.dht_port = 8001 if ns else free_port(socket.SOCK_DGRAM)
        self.keys: dict[str, str] = {}
        self.server: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dht(self) -> str:
        return f"{self.host}:{self.dht_port}"

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns] if self.ns else []

    def env(self, bootstrap: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
        env.update(
            OPENBEEPBOOP_SWARM_SECRET=SECRET,
            OPENBEEPBOOP_DHT_PORT=str(self.dht_port),
            OPENBEEPBOOP_BOOTSTRAP=bootstrap,
            OPENBEEPBOOP_HEARTBEAT_INTERVAL="1",
            OPENBEEPBOOP_RATE_LIMIT="",
            OPENBEEPBOOP_HOST="0.0.0.0" if self.ns else "127.0.0.1",
            OPENBEEPBOOP_PORT=str(self.port),
        )
        return env

    def setup(self) -> None:
        out = subprocess.run(
            [
                PY,
                "-m",
                "openbeepboop.cli.server",
                "setup",
                "--non-interactive",
                "--json",
                "--data-dir",
                str(self.dir),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=self.env(""),
        )
        self.keys = json.loads(out.stdout)

    def start(self, bootstrap: str) -> None:
        log = (self.dir / "server.log").open("ab")
        self.server = subprocess.Popen(
            [
                *self._prefix(),
                PY,
                "-m",
                "openbeepboop.cli.server",
                "start",
                "--data-dir",
                str(self.dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(bootstrap),
        )
        wait_for(
            lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200,
            30,
            f"{self.name} to start",
        )
        models = [{"name": "echo", "backend": "echo", "delay_ms": 5, "concurrency": 8}]
        if self.name == "c":
            models.append({"name": "only-c", "backend": "echo", "concurrency": 8})
        config = self.dir / "node.toml"
        config.write_text(
            tomli_w.dumps(
                {
                    "server": {"url": self.url, "api_key": self.keys["node_key"]},
                    "node": {"state_dir": str(self.dir / "node"), "heartbeat_seconds": 0.5},
                    "models": models,
                }
            )
        )
        nlog = (self.dir / "node.log").open("ab")
        self.node = subprocess.Popen(
            [*self._prefix(), PY, "-m", "openbeepboop.cli.node", "run", "--config", str(config)],
            stdout=nlog,
            stderr=subprocess.STDOUT,
            env=self.env(""),
        )

    def kill(self) -> None:
        for proc in (self.node, self.server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self.node = self.server = None

    def members(self) -> set[str]:
        r = httpx.get(
            self.url + "/dht/status",
            timeout=2,
            headers={"Authorization": f"Bearer {self.keys['admin_key']}"},
        )
        return {m["url"] for m in r.json()["members"]}


# -- measurements ----------------------------------------------------------------------


def start_swarm(members: list[Member]) -> float:
    """Start the members in a chain; the seconds from starting the last until every
    member lists every member."""
    for i, m in enumerate(members[:-1]):
        m.start(members[i - 1].dht if i else "")
    t0 = time.monotonic()
    members[-1].start(members[-2].dht)
    wait_for(lambda: all_met(members), 60, "the members to meet")
    return time.monotonic() - t0


def all_met(members: list[Member]) -> bool:
    urls = {m.url for m in members}
    return all(m.members() == urls for m in members)


def discovery_seconds(bootstrap: str, count: int) -> float:
    """A fresh client's time from nothing to all `count` members (DHT and /status)."""
    import asyncio

    from openbeepboop.client.discovery import Discovery, parse_bootstrap

    async def once() -> float:
        discovery = Discovery(parse_bootstrap(bootstrap), host="0.0.0.0")
        t0 = time.perf_counter()
        try:
            found = await discovery.members()
            if len(found) != count:
                raise SystemExit(f"discovery found {len(found)} of {count} members")
            return time.perf_counter() - t0
        finally:
            discovery.close()

    return asyncio.run(once())


def failover_round(members: list[Member], key: str, bootstrap: str) -> tuple[float, float, Member]:
    """(kill -> first answer elsewhere, kill -> record gone from another member's
    view, the member killed): the member the client sends to is killed."""
    from openbeepboop import Client

    ask = {"model": "echo", "messages": [{"role": "user", "content": "ping"}]}
    with Client(api_key=key, bootstrap=bootstrap, failover_after=0.5, timeout=10) as client:
        warm = client.chat.completions.create(**ask)
        warm.get(wait=True, timeout=20)
        victim = next(m for m in members if m.url == warm.base_url)
        watcher = next(m for m in members if m is not victim)
        victim.kill()
        killed = time.monotonic()
        while True:
            try:
                job = client.chat.completions.create(**ask)
                job.get(wait=True, timeout=10)
            except Exception:
                time.sleep(0.02)
                continue
            if job.base_url != victim.url:
                break
        failover = time.monotonic() - killed
    wait_for(lambda: victim.url not in watcher.members(), 60, "the record to expire")
    expiry = time.monotonic() - killed
    return failover, expiry, victim


def latency_p50(url: str, key: str, model: str, n: int) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    times = []
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--netns", action="store_true", help="one network namespace a server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="for the forwarding p50")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    ctx = namespaces(3) if args.netns else contextlib.nullcontext([None, None, None])
    with ctx as nss:
        members = [Member(root, n, ns, i) for i, (n, ns) in enumerate(zip("abc", nss, strict=True))]
        try:
            for m in members:
                m.setup()
            join = start_swarm(members)
            key = members[0].keys["client_key"]  # a swarm key: made with the secret set
            bootstrap = members[0].dht
            discovery = [discovery_seconds(bootstrap, 3) for _ in range(args.rounds)]
            wait_for(
                lambda: (
                    "only-c"
                    in {
                        m["id"]
                        for m in httpx.get(
                            members[0].url + "/v1/models",
                            timeout=2,
                            headers={"Authorization": f"Bearer {key}"},
                        ).json()["data"]
                    }
                ),
                30,
                "A to forward only-c",
            )
            direct = latency_p50(members[2].url, key, "only-c", args.requests)
            forwarded = latency_p50(members[0].url, key, "only-c", args.requests)
            failovers, expiries = [], []
            for _ in range(args.rounds):
                failover, expiry, victim = failover_round(members, key, bootstrap)
                failovers.append(failover)
                expiries.append(expiry)
                others = [m for m in members if m is not victim]
                victim.start(others[0].dht)
                wait_for(lambda: all_met(members), 60, "the member to rejoin")
        finally:
            for m in members:
                m.kill()
            shutil.rmtree(root, ignore_errors=True)
    where = "3 network namespaces on a bridge" if args.netns else "loopback"
    print(f"swarm of 3 on {where}, heartbeat 1 s, {args.rounds} rounds (medians):")
    print(f"  join (C started -> all see all)      {join:6.2f} s")
    print(f"  discovery (fresh client, 3 members)  {statistics.median(discovery) * 1000:6.0f} ms")
    print(f"  failover (kill -> answer elsewhere)  {statistics.median(failovers):6.2f} s")
    print(f"  record expiry (kill -> gone)         {statistics.median(expiries):6.2f} s")
    print(f"  sync echo p50, C direct              {direct * 1000:6.1f} ms")
    print(
        f"  sync echo p50, A forwarding to C     {forwarded * 1000:6.1f} ms"
        f"  ({forwarded / direct:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
