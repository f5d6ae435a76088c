"""One key across the swarm, in process: signed keys (made, verified, tampered with),
their adoption by a member that never saw them, the revocation gossip's core, and the
member-to-member authentication. The real thing, two servers in a swarm, is in
tests/test_swarm_keys_servers.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.keys import KEY_PATTERN, new_key
from openbeepboop.server.core.peer_auth import MAX_SKEW, check_peer, peer_header
from openbeepboop.server.core.signed_keys import new_signed_key, verified_id
from openbeepboop.server.core.swarm_keys import SwarmKeys, digest_of, parse_revocations
from openbeepboop.server.errors import AuthenticationFailed
from openbeepboop.server.models import Role, SwarmRevocation
from openbeepboop.server.store.sqlite import SqliteStore
from openbeepboop.swarm.records import MemberRecord
from openbeepboop.swarm.secret import SwarmSecret

SECRET = SwarmSecret("the swarm's secret, 16+ chars")
OTHER = SwarmSecret("another swarm's secret, 16+")
ROUTE = "/swarm/revocations"


# -- the format ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.CLIENT, Role.NODE])
def test_a_signed_key_is_a_key_and_verifies_to_its_id(role: Role) -> None:
    issued = new_signed_key(role, SECRET, "laptop")
    assert KEY_PATTERN.match(issued.secret)
    assert issued.secret.startswith(f"obb_{role.value}_s1")
    assert issued.record.id.startswith("key_") and len(issued.record.id) == 20
    assert issued.record.id[4:] in issued.secret  # the id travels in the key
    assert verified_id(issued.secret, SECRET) == issued.record.id


def test_admin_keys_are_never_signed() -> None:
    with pytest.raises(ValueError):
        new_signed_key(Role.ADMIN, SECRET)


def _swap(text: str, at: int) -> str:
    """`text` with the character at `at` replaced by another URL-safe one."""
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


def test_tampered_keys_do_not_verify() -> None:
    secret = new_signed_key(Role.CLIENT, SECRET).secret
    head = len("obb_client_s1")
    tampered = {
        "role changed": secret.replace("obb_client_", "obb_node_"),
        "id changed": secret[:head] + ("0" if secret[head] != "0" else "1") + secret[head + 1 :],
        "random changed": _swap(secret, head + 16 + 5),
        "MAC changed": _swap(secret, len(secret) - 3),
        "MAC cut": secret[:-2],
        "other swarm": new_signed_key(Role.CLIENT, OTHER).secret,
        "a local key": new_key(Role.CLIENT).secret,
    }
    assert {what: verified_id(s, SECRET) for what, s in tampered.items()} == dict.fromkeys(tampered)


def test_only_the_canonical_spelling_of_a_key_verifies() -> None:
    """base64's last character carries unused bits: another spelling of the same bytes
    would be a second secret for one key id."""
    secret = new_signed_key(Role.CLIENT, SECRET).secret
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(secret[-1])
    twins = [secret[:-1] + alphabet[(last & ~3) | low] for low in range(4)]
    assert [verified_id(t, SECRET) is not None for t in twins].count(True) == 1


# -- keyrings of two members ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def member_store(path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    async with member_store(tmp_path / "a.db") as a, member_store(tmp_path / "b.db") as b:
        yield a, b


async def test_a_key_made_on_one_member_works_on_another(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    ring_a, ring_b = KeyRing(a, signer=SECRET), KeyRing(b, signer=SECRET)
    for role in (Role.CLIENT, Role.NODE):
        issued = await ring_a.create(role, "laptop")
        key = await ring_b.authenticate(issued.secret)
        assert (key.id, key.role, key.key_hash) == (issued.record.id, role, issued.record.key_hash)
        assert key.name == "swarm key" and key.active
        assert await b.get_key_by_hash(issued.record.key_hash) == key  # kept from now on
        assert (await ring_b.authenticate(issued.secret)).id == key.id
    # an admin key stays with its server
    admin = await ring_a.create(Role.ADMIN)
    assert not admin.secret.startswith("obb_admin_s1")
    with pytest.raises(AuthenticationFailed, match="invalid API key"):
        await ring_b.authenticate(admin.secret)


async def test_keys_of_another_swarm_or_of_no_swarm_are_refused(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    issued = await KeyRing(a, signer=OTHER).create(Role.CLIENT)
    local = await KeyRing(a).create(Role.CLIENT)
    assert not local.secret.startswith("obb_client_s1")  # no secret: today's keys
    for ring in (KeyRing(b, signer=SECRET), KeyRing(b)):
        for secret in (issued.secret, local.secret):
            with pytest.raises(AuthenticationFailed, match="invalid API key"):
                await ring.authenticate(secret)
    assert await b.list_keys() == []


async def test_a_new_swarm_secret_ends_the_keys_made_under_the_old_one(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    swarm_key = await KeyRing(a, signer=SECRET).create(Role.CLIENT)
    local = await KeyRing(a).create(Role.CLIENT)
    assert (await KeyRing(b, signer=SECRET).authenticate(swarm_key.secret)).active  # kept on b
    for store in (a, b):  # where it was made, and where it was kept
        rotated = KeyRing(store, signer=OTHER)
        with pytest.raises(AuthenticationFailed, match="invalid API key"):
            await rotated.authenticate(swarm_key.secret)
    assert (await KeyRing(a, signer=OTHER).authenticate(local.secret)).id == local.record.id


async def test_a_key_the_swarm_revoked_is_refused_where_it_was_never_seen(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    issued = await KeyRing(a, signer=SECRET).create(Role.CLIENT)
    await b.add_revocations([SwarmRevocation(issued.record.id, 5.0, "a")])
    with pytest.raises(AuthenticationFailed, match="API key revoked"):
        await KeyRing(b, signer=SECRET).authenticate(issued.secret)
    kept = await b.get_key_by_hash(issued.record.key_hash)
    assert kept is not None and kept.revoked_at == 5.0


async def test_many_first_requests_at_once_keep_one_record(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    issued = await KeyRing(a, signer=SECRET).create(Role.CLIENT)
    rings = [KeyRing(b, signer=SECRET) for _ in range(4)]  # as replicas would be
    found = await asyncio.gather(*(r.authenticate(issued.secret) for r in rings for _ in "xy"))
    assert {k.id for k in found} == {issued.record.id}
    assert [k.id for k in await b.list_keys()] == [issued.record.id]


async def test_a_swarm_key_whose_id_is_taken_here_is_refused_not_a_500(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    issued = await KeyRing(a, signer=SECRET).create(Role.CLIENT)
    squatter = new_key(Role.CLIENT).record
    await b.create_key(replace(squatter, id=issued.record.id))
    with pytest.raises(AuthenticationFailed, match="invalid API key"):
        await KeyRing(b, signer=SECRET).authenticate(issued.secret)


async def test_revoking_a_swarm_key_records_it_for_the_swarm(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, _ = stores
    ring = KeyRing(a, clock=lambda: 7.0, signer=SECRET, origin="srv_a")
    swarm_key = await ring.create(Role.NODE)
    local_admin = await ring.create(Role.ADMIN)
    await ring.revoke(swarm_key.record.id)
    await ring.revoke(local_admin.record.id)
    assert await a.list_revocations() == [SwarmRevocation(swarm_key.record.id, 7.0, "srv_a")]


# -- the gossip ----------------------------------------------------------------------------


def record(name: str, digest: str) -> MemberRecord:
    return MemberRecord(
        id=f"srv_{name}",
        name=name,
        url=f"http://{name}.example:8000/",
        dht="127.0.0.1:1",
        version="1",
        started_at=0.0,
        ts=1.0,
        ttl=30.0,
        revocations=digest,
    )


async def test_sync_pulls_from_members_whose_digest_differs_and_stops_the_keys(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    ring_a, ring_b = KeyRing(a, signer=SECRET, origin="srv_a"), KeyRing(b, signer=SECRET)
    issued = await ring_a.create(Role.CLIENT)
    assert (await ring_b.authenticate(issued.secret)).active  # now cached on b
    await ring_a.revoke(issued.record.id)
    listed = [
        {"key_id": r.key_id, "revoked_at": r.revoked_at, "origin": r.origin}
        for r in await a.list_revocations()
    ]
    asked: list[str] = []

    async def fetch(url: str) -> Any:
        asked.append(url)
        if "down" in url:
            raise OSError("connection refused")
        return listed

    keys_b = SwarmKeys(b, ring_b, fetch)
    assert await keys_b.refresh() == ""
    members = [
        record("down", "0123456789abcdef"),
        record("same", ""),  # knows of no revocation: nothing to ask
        record("a", digest_of([issued.record.id])),
    ]
    with ring_b.watch(issued.record.id) as revoked:
        assert await keys_b.sync(members) == 1
        assert revoked.is_set()  # its open streams were told
    assert asked == [
        "http://down.example:8000/swarm/revocations",
        "http://a.example:8000/swarm/revocations",
    ]
    assert keys_b.digest() == digest_of([issued.record.id])
    with pytest.raises(AuthenticationFailed, match="API key revoked"):  # at once: cache dropped
        await ring_b.authenticate(issued.secret)
    # the digests agree now: nothing is fetched
    asked.clear()
    assert await keys_b.sync([record("a", keys_b.digest())]) == 0
    assert asked == []


async def test_the_publisher_always_holds_the_digest(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    """Learnt from the store, from a member, or revoked here: the next record says it."""
    a, _ = stores
    await a.add_revocations([SwarmRevocation("key_0123456789abcdef", 1.0, "x")])

    class Publisher:
        revocations = ""

    async def fetch(url: str) -> Any:
        return [{"key_id": "key_00000000000000aa", "revoked_at": 2.0, "origin": "b"}]

    ring = KeyRing(a, signer=SECRET)
    keys = SwarmKeys(a, ring, fetch)
    publisher = Publisher()
    keys.publish_to(publisher)
    assert publisher.revocations == ""
    await keys.refresh()
    assert publisher.revocations == digest_of(["key_0123456789abcdef"])
    await keys.sync([record("b", "ffffffffffffffff")])
    ids = ["key_0123456789abcdef", "key_00000000000000aa"]
    assert publisher.revocations == digest_of(ids)
    issued = await ring.create(Role.CLIENT)
    await ring.revoke(issued.record.id)  # no store read needed: at once
    assert publisher.revocations == digest_of([*ids, issued.record.id])
    assert keys.digest() == await keys.refresh()


def test_what_a_member_answers_is_checked_item_by_item() -> None:
    good = {"key_id": "key_0123456789abcdef", "revoked_at": 3, "origin": "srv_a"}
    junk: list[Any] = [
        "key_0123456789abcdef",
        {"key_id": "key_XYZ", "revoked_at": 1.0},
        {"key_id": "obb_client_secret", "revoked_at": 1.0},
        {"key_id": "key_0123456789abcdee", "revoked_at": "now"},
        {"key_id": "key_0123456789abcdee", "revoked_at": float("inf")},
        {"key_id": "key_0123456789abcdee", "revoked_at": True},
        {"key_id": "key_0123456789abcdee", "revoked_at": 1.0, "origin": "x" * 500},
    ]
    assert parse_revocations([*junk, good]) == [
        SwarmRevocation("key_0123456789abcdef", 3.0, "srv_a")
    ]
    assert parse_revocations({"data": [good]}) == []
    assert parse_revocations(None) == []


# -- member authentication -----------------------------------------------------------------


def test_member_authentication_refuses_missing_wrong_and_stale_headers() -> None:
    now = 1_000_000.0
    good = peer_header(SECRET, "GET", ROUTE, now)
    check_peer(SECRET, "GET", ROUTE, good, now + MAX_SKEW - 1)
    refused = {
        "missing_swarm_auth": [None, ""],
        "invalid_swarm_auth": [
            peer_header(OTHER, "GET", ROUTE, now),
            peer_header(SECRET, "GET", "/v1/models", now),
            peer_header(SECRET, "POST", ROUTE, now),
            good.replace(".", ".00", 1),
            good[:20],
            "x.y",
            "99999999999999999999." + good.split(".")[1],
        ],
        "stale_swarm_auth": [
            peer_header(SECRET, "GET", ROUTE, now - MAX_SKEW - 5),
            peer_header(SECRET, "GET", ROUTE, now + MAX_SKEW + 5),
        ],
    }
    for code, values in refused.items():
        for value in values:
            with pytest.raises(AuthenticationFailed) as caught:
                check_peer(SECRET, "GET", ROUTE, value, now)
            assert caught.value.code == code, value
