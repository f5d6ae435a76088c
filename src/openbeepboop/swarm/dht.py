"""A Kademlia DHT node on asyncio (the `kademlia` package), hardened for open networks.

The library trusts what arrives: a datagram that does not decode, a request with the
wrong arguments or a reply with a malformed node list raises inside its tasks, and a
node id of the wrong length corrupts the routing table. `SwarmProtocol` checks every
datagram, request and reply first and drops what does not fit, counting it; at most
`MAX_INFLIGHT` requests are handled at once (more are dropped, as a busy UDP server
would). Values are whatever the storage accepts (`storage.RecordStorage` for a member,
`storage.NoStorage` for a client).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import umsgpack
from kademlia.crawling import ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage

from openbeepboop.swarm.records import MAX_VALUE_BYTES
from openbeepboop.swarm.storage import digest

log = logging.getLogger("openbeepboop.swarm")

MAX_DATAGRAM = 65_507
MAX_INFLIGHT = 256
REQUESTS = {"ping": 1, "store": 3, "find_node": 2, "find_value": 2}
# A client's node id begins with this mark: members answer it but never take it into
# their routing tables (a client leaves soon; as a contact it would only cost the next
# lookups a timeout each, until it is found dead).
CLIENT_MARK = b"obb-client:"


def client_node_id() -> bytes:
    return CLIENT_MARK + os.urandom(20 - len(CLIENT_MARK))


@dataclass(frozen=True, slots=True)
class Contact:
    """A DHT peer in the routing table."""

    id: str  # hex
    host: str
    port: int


def _node_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 20


def _node_list(value: object, limit: int) -> bool:
    if not isinstance(value, list) or len(value) > limit:
        return False
    return all(
        isinstance(t, list | tuple)
        and len(t) == 3
        and _node_id(t[0])
        and isinstance(t[1], str)
        and 0 < len(t[1]) <= 255
        and isinstance(t[2], int)
        and 0 < t[2] < 65536
        for t in value
    )


def _stored_value(value: object) -> bool:
    return isinstance(value, str | bytes) and len(value) <= MAX_VALUE_BYTES


class SwarmProtocol(KademliaProtocol):  # type: ignore[misc]  # kademlia is untyped
    """Kademlia's protocol with every datagram checked before the library sees it."""

    def __init__(self, source_node: Node, storage: IStorage, ksize: int, timeout: float) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = timeout
        self.inflight = 0
        self.dropped = 0
        self._tasks: set[asyncio.Future[None]] = set()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not 22 <= len(data) <= MAX_DATAGRAM or data[:1] not in (b"\x00", b"\x01"):
            self.dropped += 1
            return
        if data[:1] == b"\x00" and self.inflight >= MAX_INFLIGHT:
            self.dropped += 1
            return
        task = asyncio.ensure_future(self._solve(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _solve(self, datagram: bytes, address: tuple[str, int]) -> None:
        msg_id = datagram[1:21]
        try:
            data = umsgpack.unpackb(datagram[21:])
        except Exception:  # anything that does not decode is dropped
            self.dropped += 1
            return
        if datagram[:1] == b"\x01":
            if msg_id in self._outstanding:
                self._accept_response(msg_id, data, address)
            return
        if not self._well_formed(data):
            self.dropped += 1
            return
        self.inflight += 1
        try:
            await self._accept_request(msg_id, data, address)
        except Exception:  # one bad request must not stop the node
            self.dropped += 1
            log.debug("dropped a DHT request from %s", address, exc_info=True)
        finally:
            self.inflight -= 1

    @staticmethod
    def _well_formed(data: object) -> bool:
        if not isinstance(data, list) or len(data) != 2:
            return False
        name, args = data
        if name not in REQUESTS or not isinstance(args, list | tuple):
            return False
        if len(args) != REQUESTS[name] or not all(_node_id(a) for a in args[:2]):
            return False
        return name != "store" or _stored_value(args[2])

    def _timeout(self, msg_id: bytes) -> None:
        # the library sets the result even when the caller was cancelled meanwhile
        future, _ = self._outstanding.pop(msg_id, (None, None))
        if future is not None and not future.done():
            future.set_result((False, None))

    def close(self) -> None:
        """Stop every pending request's timer (at shutdown)."""
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()

    def welcome_if_new(self, node: Node) -> None:
        """One contact per address: a new id from an address the table already holds
        replaces the old one (a restarted peer), so a flood of made-up ids from one
        socket takes one slot, not the table. A client (`CLIENT_MARK`) is never taken in."""
        if bytes(node.id).startswith(CLIENT_MARK) or not self.router.is_new_node(node):
            return
        for bucket in self.router.buckets:
            for held in bucket.get_nodes():
                if held.same_home_as(node):
                    self.router.remove_contact(held)
        super().welcome_if_new(node)

    # replies: what does not fit counts as no reply (the contact is dropped)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> Any:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_node(address, self.source_node.id, node_to_find.id)
        ok = result[0] and _node_list(result[1], self.router.ksize * 2)
        return self.handle_call_response(result if ok else (False, None), node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> Any:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.find_value(address, self.source_node.id, node_to_find.id)
        reply = result[1]
        ok = result[0] and (
            (isinstance(reply, dict) and set(reply) == {"value"} and _stored_value(reply["value"]))
            or _node_list(reply, self.router.ksize * 2)
        )
        return self.handle_call_response(result if ok else (False, None), node_to_ask)

    async def call_ping(self, node_to_ask: Node) -> Any:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.ping(address, self.source_node.id)
        ok = result[0] and _node_id(result[1])
        return self.handle_call_response(result if ok else (False, None), node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: object) -> Any:
        address = (node_to_ask.ip, node_to_ask.port)
        result = await self.store(address, self.source_node.id, key, value)
        ok = result[0] and result[1] is True
        return self.handle_call_response(result if ok else (False, None), node_to_ask)


class _AllValues(ValueSpiderCrawl):  # type: ignore[misc]
    """A value lookup that returns every value found in the round that found one (the
    library keeps the most common, the wrong rule for sets merged by members)."""

    async def _handle_found_values(self, values: list[object]) -> list[object]:
        return values


class _Server(Server):  # type: ignore[misc]
    def __init__(
        self, storage: IStorage, ksize: int, alpha: int, timeout: float, node_id: bytes | None
    ) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id, storage=storage)
        self._timeout = timeout

    def _create_protocol(self) -> SwarmProtocol:
        return SwarmProtocol(self.node, self.storage, self.ksize, self._timeout)

    def refresh_table(self, interval: float = 600) -> None:
        super().refresh_table(interval)


async def resolve(addrs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Host names as IPv4 addresses (the library takes addresses only); names that do
    not resolve are left out, with a warning."""
    loop = asyncio.get_running_loop()
    out: list[tuple[str, int]] = []
    for host, port in addrs:
        try:
            infos = await loop.getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            log.warning("bootstrap address %s:%s does not resolve: %s", host, port, exc)
            continue
        out.append((str(infos[0][4][0]), port))
    return out


class Dht:
    """One DHT node: listen, join through bootstrap addresses, store and read values."""

    def __init__(
        self,
        storage: IStorage,
        *,
        ksize: int = 20,
        alpha: int = 3,
        timeout: float = 2.0,
        client: bool = False,
    ) -> None:
        """`client`: a node that only looks up (`CLIENT_MARK`): members leave it out of
        their routing tables."""
        node_id = client_node_id() if client else None
        self._server = _Server(storage, ksize, alpha, timeout, node_id)
        self.storage = storage

    @property
    def node_id(self) -> str:
        return bytes(self._server.node.id).hex()

    @property
    def protocol(self) -> SwarmProtocol:
        protocol: SwarmProtocol = self._server.protocol
        return protocol

    @property
    def port(self) -> int:
        transport = self._server.transport
        return int(transport.get_extra_info("sockname")[1]) if transport else 0

    async def start(self, host: str, port: int) -> None:
        """Listen on UDP `host:port` (0: any free port)."""
        await self._server.listen(port, interface=host)

    async def join(self, addrs: Sequence[tuple[str, int]]) -> int:
        """Bootstrap through those of `addrs` (host names allowed) not yet in the routing
        table; the contacts known after. Cheap to repeat: a bootstrap peer that was down
        is joined once it answers."""
        known = {(c.host, c.port) for c in self.contacts()} | {("127.0.0.1", self.port)}
        missing = [a for a in await resolve(addrs) if a not in known]
        if missing:
            await self._server.bootstrap(missing)
        return len(self.contacts())

    async def put(self, key: str, value: str) -> bool:
        """Store `value` under `key` on the nodes closest to it (here too when this node
        is among them, or alone). Whether any node took it."""
        stored = await self._server.set_digest(digest(key), value)
        if not self.contacts() or not stored:
            self.storage[digest(key)] = value
        return bool(stored)

    async def get_all(self, key: str) -> list[object]:
        """Every value held under `key`: this node's own and those of the nodes the
        lookup reached."""
        dkey = digest(key)
        values: list[object] = []
        own = self.storage.get(dkey)
        if own is not None:
            values.append(own)
        node = Node(dkey)
        nearest = self.protocol.router.find_neighbors(node)
        if nearest:
            server = self._server
            spider = _AllValues(self.protocol, node, nearest, server.ksize, server.alpha)
            found = await spider.find()
            if isinstance(found, list):
                values.extend(found)
        return values

    def contacts(self) -> list[Contact]:
        """The routing table's peers."""
        router = self.protocol.router if self._server.protocol else None
        if router is None:
            return []
        return [
            Contact(bytes(n.id).hex(), n.ip, n.port) for b in router.buckets for n in b.get_nodes()
        ]

    def stop(self) -> None:
        if self._server.protocol is not None:
            self.protocol.close()
        self._server.stop()
