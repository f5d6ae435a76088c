"""This server as a member of a swarm: it keeps a DHT node, republishes its record every
heartbeat and keeps a view of the other members (docs/swarm.md).

Each heartbeat: join through the bootstrap addresses while no peer is known (so a
member started before its bootstrap joins when it comes up), publish this server's
signed record under its keys (`MemberRecord.dht_keys`), read `all_nodes` back, and keep
the records that verify. A member drops out of the view `ttl` seconds (three heartbeats)
after its record last changed, timed by this server's clock. Work that needs the view on
each heartbeat (the revocation gossip) registers with `on_beat`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from openbeepboop.server.core.identity import ServerIdentity
from openbeepboop.server.core.passes import one_pass
from openbeepboop.server.core.status import ServerStatus
from openbeepboop.swarm.dht import Dht
from openbeepboop.swarm.records import (
    ALL_NODES,
    MAX_MODELS,
    MAX_TTL,
    MemberRecord,
    ModelLoad,
    encode_value,
    merge,
    parse_value,
)
from openbeepboop.swarm.secret import SwarmSecret
from openbeepboop.swarm.storage import RecordStorage

log = logging.getLogger("openbeepboop.swarm")

TTL_BEATS = 3


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    identity: ServerIdentity
    secret: SwarmSecret
    dht_host: str  # listen address
    dht_port: int  # 0: any free port
    advertise_host: str  # how others reach the DHT node
    bootstrap: tuple[tuple[str, int], ...]
    heartbeat: float


Beat = Callable[[list[MemberRecord]], Awaitable[Any]]


class SwarmMember:
    """The DHT node, the publisher and the view of the other members."""

    def __init__(
        self,
        config: SwarmConfig,
        read_status: Callable[[], Awaitable[ServerStatus]],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._read_status = read_status
        self._clock = clock
        self._monotonic = monotonic
        self._storage = RecordStorage(config.secret, monotonic)
        self._dht = Dht(self._storage, timeout=self.dht_timeout)
        self._view: dict[str, tuple[MemberRecord, float]] = {}  # id -> (record, since)
        self._beats: list[tuple[str, Beat]] = []
        self.revocations = ""  # digest of known revocations, published (core/swarm_keys.py)
        self.published_at = 0.0
        self.beats = 0

    @property
    def member_id(self) -> str:
        return self.config.identity.id

    @property
    def secret(self) -> SwarmSecret:
        return self.config.secret

    @property
    def dht_timeout(self) -> float:
        """How long a DHT request waits for a reply: up to 2 s, less with a short
        heartbeat (a peer that died costs a heartbeat at most this, a few times)."""
        return min(2.0, max(0.3, self.config.heartbeat))

    @property
    def ttl(self) -> float:
        """A record's life without a refresh: three heartbeats, and at least one
        heartbeat plus four DHT timeouts (a heartbeat that waits on dead peers must
        not let live members' records lapse)."""
        beats = max(TTL_BEATS * self.config.heartbeat, self.config.heartbeat + 4 * self.dht_timeout)
        return min(MAX_TTL, max(1.0, beats))

    @property
    def dht_address(self) -> str:
        return f"{self.config.advertise_host}:{self._dht.port}"

    def on_beat(self, name: str, beat: Beat) -> None:
        """Run `beat(members)` after each heartbeat's publish and read."""
        self._beats.append((name, beat))

    async def start(self) -> None:
        """Listen (the DHT's UDP port); joining happens on the heartbeats."""
        quiet_library_logs()
        await self._dht.start(self.config.dht_host, self.config.dht_port)
        log.info(
            "swarm member %s: DHT on %s, swarm %s",
            self.member_id,
            self.dht_address,
            self.secret.fingerprint(),
        )

    async def run(self) -> None:
        """Heartbeats until cancelled."""
        while True:
            await one_pass("swarm heartbeat", self.beat, log)
            await asyncio.sleep(self.config.heartbeat)

    def stop(self) -> None:
        self._dht.stop()

    async def beat(self) -> None:
        """Publish, join through bootstrap peers not yet known, read the view, then
        the registered work."""
        await self.publish()
        if self.config.bootstrap:
            joined = not self._dht.contacts()
            await self._dht.join(self.config.bootstrap)
            if joined and self._dht.contacts():  # first contact: tell the swarm at once
                await self.publish()
        await self.refresh()
        self.beats += 1
        members = self.members()
        for name, beat in self._beats:
            await one_pass(name, functools.partial(beat, members), log)

    async def record(self) -> MemberRecord:
        """This server's record now, signed."""
        status = await self._read_status()
        ident = self.config.identity
        return MemberRecord(
            id=ident.id,
            name=ident.name,
            url=ident.url,
            dht=self.dht_address,
            version=ident.version,
            started_at=ident.started_at,
            ts=self._clock(),
            ttl=self.ttl,
            models=published_models(status),
            queued=status.queued,
            running=status.running,
            nodes=status.nodes,
            tokens_per_s=status.tokens_per_s,
            revocations=self.revocations,
        ).signed(self.secret)

    async def publish(self) -> None:
        record = await self.record()
        value = encode_value([record])
        await asyncio.gather(*(self._dht.put(key, value) for key in record.dht_keys()))
        self._see(record)
        self.published_at = record.ts

    async def refresh(self) -> None:
        values = await self._dht.get_all(ALL_NODES)
        for record in merge(r for v in values for r in parse_value(v)):
            if record.verified(self.secret):
                self._see(record)

    def _see(self, record: MemberRecord) -> None:
        held = self._view.get(record.id)
        if held is None or record.ts > held[0].ts:
            self._view[record.id] = (record, self._monotonic())

    def members(self, include_self: bool = False) -> list[MemberRecord]:
        """The live members' records (the others', unless `include_self`), by id."""
        now = self._monotonic()
        for member_id, (record, at) in list(self._view.items()):
            if now - at > record.ttl and member_id != self.member_id:  # never this server
                del self._view[member_id]
        return sorted(
            (r for r, _ in self._view.values() if include_self or r.id != self.member_id),
            key=lambda r: r.id,
        )

    def member(self, member_id: str) -> MemberRecord | None:
        return next((r for r in self.members(True) if r.id == member_id), None)

    def serving(self, model: str) -> list[MemberRecord]:
        """The other members with a live node serving `model`, least loaded first
        (queued, then running per node, then tokens/s)."""
        found = [r for r in self.members() if r.models.get(model, ModelLoad()).nodes > 0]
        return sorted(found, key=lambda r: _load_key(r, model))

    def status(self) -> dict[str, Any]:
        """What GET /dht/status answers."""
        contacts = self._dht.contacts()
        now = self._monotonic()
        return {
            "enabled": True,
            "id": self.member_id,
            "node_id": self._dht.node_id,
            "dht": self.dht_address,
            "swarm": self.secret.fingerprint(),
            "bootstrap": [f"{h}:{p}" for h, p in self.config.bootstrap],
            "heartbeat_interval": self.config.heartbeat,
            "last_publish": self.published_at or None,
            "routing_table_size": len(contacts),
            "peers": [{"id": c.id, "host": c.host, "port": c.port} for c in contacts],
            "records_seen": len(self.members(True)),
            "members": [
                {**_summary(r), "age": round(now - at, 1)}
                for r, at in sorted(self._view.values(), key=lambda v: v[0].id)
            ],
            "dropped_datagrams": self._dht.protocol.dropped,
            "rejected_records": self._storage.rejected,
        }


def published_models(status: ServerStatus) -> dict[str, ModelLoad]:
    """The models a record can carry (names up to 128 characters, `MAX_MODELS` of
    them): those a node serves first, then those with the most work."""
    fits = [(m, c) for m, c in status.models.items() if len(m) <= 128]
    fits.sort(key=lambda mc: (mc[1].nodes == 0, -(mc[1].queued + mc[1].running), mc[0]))
    return {
        m: ModelLoad(queued=c.queued, running=c.running, nodes=c.nodes)
        for m, c in fits[:MAX_MODELS]
    }


def quiet_library_logs() -> None:
    """The DHT library logs every datagram at INFO and each peer that does not answer
    at ERROR: a member says what matters itself. Unless this server logs at DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("kademlia", "rpcudp"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _load_key(record: MemberRecord, model: str) -> tuple[float, float, float]:
    load = record.models.get(model, ModelLoad())
    return (load.queued, load.running / max(1, load.nodes), -record.tokens_per_s)


def _summary(record: MemberRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "url": record.url,
        "dht": record.dht,
        "version": record.version,
        "uptime": round(record.uptime, 1),
        "models": {m: load.model_dump() for m, load in record.models.items()},
        "queued": record.queued,
        "running": record.running,
        "nodes": record.nodes,
        "tokens_per_s": record.tokens_per_s,
        "revocations": record.revocations,
    }
