"""The swarm's DHT layer (docs/swarm.md): records are signed and bounded, members merge
them per key, hostile datagrams and bogus records change nothing, and real servers in a
chain find each other and forget one that died."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import umsgpack

from openbeepboop.swarm.dht import Dht
from openbeepboop.swarm.records import (
    ALL_NODES,
    MAX_MODELS,
    MemberRecord,
    ModelLoad,
    encode_value,
    key_for_model,
    merge,
    parse_value,
)
from openbeepboop.swarm.secret import SwarmSecret
from openbeepboop.swarm.storage import NoStorage, RecordStorage, digest
from tests.conftest import cli
from tests.nodes import echo_model, wait_until, with_node
from tests.swarms import SECRET, start_member, swarm

SEC = SwarmSecret(SECRET)


def record(
    member_id: str,
    *,
    ts: float | None = None,
    models: tuple[str, ...] = ("echo",),
    secret: SwarmSecret = SEC,
    ttl: float = 30,
) -> MemberRecord:
    now = time.time() if ts is None else ts
    return MemberRecord(
        id=member_id,
        url=f"http://127.0.0.1:1/{member_id}",
        started_at=now,
        ts=now,
        ttl=ttl,
        models={m: ModelLoad(queued=1, nodes=1) for m in models},
    ).signed(secret)


# -- records and storage ---------------------------------------------------------------


def test_a_record_verifies_only_unchanged_and_under_its_swarm() -> None:
    good = record("m1")
    assert good.verified(SEC)
    assert not good.verified(SwarmSecret("another swarm's secret!!"))
    tampered = good.model_copy(update={"url": "http://evil.example/"})
    assert not tampered.verified(SEC)
    assert not good.model_copy(update={"sig": "zz"}).verified(SEC)


def test_values_that_are_not_bounded_records_are_dropped() -> None:
    good = record("m1")
    assert parse_value(encode_value([good])) == [good]
    too_many = {f"m{i}": {"queued": 0, "running": 0, "nodes": 1} for i in range(MAX_MODELS + 1)}
    bad_entries = [
        {**good.model_dump(), "models": too_many},
        {**good.model_dump(), "id": "has space"},
        {**good.model_dump(), "ttl": 10_000},
        {**good.model_dump(), "url": "javascript:alert(1)"},
        {**good.model_dump(), "extra": 1},
        [1, 2, 3],
        "text",
    ]
    assert parse_value(json.dumps([*bad_entries, good.model_dump()])) == [good]
    for junk in ("", "[", "x" * 100_000, "[" * 5000 + "]" * 5000, b"\xff\xfe", 42, None):
        assert parse_value(junk) == []


def test_merge_keeps_the_newest_live_record_per_member() -> None:
    now = time.time()
    old, new = record("m1", ts=now - 5), record("m1", ts=now - 1)
    dead = record("m2", ts=now - 100, ttl=10)
    assert merge([old, new, dead], now=now) == [new]


def test_storage_merges_signed_records_under_their_own_keys_and_expires_them() -> None:
    clock = [1000.0]
    storage = RecordStorage(SEC, clock=lambda: clock[0])
    echo = digest(key_for_model("echo"))
    storage[echo] = encode_value([record("m1", ttl=5)])
    storage[echo] = encode_value([record("m2", ttl=50)])
    storage[echo] = encode_value([record("m3", models=("other",))])  # not under echo
    storage[echo] = encode_value([record("m4", secret=SwarmSecret("not this swarm's secret"))])
    assert sorted(r.id for r in parse_value(storage.get(echo))) == ["m1", "m2"]
    assert storage.rejected == 2
    clock[0] += 10  # m1 was not refreshed within its ttl
    assert [r.id for r in parse_value(storage.get(echo))] == ["m2"]
    storage[b"short"] = encode_value([record("m5")])  # not a key digest: ignored
    assert storage.get(b"short") is None


# -- the DHT under abuse -----------------------------------------------------------------


@pytest.fixture
async def ring() -> AsyncIterator[list[Dht]]:
    nodes = [Dht(RecordStorage(SEC), timeout=1.0) for _ in range(3)]
    for node in nodes:
        await node.start("127.0.0.1", 0)
    await nodes[1].join([("localhost", nodes[0].port)])
    await nodes[2].join([("127.0.0.1", nodes[1].port)])
    for i, node in enumerate(nodes):
        rec = record(f"m{i}", models=("echo",) if i < 2 else ("only-c",))
        for key in rec.dht_keys():
            await node.put(key, encode_value([rec]))
    yield nodes
    for node in nodes:
        node.stop()


async def lookup(bootstrap_port: int, key: str) -> list[str]:
    client = Dht(NoStorage(), timeout=1.0)
    await client.start("127.0.0.1", 0)
    try:
        await client.join([("127.0.0.1", bootstrap_port)])
        return sorted(
            r.id for r in merge(r for v in await client.get_all(key) for r in parse_value(v))
        )
    finally:
        client.stop()


async def test_a_client_finds_every_member_and_each_model_from_one_address(ring: list[Dht]) -> None:
    assert await lookup(ring[0].port, ALL_NODES) == ["m0", "m1", "m2"]
    assert await lookup(ring[0].port, key_for_model("echo")) == ["m0", "m1"]
    assert await lookup(ring[2].port, key_for_model("only-c")) == ["m2"]


def _request(name: str, *args: object) -> bytes:
    return b"\x00" + os.urandom(20) + umsgpack.packb([name, list(args)])


async def test_hostile_datagrams_and_bogus_records_change_nothing(ring: list[Dht]) -> None:
    target = ("127.0.0.1", ring[0].port)
    bogus = record("intruder", secret=SwarmSecret("guessed wrong secret!!"))
    unsigned = bogus.model_copy(update={"sig": ""})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(600):
            for datagram in (
                os.urandom(i % 300 + 1),  # noise
                b"\x00" + os.urandom(20) + b"\xc1\xc1",  # msgpack that does not decode
                _request("store", os.urandom(20), digest(ALL_NODES), encode_value([bogus])),
                _request("store", os.urandom(20), digest(ALL_NODES), encode_value([unsigned])),
                _request("store", os.urandom(20), digest(ALL_NODES), "x" * 60_000),
                _request("store", b"short id", b"short key", 5),
                _request("find_node", os.urandom(40), [1, 2]),
                _request("find_value", "text id", digest(ALL_NODES)),
                _request("ping"),
                _request("no_such_rpc", os.urandom(20)),
                _request("find_node", os.urandom(20), os.urandom(20)),  # valid: a new id each time
                b"\x01" + os.urandom(20) + umsgpack.packb([1, 2]),  # a reply nobody asked for
            ):
                sock.sendto(datagram, target)
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # let the node read (a real flood would drop more)
    finally:
        sock.close()
    await asyncio.sleep(0.5)
    protocol = ring[0].protocol
    assert protocol.dropped > 0  # (how many the kernel's buffer lost first varies)
    assert ring[0].storage.rejected >= 1  # type: ignore[attr-defined]
    # one flooding socket took one routing-table slot, however many ids it made up
    assert len(ring[0].contacts()) <= 3
    assert await lookup(ring[0].port, ALL_NODES) == ["m0", "m1", "m2"]
    assert await lookup(ring[1].port, key_for_model("echo")) == ["m0", "m1"]


# -- real servers ---------------------------------------------------------------------


def test_servers_in_a_chain_see_each_other_and_forget_one_that_dies(tmp_path: Path) -> None:
    started = time.monotonic()
    with swarm(tmp_path, size=3, heartbeat=0.5) as (a, b, c):
        joined = time.monotonic() - started
        assert joined < 30
        status = a.dht_status()
        assert status["enabled"] is True
        assert status["routing_table_size"] >= 1
        ids = {m["id"] for m in status["members"]}
        assert status["id"] in ids and len(ids) == 3
        urls = {m["url"] for m in status["members"]}
        assert urls == {a.url, b.url, c.url}
        with with_node(c.server, tmp_path / "node-c", [echo_model(name="only-c")]):

            def c_serves() -> bool:
                rec = next(m for m in a.dht_status()["members"] if m["url"] == c.url)
                return rec["models"].get("only-c", {}).get("nodes") == 1

            wait_until(c_serves, 10, "C's record to list its node's model")
        # no key, no status; a client key may read it
        assert httpx.get(a.url + "/dht/status", timeout=5).status_code == 401
        r = httpx.get(a.url + "/dht/status", headers=a.headers("client"), timeout=5)
        assert r.status_code == 200
        c.server.kill()  # SIGKILL: C publishes nothing more
        killed = time.monotonic()
        wait_until(
            lambda: len(a.member_ids()) == 2 and len(b.member_ids()) == 2,
            10,
            "C's record to expire",
        )
        assert time.monotonic() - killed < 5  # ttl is three heartbeats (1.5 s) plus a read


def test_a_server_outside_a_swarm_says_so(server_process) -> None:  # type: ignore[no-untyped-def]
    server = server_process()
    r = httpx.get(
        server.url + "/dht/status",
        headers={"Authorization": f"Bearer {server.keys['client_key']}"},
        timeout=5,
    )
    assert r.status_code == 200
    assert r.json()["enabled"] is False


@pytest.fixture(scope="module")
def set_up(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("swarm-settings") / "d"
    cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
    return data_dir


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({}, ["--dht-port", "0", "--bootstrap", "127.0.0.1:9"], "needs the swarm's secret"),
        ({"OPENBEEPBOOP_SWARM_SECRET": SECRET}, ["--bootstrap", "nohost"], "is not host:port"),
        ({"OPENBEEPBOOP_SWARM_SECRET": "short"}, ["--dht-port", "0"], "at least 16 characters"),
        ({}, ["--dht-port", "70000"], "70000"),
    ],
)
def test_swarm_settings_mistakes_are_one_clear_line(
    set_up: Path, env: dict[str, str], flags: list[str], message: str
) -> None:
    data_dir = set_up
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openbeepboop.cli.server",
            "start",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        check=False,
    )
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_member_started_before_its_bootstrap_joins_when_it_comes_up(tmp_path: Path) -> None:
    from tests.swarms import free_udp_port

    first_port = free_udp_port()
    late = start_member(tmp_path / "late", bootstrap=f"127.0.0.1:{first_port}", heartbeat=0.5)
    try:
        wait_until(lambda: len(late.member_ids()) == 1, 5, "the member to list itself")
        first = start_member(tmp_path / "first", heartbeat=0.5, dht_port=first_port)
        try:
            wait_until(
                lambda: len(late.member_ids()) == 2 and len(first.member_ids()) == 2,
                15,
                "the two to find each other",
            )
        finally:
            first.server.kill()
    finally:
        late.server.kill()
