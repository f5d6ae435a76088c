"""A member's record: what a server publishes in the DHT every heartbeat, and how a
record is signed, checked and bounded.

A DHT key holds one value and the last write wins, so a member never writes a value of
its own to a shared key: every key holds a *set* of records, one per member, merged by
the members that store it (`storage.RecordStorage`) and again by whoever reads it. The
keys (`key_for_*`):

- `node:<id>`      the member's own record
- `all_nodes`      every member's record
- `model:<name>`   the records of the members that serve `name`

A stored value is a JSON list of records. Each record carries `sig`, an HMAC under the
swarm secret: members store and use only records that verify (a datagram from outside
the swarm cannot plant one). Clients, which hold no secret, read what members stored,
then ask each server's `/status` before they send it work.

Bounds, enforced on every record read or stored: `MAX_RECORD_BYTES` a record,
`MAX_MODELS` models in one, `MAX_VALUE_BYTES` a stored value (`MAX_RECORDS` records),
a time to live between 1 and `MAX_TTL` seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openbeepboop.swarm.secret import SwarmSecret

VERSION = 1
MAX_RECORD_BYTES = 4096
MAX_MODELS = 64
MAX_RECORDS = 64
MAX_VALUE_BYTES = 48 * 1024
MAX_TTL = 600.0
PURPOSE = "records"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ALL_NODES = "all_nodes"


def key_for_member(member_id: str) -> str:
    return f"node:{member_id}"


def key_for_model(model: str) -> str:
    return f"model:{model}"


class ModelLoad(BaseModel):
    """One model on a member: jobs waiting and running, live nodes serving it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    queued: int = Field(0, ge=0, le=10**12)
    running: int = Field(0, ge=0, le=10**9)
    nodes: int = Field(0, ge=0, le=10**6)


class MemberRecord(BaseModel):
    """What one server publishes. `ts` is when it was made (the member's clock), `ttl`
    how long it stays good without a newer one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = Field(VERSION, ge=VERSION, le=VERSION)
    id: str = Field(pattern=ID_PATTERN)
    name: str = Field("", max_length=64)
    url: str = Field(max_length=256, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    dht: str = Field("", max_length=64, description="host:port of the member's DHT")
    version: str = Field("", max_length=32)
    started_at: float = Field(ge=0, le=1e11)
    ts: float = Field(ge=0, le=1e11)
    ttl: float = Field(ge=1, le=MAX_TTL)
    models: dict[str, ModelLoad] = Field(default_factory=dict, max_length=MAX_MODELS)
    queued: int = Field(0, ge=0, le=10**12)
    running: int = Field(0, ge=0, le=10**9)
    nodes: int = Field(0, ge=0, le=10**6)
    tokens_per_s: float = Field(0.0, ge=0, le=1e9)
    revocations: str = Field("", max_length=64, description="digest of known revocations")
    sig: str = Field("", max_length=64)

    def body(self) -> bytes:
        """The signed bytes: canonical JSON of every field but `sig`."""
        data = self.model_dump(exclude={"sig"})
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, secret: SwarmSecret) -> MemberRecord:
        return self.model_copy(update={"sig": secret.mac(PURPOSE, self.body()).hex()})

    def verified(self, secret: SwarmSecret) -> bool:
        try:
            mac = bytes.fromhex(self.sig)
        except ValueError:
            return False
        return secret.verify(PURPOSE, self.body(), mac)

    def dht_keys(self) -> list[str]:
        """The DHT keys this record is published under."""
        return [key_for_member(self.id), ALL_NODES, *(key_for_model(m) for m in self.models)]

    def encode(self) -> str:
        return self.model_dump_json()

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.ts + self.ttl

    @property
    def uptime(self) -> float:
        return max(0.0, self.ts - self.started_at)


def parse_record(data: object) -> MemberRecord | None:
    """A record from decoded JSON, or None if it is not a valid, bounded record."""
    if not isinstance(data, Mapping):
        return None
    try:
        record = MemberRecord.model_validate(data)
    except (ValidationError, ValueError, TypeError):
        return None
    if len(record.encode()) > MAX_RECORD_BYTES:
        return None
    if any(not m or len(m) > 128 for m in record.models):
        return None
    return record


def parse_value(value: object) -> list[MemberRecord]:
    """The valid records of a stored DHT value (a JSON list, or one record); invalid
    entries are dropped, the rest capped at `MAX_RECORDS`."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return []
    if not isinstance(value, str) or len(value) > MAX_VALUE_BYTES:
        return []
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        return []
    items = data if isinstance(data, list) else [data]
    out = []
    for item in items[: MAX_RECORDS * 2]:
        record = parse_record(item)
        if record is not None:
            out.append(record)
    return out[:MAX_RECORDS]


def encode_value(records: Iterable[MemberRecord]) -> str:
    """Records as one stored value, newest first, within `MAX_VALUE_BYTES`."""
    parts: list[str] = []
    size = 2
    for record in sorted(records, key=lambda r: -r.ts)[:MAX_RECORDS]:
        text = record.encode()
        if size + len(text) + 1 > MAX_VALUE_BYTES:
            break
        parts.append(text)
        size += len(text) + 1
    return "[" + ",".join(parts) + "]"


def merge(records: Iterable[MemberRecord], now: float | None = None) -> list[MemberRecord]:
    """One record per member, the newest, unexpired; newest first."""
    now = time.time() if now is None else now
    best: dict[str, MemberRecord] = {}
    for record in records:
        if record.expired(now):
            continue
        held = best.get(record.id)
        if held is None or record.ts > held.ts:
            best[record.id] = record
    return sorted(best.values(), key=lambda r: -r.ts)
