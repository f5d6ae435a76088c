"""Quotas per share: jobs and tokens per hour (docs/scheduling.md, "Quotas").

A share (a key's group, or the key itself) may have a quota of jobs and one of tokens
per hour: its own (`openbeepboop-server shares set NAME --jobs-per-hour N
--tokens-per-hour N`), else the server's default (`quota_jobs_per_hour`,
`quota_tokens_per_hour`); 0 is no quota, in either place. Windows are fixed clock hours.

Jobs are counted when they are submitted: a submit that would take its share past the
quota is refused whole (`QuotaExceeded`, 429 `insufficient_quota`, Retry-After: the end
of the hour). Jobs the response cache answers cost nothing and are not counted; an
idempotent replay is taken back once the store says it was one. Tokens (prompt plus
completion, from the `usage` of a result) are counted when a node's result is recorded;
a share whose tokens reached its quota is refused new jobs until the hour ends (its
queued jobs still run). Admin keys have no quota.

Counts live in the store (`add_counters`), so every server on one database counts the
same share once: one round trip per submit of a share with a quota, none for the
others. A server that has seen a window full refuses the rest of that window without
asking the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from openbeepboop.server.errors import InvalidRequest, QuotaExceeded
from openbeepboop.server.models import JSON, ApiKey, Job, JobStatus, Role, Share
from openbeepboop.server.store.base import Store

log = logging.getLogger("openbeepboop.quotas")

WINDOW_SECONDS = 3600.0
SHARES_SECONDS = 5.0  # how long the shares table is trusted (`shares set` applies within it)
OWNERS_SECONDS = 30.0  # how long a key's group is trusted when its tokens are counted
MAX_FULL = 10_000  # windows remembered as full


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """The default quotas of a share that has none of its own (0: none)."""

    jobs_per_hour: int = 0
    tokens_per_hour: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """A share's quotas in effect (None: no quota)."""

    jobs: int | None = None
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """Jobs counted for a submit, in the window that started at `window`."""

    share: str
    jobs: int
    window: float


@dataclass(frozen=True, slots=True)
class ShareUsage:
    """A share's quotas and what it used of them this hour."""

    share: str
    jobs_per_hour: int | None
    jobs_used: int
    tokens_per_hour: int | None
    tokens_used: int
    resets_at: float

    def as_json(self) -> JSON:
        return {
            "share": self.share,
            "jobs_per_hour": self.jobs_per_hour,
            "jobs_used": self.jobs_used,
            "tokens_per_hour": self.tokens_per_hour,
            "tokens_used": self.tokens_used,
            "resets_at": int(self.resets_at),
        }


def jobs_counter(share: str) -> str:
    return f"quota:jobs:{share}"


def tokens_counter(share: str) -> str:
    return f"quota:tokens:{share}"


def tokens_of(result: JSON | None) -> int:
    """Prompt plus completion tokens of a result's `usage` (its total when it gives only
    that, as embeddings do); 0 without usage."""
    usage = result.get("usage") if isinstance(result, dict) else None
    if not isinstance(usage, dict):
        return 0
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    counted = sum(p for p in parts if isinstance(p, int) and not isinstance(p, bool) and p > 0)
    total = usage.get("total_tokens")
    if not counted and isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return total
    return counted


def _quota(own: int | None, default: int) -> int | None:
    value = default if own is None else own
    return value if value > 0 else None


def _clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


class Quotas:
    """Counts each share's jobs and tokens per hour against its quotas."""

    def __init__(
        self, store: Store, config: QuotaConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._shares: tuple[float, dict[str, Share]] = (-SHARES_SECONDS, {})
        self._owners: tuple[float, dict[str, str]] = (-OWNERS_SECONDS, {})
        # counter -> (its window's end, the quota, the count) when seen full
        self._full: dict[str, tuple[float, int, int]] = {}

    # -- quotas in effect -------------------------------------------------------

    async def limits(self, share: str) -> Limits:
        """The quotas of `share`: its own, else the defaults (the shares table as read
        within the last few seconds)."""
        own = (await self._known_shares()).get(share)
        return Limits(
            _quota(None if own is None else own.jobs_per_hour, self._config.jobs_per_hour),
            _quota(None if own is None else own.tokens_per_hour, self._config.tokens_per_hour),
        )

    async def _known_shares(self) -> dict[str, Share]:
        read_at, shares = self._shares
        now = self._clock()
        if now - read_at >= SHARES_SECONDS:
            shares = {s.name: s for s in await self._store.list_shares()}
            self._shares = (now, shares)
        return shares

    async def _any_tokens_quota(self) -> bool:
        if self._config.tokens_per_hour > 0:
            return True
        return any(s.tokens_per_hour for s in (await self._known_shares()).values())

    # -- submits ----------------------------------------------------------------

    async def admit(self, key: ApiKey, jobs: int, param: str = "jobs") -> Reservation | None:
        """Count `jobs` new jobs of `key`'s share, or raise: QuotaExceeded when they would
        pass its jobs quota or its tokens reached theirs, InvalidRequest when they are
        more than its whole hourly quota (they never fit: split them). None when
        nothing was counted (no quota, no jobs, an admin key)."""
        if jobs <= 0 or key.role is not Role.CLIENT:
            return None
        share = key.share
        limits = await self.limits(share)
        if limits.jobs is None and limits.tokens is None:
            return None
        if limits.jobs is not None and jobs > limits.jobs:
            raise InvalidRequest(
                f"these {jobs} jobs are more than the quota of share {share!r} "
                f"({limits.jobs} jobs per hour): split them",
                param=param,
                code="insufficient_quota",
            )
        now = self._clock()
        self._refuse_if_full(share, limits, jobs, now)
        start = now - now % WINDOW_SECONDS
        amounts: dict[str, tuple[float, int]] = {}
        if limits.jobs is not None:
            amounts[jobs_counter(share)] = (start, jobs)
        if limits.tokens is not None:
            amounts[tokens_counter(share)] = (start, 0)
        counted = await self._store.add_counters(amounts)
        reservation = Reservation(share, jobs if limits.jobs is not None else 0, start)
        try:
            self._check(share, limits, jobs, counted, now)
        except QuotaExceeded:
            await self.refund(reservation, reservation.jobs)
            raise
        return reservation

    def _check(
        self,
        share: str,
        limits: Limits,
        jobs: int,
        counted: Mapping[str, tuple[int, float]],
        now: float,
    ) -> None:
        if limits.tokens is not None:
            used, start = counted[tokens_counter(share)]
            if used >= limits.tokens:
                end = self._mark_full(tokens_counter(share), start, limits.tokens, used)
                raise _tokens_refusal(share, limits.tokens, used, end, now)
        if limits.jobs is not None:
            used, start = counted[jobs_counter(share)]
            if used > limits.jobs:
                before = used - jobs
                end = start + WINDOW_SECONDS
                if before >= limits.jobs:
                    self._mark_full(jobs_counter(share), start, limits.jobs, before)
                raise _jobs_refusal(share, limits.jobs, before, jobs, end, now)
            if used >= limits.jobs:  # the next submit is refused here without asking
                self._mark_full(jobs_counter(share), start, limits.jobs, used)

    async def refund(self, reservation: Reservation | None, jobs: int) -> None:
        """Take back `jobs` of a reservation (replays, or a submit that failed)."""
        if reservation is None or jobs <= 0 or reservation.jobs <= 0:
            return
        name = jobs_counter(reservation.share)
        self._full.pop(name, None)  # room again (unless the store says otherwise)
        counted = await self._store.add_counters(
            {name: (reservation.window, -min(jobs, reservation.jobs))}
        )
        limits = await self.limits(reservation.share)
        used, start = counted[name]
        if limits.jobs is not None and used >= limits.jobs:
            self._mark_full(name, start, limits.jobs, used)

    def _refuse_if_full(self, share: str, limits: Limits, jobs: int, now: float) -> None:
        """Refuse without asking the store when this server saw a window full (under the
        quota still in effect)."""
        if limits.tokens is not None:
            end, quota, used = self._full.get(tokens_counter(share), (0.0, 0, 0))
            if now < end and quota == limits.tokens:
                raise _tokens_refusal(share, quota, used, end, now)
        if limits.jobs is not None:
            end, quota, used = self._full.get(jobs_counter(share), (0.0, 0, 0))
            if now < end and quota == limits.jobs:
                raise _jobs_refusal(share, quota, used, jobs, end, now)

    def _mark_full(self, name: str, start: float, quota: int, used: int) -> float:
        if len(self._full) >= MAX_FULL:
            self._full.clear()
        end = start + WINDOW_SECONDS
        self._full[name] = (end, quota, used)
        return end

    # -- results ----------------------------------------------------------------

    async def count_tokens(self, jobs: Iterable[Job]) -> None:
        """Count the tokens of completed jobs (their results' usage) for the shares of
        their owners that have a tokens quota; one store round trip at most. A failure
        is logged, not raised: the results are recorded already."""
        done = list(jobs)
        try:
            await self._count_tokens(done)
        except Exception:
            log.exception("tokens of %d results not counted for quotas", len(done))

    async def _count_tokens(self, jobs: list[Job]) -> None:
        spent = [(j.owner, tokens_of(j.result)) for j in jobs if j.status is JobStatus.COMPLETED]
        spent = [(owner, n) for owner, n in spent if n > 0]
        if not spent or not await self._any_tokens_quota():
            return
        shares = await self._shares_of([owner for owner, _ in spent])
        now = self._clock()
        start = now - now % WINDOW_SECONDS
        totals: dict[str, int] = {}
        for owner, n in spent:
            share = shares.get(owner, owner)
            if (await self.limits(share)).tokens is not None:
                totals[share] = totals.get(share, 0) + n
        if not totals:
            return
        counted = await self._store.add_counters(
            {tokens_counter(s): (start, n) for s, n in totals.items()}
        )
        for share in totals:
            quota = (await self.limits(share)).tokens
            used, window = counted[tokens_counter(share)]
            if quota is not None and used >= quota:
                self._mark_full(tokens_counter(share), window, quota, used)

    async def _shares_of(self, owners: list[str]) -> dict[str, str]:
        """Key id -> its share, for `owners` (read again when one is not known yet, at
        most once a second, and every OWNERS_SECONDS)."""
        read_at, known = self._owners
        now = self._clock()
        stale = now - read_at >= OWNERS_SECONDS
        if stale or (any(o not in known for o in owners) and now - read_at >= 1.0):
            known = {k.id: k.share for k in await self._store.list_keys()}
            self._owners = (now, known)
        return known

    # -- what admins see --------------------------------------------------------

    async def usage(self) -> list[ShareUsage]:
        """Every share with a quota (set for it, or the default for the shares of the
        client keys), with what it used this hour, by name; one store round trip."""
        shares = await self._known_shares()
        names = set(shares)
        if self._config.jobs_per_hour > 0 or self._config.tokens_per_hour > 0:
            names |= {
                k.share for k in await self._store.list_keys() if k.role is Role.CLIENT and k.active
            }
        limits = {n: await self.limits(n) for n in sorted(names)}
        limits = {n: q for n, q in limits.items() if q.jobs is not None or q.tokens is not None}
        now = self._clock()
        start = now - now % WINDOW_SECONDS
        amounts: dict[str, tuple[float, int]] = {}
        for name in limits:
            amounts[jobs_counter(name)] = (start, 0)
            amounts[tokens_counter(name)] = (start, 0)
        counted = await self._store.add_counters(amounts)
        return [
            ShareUsage(
                share=name,
                jobs_per_hour=q.jobs,
                jobs_used=counted[jobs_counter(name)][0],
                tokens_per_hour=q.tokens,
                tokens_used=counted[tokens_counter(name)][0],
                resets_at=max(counted[jobs_counter(name)][1], start) + WINDOW_SECONDS,
            )
            for name, q in limits.items()
        ]


def _jobs_refusal(
    share: str, quota: int, used: int, jobs: int, end: float, now: float
) -> QuotaExceeded:
    asked = "1 more job" if jobs == 1 else f"{jobs} more jobs"
    return QuotaExceeded(
        f"share {share!r} has used {used} of its quota of {quota} jobs per hour; "
        f"{asked} would pass it (nothing was queued). The quota resets at "
        f"{_clock_time(end)} (in {max(1, round(end - now))} s)",
        retry_after=max(1.0, end - now),
    )


def _tokens_refusal(share: str, quota: int, used: int, end: float, now: float) -> QuotaExceeded:
    return QuotaExceeded(
        f"share {share!r} has used {used} of its quota of {quota} tokens per hour; no new "
        f"jobs until it resets at {_clock_time(end)} (in {max(1, round(end - now))} s); "
        "its queued jobs still run",
        retry_after=max(1.0, end - now),
    )
