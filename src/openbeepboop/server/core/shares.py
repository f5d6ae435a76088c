"""Shares: who the fair-share turn serves (docs/scheduling.md).

A job's share is its key's group, or the key itself. Within one priority, the claim
serves the shares with queued jobs of a model in weighted turn (store/fair.py has the
arithmetic); an admin sets a share's weight and its optional quotas per hour here, in
the store, so that every server of a deployment applies the same.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

from openbeepboop.server.errors import InvalidRequest, NotFound
from openbeepboop.server.models import Share
from openbeepboop.server.store.base import Store

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")
MAX_WEIGHT = 1000.0


def check_group(name: str) -> str:
    """A group's name as given, or InvalidRequest: 1 to 64 letters, digits or `._:@-`,
    not shaped like a key id (a group named so would share that key's turn)."""
    if not NAME.match(name):
        raise InvalidRequest(
            f"group {name!r}: 1 to 64 letters, digits or . _ : @ -, starting with a letter "
            "or digit",
            param="group",
        )
    if name.startswith("key_"):
        raise InvalidRequest(
            f"group {name!r}: a group's name may not start with 'key_' (key ids do)",
            param="group",
        )
    return name


def check_share(share: Share) -> Share:
    """`share` if its values are usable, else InvalidRequest naming the one that is not."""
    if not (NAME.match(share.name) or KEY_ID.match(share.name)):
        raise InvalidRequest(
            f"share {share.name!r}: a group's name or a key id (key_ and 16 hex digits)",
            param="name",
        )
    w = share.weight
    if not (math.isfinite(w) and 0 < w <= MAX_WEIGHT):
        raise InvalidRequest(
            f"weight {w!r}: a number above 0 and at most {MAX_WEIGHT:g}", param="weight"
        )
    for field, value in (
        ("jobs_per_hour", share.jobs_per_hour),
        ("tokens_per_hour", share.tokens_per_hour),
    ):
        if value is not None and not (0 <= value <= 2**53):
            raise InvalidRequest(f"{field} {value!r}: a whole number, 0 or more", param=field)
    return share


class ShareBook:
    """What an admin sets for shares: weights and quotas, kept in the store."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def put(self, share: Share) -> Share:
        """Set a share's weight and quotas (the whole record)."""
        kept = Share(
            name=share.name,
            weight=share.weight,
            jobs_per_hour=share.jobs_per_hour,
            tokens_per_hour=share.tokens_per_hour,
            updated_at=self._clock(),
        )
        await self._store.put_share(check_share(kept))
        return kept

    async def list(self) -> list[Share]:
        """Every share an admin set, by name."""
        return await self._store.list_shares()

    async def unset(self, name: str) -> None:
        """Back to weight 1 and no quota; NotFound when nothing was set."""
        if not await self._store.delete_share(name):
            raise NotFound(f"no share {name!r} was set", param="name")
