"""Fair share's arithmetic: start-time fair queueing, per model (docs/scheduling.md).

Each share (a key's group, or the key) has, per model, a virtual time `finish`: when
its next job may start. The model has a clock: the start of the latest job leased. A
share's next job starts at `max(finish, clock)` (a share idle for a while begins at the
clock: it gets its turn at once, but no credit for the time it was away), its k-th
queued job k / weight later. The claim takes the highest priority first and, within it,
the lowest start; serving a share moves its `finish` one turn (1 / weight) past the start
of the last job it got. So shares that wait are served in weighted turn, however many
jobs each has queued: a key with 50,000 queued lines and a key with 3 both get served.

The SQLite store runs `pick` on its writer, in the claim's transaction; PostgreSQL runs
the same arithmetic in its one claim statement (sql/postgres.sql: claim_fair).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CLOCK = ""  # fair_turns' share column for the model's clock (no key id or group is "")
EPSILON = 1e-9  # starts this close are the same turn


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued job a claim may take: its row, model and share."""

    seq: int
    priority: int
    model: str
    share: str


@dataclass(frozen=True, slots=True)
class Picked:
    """What a claim takes, and the turns it moves: (model, share) -> new finish, with
    (model, CLOCK) -> the model's new clock."""

    seqs: list[int]
    turns: dict[tuple[str, str], float]


def pick(
    candidates: Iterable[Candidate],
    turns: Mapping[tuple[str, str], float],
    weights: Mapping[str, float],
    limit: int,
) -> Picked:
    """Up to `limit` of `candidates`: the highest priority first, then the lowest start
    (relative to its model's clock), then the oldest. `turns`: (model, share) -> finish
    and (model, CLOCK) -> clock, as stored; `weights`: share -> weight (absent: 1).
    Each share's candidates of a model are ranked by (priority, age): its k-th starts
    k turns after its first."""
    by_queue: dict[tuple[str, str], list[Candidate]] = {}
    for c in candidates:
        by_queue.setdefault((c.model, c.share), []).append(c)
    scored: list[tuple[int, float, int, Candidate, float]] = []
    for (model, share), queue in by_queue.items():
        clock = turns.get((model, CLOCK), 0.0)
        first = max(turns.get((model, share), 0.0), clock)
        step = 1.0 / weights.get(share, 1.0)
        queue.sort(key=lambda c: (-c.priority, c.seq))
        for k, c in enumerate(queue):
            start = first + k * step
            scored.append((-c.priority, start - clock, c.seq, c, start))
    scored.sort(key=lambda s: s[:3])
    taken = scored[:limit]
    moved: dict[tuple[str, str], float] = {}
    for _, _, _, c, start in taken:
        step = 1.0 / weights.get(c.share, 1.0)
        mine, its_clock = (c.model, c.share), (c.model, CLOCK)
        moved[mine] = max(moved.get(mine, 0.0), start + step)
        moved[its_clock] = max(moved.get(its_clock, turns.get(its_clock, 0.0)), start)
    return Picked([t[3].seq for t in taken], moved)


def turns_before(first: float, weight: float, start: float) -> tuple[int, bool]:
    """Of a share whose next job starts at `first`: how many of its jobs start before
    `start` (at first, first + 1/weight, ...), and whether one starts at `start` exactly
    (a tie, which the claim breaks by age)."""
    turns = (start - first) * weight
    if turns < -EPSILON:
        return 0, False
    whole = round(turns)
    if abs(turns - whole) <= EPSILON:
        return whole, True
    return math.ceil(turns), False
