"""Client discovery: which servers of a swarm serve a model, and which to try first.

A `Discovery` is a small, short-lived DHT node of the client's own (`Dht(NoStorage())`:
it stores nothing and holds no secret). It joins through the bootstrap addresses on its
first lookup, reads the members' records under `model:<name>` (or `all_nodes`), and
keeps what it read for `ttl` seconds. `rank` orders the members by load: the model's
queue depth (plus what this client sent there since the record was made), then tokens
per second (faster first), then the member's whole queue. A member found unreachable is
left out for `down_seconds` (tried last if nothing else is left).

Before a member is used its `GET /status` is asked (with the client's key, as every
call): a member that answers with another id is dropped (the URL now belongs to someone
else), one that does not answer is marked down, and load figures in the answer replace
the record's (they are newer). A server without `/status` (or refusing the key there)
keeps its record.

The client holds no swarm secret, so it cannot check a record's signature itself: it
reads what the members stored (they store only records that verify), and trusts the DHT
peers it asks to pass those on unchanged. Bootstrap from members you trust.

The DHT needs the `swarm` extra (kademlia); it is imported on first use only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from openbeepboop.client.errors import APIConnectionError, OpenBeepBoopError
from openbeepboop.swarm.records import (
    ALL_NODES,
    MemberRecord,
    ModelLoad,
    key_for_model,
    merge,
    parse_value,
)

if TYPE_CHECKING:
    from openbeepboop.swarm.dht import Dht

log = logging.getLogger("openbeepboop.client")

EXTRA_MISSING = (
    "finding servers through a swarm needs the swarm extra: pip install 'openbeepboop[swarm]'"
)
SENT_MEMORY = 600.0  # seconds a submit counts toward a member's load at most


class SwarmExtraMissing(OpenBeepBoopError):
    """The `swarm` extra (kademlia) is not installed."""


def parse_bootstrap(value: str | Sequence[str] | None) -> list[tuple[str, int]]:
    """`"host:port,host:port"` (or a list of such) as (host, port) pairs; ValueError
    names the entry that is not one."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bootstrap address {item!r} is not host:port")
        out.append((host, int(port)))
    return out


@dataclass
class Seen:
    """Records read for one key, and when."""

    records: list[MemberRecord]
    at: float  # monotonic


@dataclass
class Discovery:
    """Finds the members of a swarm from bootstrap addresses and ranks them by load."""

    bootstrap: list[tuple[str, int]]
    ttl: float = 3.0
    down_seconds: float = 30.0
    probe: bool = True
    probe_timeout: float = 2.0
    dht_timeout: float = 1.0  # seconds for a DHT peer's reply (a dead one costs this)
    host: str = "0.0.0.0"
    headers: dict[str, str] = field(default_factory=dict)  # for `/status`: the key
    _dht: Dht | None = field(default=None, init=False)
    _lock: asyncio.Lock | None = field(default=None, init=False)
    _seen: dict[str, Seen] = field(default_factory=dict, init=False)
    _down: dict[str, float] = field(default_factory=dict, init=False)  # url -> until
    _sent: dict[str, list[float]] = field(default_factory=dict, init=False)  # wall times
    # url -> (wall time, monotonic time, the answer) of its last `/status`
    _status: dict[str, tuple[float, float, dict[str, Any]]] = field(
        default_factory=dict, init=False
    )

    async def members(self, model: str | None = None) -> list[MemberRecord]:
        """The live members' records under the model's key (every member's for None),
        confirmed by `/status`; read from the DHT at most every `ttl` seconds."""
        key = ALL_NODES if model is None else key_for_model(model)
        seen = self._seen.get(key)
        if seen is not None and time.monotonic() - seen.at < self.ttl:
            return seen.records
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            seen = self._seen.get(key)
            if seen is None or time.monotonic() - seen.at >= self.ttl:
                records = await self._lookup(key)
                if self.probe:
                    records = await self._confirm(records)
                seen = self._seen[key] = Seen(records, time.monotonic())
        return seen.records

    async def _lookup(self, key: str) -> list[MemberRecord]:
        dht = await self._joined()
        values = await dht.get_all(key)
        return merge(r for v in values for r in parse_value(v))

    async def _joined(self) -> Dht:
        if self._dht is not None and self._dht.contacts():
            return self._dht
        if self._dht is None:
            try:
                from openbeepboop.swarm.dht import Dht
                from openbeepboop.swarm.storage import NoStorage
            except ImportError as exc:
                raise SwarmExtraMissing(EXTRA_MISSING, code="swarm_extra_missing") from exc
            dht = Dht(NoStorage(), timeout=self.dht_timeout, client=True)
            await dht.start(self.host, 0)
            self._dht = dht
        if not await self._dht.join(self.bootstrap):
            where = ", ".join(f"{h}:{p}" for h, p in self.bootstrap) or "(none given)"
            raise APIConnectionError(
                f"no swarm member answered at the bootstrap address {where} "
                "(is a server there started with --dht-port?)",
                code="swarm_unreachable",
            )
        return self._dht

    async def _confirm(self, records: list[MemberRecord]) -> list[MemberRecord]:
        """Each member's `/status`, asked at once; see the module's docstring."""
        async with httpx.AsyncClient(timeout=self.probe_timeout, headers=self.headers) as http:
            answers = await asyncio.gather(*(self._probe(http, r) for r in records))
        return [r for r, keep in zip(records, answers, strict=True) if keep is not None]

    async def _probe(self, http: httpx.AsyncClient, record: MemberRecord) -> MemberRecord | None:
        url = record.url.rstrip("/")
        held = self._status.get(url)
        if held is not None and time.monotonic() - held[1] < self.ttl:
            data: dict[str, Any] | None = held[2]  # asked for another key's lookup just now
        else:
            try:
                r = await http.get(url + "/status")
            except httpx.HTTPError:
                self.mark_down(url)
                return record  # kept, ranked last while down: the record may be right
            data = _json_dict(r) if r.status_code == 200 else None
        if data is None:
            return record
        other = data.get("id") or data.get("node_id")
        if isinstance(other, str) and other and other != record.id:
            log.warning("swarm member %s: %s answers as %s; left out", record.id, url, other)
            return None
        if held is None or held[2] is not data:
            self._down.pop(url, None)
            self._status[url] = (time.time(), time.monotonic(), data)
        return record

    # -- ranking ----------------------------------------------------------------------

    def rank(self, records: Iterable[MemberRecord], model: str | None) -> list[str]:
        """The members' URLs, best first: see the module's docstring. Members down are
        last; a member whose record lists the model without a live node comes after
        those with one."""
        now = time.monotonic()
        scored = []
        for record in records:
            url = record.url.rstrip("/")
            load, total, nodes, rate = self._load(record, model)
            since = self._status.get(url, (record.ts, 0.0, {}))[0]
            pending = self.sent_since(url, since)
            down = self._down.get(url, 0.0) > now
            scored.append(((down, nodes == 0, load + pending, -rate, total + pending), url))
        seen: set[str] = set()
        out = []
        for _, url in sorted(scored):
            if url not in seen:
                seen.add(url)
                out.append(url)
        return out

    def _load(self, record: MemberRecord, model: str | None) -> tuple[int, int, int, float]:
        """(the model's queue, the whole queue, the model's live nodes, tokens/s), from
        the member's `/status` where it says, else from its record."""
        entry = record.models.get(model) if model is not None else None
        load = entry or ModelLoad(queued=record.queued, running=0, nodes=record.nodes)
        total, rate = record.queued, record.tokens_per_s
        status = self._status.get(record.url.rstrip("/"), (0.0, 0.0, {}))[2]
        models = status.get("models")
        fresh = models.get(model) if isinstance(models, dict) and model is not None else None
        if isinstance(fresh, dict):
            load = ModelLoad(
                queued=_int(fresh.get("queued"), load.queued),
                running=_int(fresh.get("running"), load.running),
                nodes=_int(fresh.get("nodes"), load.nodes),
            )
        total = _int(status.get("queued"), total)
        rate = _float(status.get("tokens_per_s", status.get("tokens_per_second")), rate)
        return load.queued, total, load.nodes, rate

    def note_sent(self, url: str, count: int = 1) -> None:
        """Count `count` jobs this client just queued on `url` toward its load, until a
        newer record or `/status` says what the member has."""
        now = time.time()
        times = [t for t in self._sent.get(url, []) if now - t < SENT_MEMORY]
        self._sent[url] = times + [now] * count

    def sent_since(self, url: str, since: float) -> int:
        return sum(1 for t in self._sent.get(url, []) if t > since)

    def mark_down(self, url: str) -> None:
        """Leave `url` out (last) for `down_seconds`."""
        self._down[url.rstrip("/")] = time.monotonic() + self.down_seconds

    def is_down(self, url: str) -> bool:
        return self._down.get(url.rstrip("/"), 0.0) > time.monotonic()

    def forget(self) -> None:
        """Read the DHT again on the next lookup."""
        self._seen.clear()

    def close(self) -> None:
        if self._dht is not None:
            self._dht.stop()
            self._dht = None


def _json_dict(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _int(value: object, default: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else default  # type: ignore[return-value]


def _float(value: object, default: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else default  # type: ignore[arg-type]
