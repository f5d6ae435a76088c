"""The response cache: a completed job's answer kept by what was asked, so that the same
request is answered again at once, without a node (docs/cache.md).

What is asked is the cache key: a hash of the endpoint and the request body as the node
would get it (model, messages or prompt, every sampling field, tools, response format),
less the fields that do not change the answer (`stream`, `stream_options`, `user`), plus
the job's pin, and, for a key whose scope is `private`, that key's id. The API key itself
is never part of it: two keys asking the same thing share one answer, unless an admin
scopes a key `private` (or `off`).

Which requests are cached: with `cache` asked for in the request (`use`: look up, keep
the answer; `refresh`: do not look up, keep the new answer; `skip`: neither), as the
request says; otherwise by the model's policy (`deterministic` by default: requests with
`temperature` 0 or a `seed`, and embeddings; `all`; `opt-in`: only when asked; `off`:
never, even when asked).

The store keeps answers (a job submitted with a `cache_key` leaves its result there when
it completes) and answers a hit by storing the job completed (`cached`). Hits are counted
here and written to the store with each reaper pass, with eviction (expired answers,
then the least recently used beyond `max_bytes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import orjson

from openbeepboop.server.errors import InvalidRequest
from openbeepboop.server.models import JSON, ApiKey, CacheSummary, NewJob, SubmitOutcome
from openbeepboop.server.store.base import Store

Mode = Literal["use", "skip", "refresh"]
Policy = Literal["deterministic", "all", "opt-in", "off"]
Scope = Literal["shared", "private", "off"]
MODES: tuple[str, ...] = ("use", "skip", "refresh")
# body fields that do not change the answer (the sync path adds `stream: false` itself)
UNKEYED = frozenset({"stream", "stream_options", "user"})
KEY_VERSION = 1  # part of every key: a change of what is hashed starts a new cache
TRIM_SECONDS = 30.0  # eviction runs at most this often (it sums the cache's bytes)
OWNER_SCOPE_SECONDS = 10.0  # how long a batch owner's key is remembered for its scope


class Asked(Protocol):
    """What the cache reads of a request (core/queue.py's JobRequest)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def body(self) -> JSON: ...
    @property
    def node(self) -> str | None: ...
    @property
    def node_labels(self) -> dict[str, str] | None: ...
    @property
    def cache(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The cache's settings (filled from ServerSettings `cache*`)."""

    enabled: bool = True
    policy: Policy = "deterministic"
    ttl_seconds: float = 30 * 86400.0  # 0: answers never expire
    max_bytes: int = 1 << 30
    models: Mapping[str, Policy] = field(default_factory=dict)
    keys: Mapping[str, Scope] = field(default_factory=dict)  # key id or name -> scope
    scope: Scope = "shared"


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache does for one request: nothing (`key` None), or keep its answer
    under `key`, looking it up first when `look`."""

    key: str | None = None
    look: bool = False

    @property
    def outcome(self) -> str:
        """For the `x-openbeepboop-cache` header, before the lookup: `bypass`,
        `refresh`, or `miss` (a hit says `hit`)."""
        if self.key is None:
            return "bypass"
        return "miss" if self.look else "refresh"


NO_PLAN = CachePlan()


def deterministic(endpoint: str, body: JSON) -> bool:
    """Whether the request asks for the same answer every time: embeddings, and
    completions with `temperature` 0 or a `seed`."""
    if endpoint == "/v1/embeddings":
        return True
    temperature = body.get("temperature")
    zero = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    return (zero and temperature == 0) or body.get("seed") is not None


def take_mode(body: JSON) -> tuple[JSON, str | None]:
    """A batch line's body without its `cache` field, and that mode (InvalidRequest for
    a value that is not one)."""
    if "cache" not in body:
        return body, None
    mode = body["cache"]
    if mode is not None and mode not in MODES:
        raise InvalidRequest(
            f"cache must be one of {', '.join(MODES)}, not {mode!r}", param="cache"
        )
    return {k: v for k, v in body.items() if k != "cache"}, mode


def cache_key(req: Asked, private_to: str | None) -> str:
    """The hash of what was asked (see the module docstring)."""
    body = {k: v for k, v in req.body.items() if k not in UNKEYED}
    asked = [KEY_VERSION, req.endpoint, body, req.node, req.node_labels or None, private_to]
    return hashlib.sha256(orjson.dumps(asked, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ResponseCache:
    """The cache's rules over a `Store`; one per server."""

    def __init__(
        self, store: Store, config: CacheConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.config = config
        self._clock = clock
        self.hits = 0  # answered from the cache by this server since it started
        self.misses = 0  # looked up and not found
        self._pending: Counter[str] = Counter()  # hits not yet written to the store
        self._trimmed_at = 0.0
        self._owners: dict[str, tuple[float, Scope]] = {}

    # -- which requests ------------------------------------------------------------

    def scope_of(self, key: ApiKey) -> Scope:
        """The key's scope: set by id or by name, else the default."""
        keys = self.config.keys
        return keys.get(key.id) or keys.get(key.name) or self.config.scope

    async def scope_of_owner(self, owner: str) -> Scope:
        """The scope of the key with id `owner` (batch lines carry only the owner)."""
        now = self._clock()
        known = self._owners.get(owner)
        if known is not None and now - known[0] < OWNER_SCOPE_SECONDS:
            return known[1]
        if not self.config.keys:
            return self.config.scope
        found = next((k for k in await self.store.list_keys() if k.id == owner), None)
        scope = self.config.keys.get(owner) or self.config.scope
        if found is not None:
            scope = self.scope_of(found)
        self._owners[owner] = (now, scope)
        return scope

    def plan(self, owner: str, scope: Scope, req: Asked) -> CachePlan:
        """What to do for `req` of the key `owner` whose scope is `scope`."""
        config = self.config
        if not config.enabled or scope == "off" or req.cache == "skip":
            return NO_PLAN
        policy = config.models.get(str(req.body.get("model")), config.policy)
        if policy == "off":
            return NO_PLAN
        if req.cache is None:
            wanted = policy == "all" or (
                policy == "deterministic" and deterministic(req.endpoint, req.body)
            )
            if not wanted:
                return NO_PLAN
        try:
            key = cache_key(req, owner if scope == "private" else None)
        except TypeError:  # orjson: integers beyond 64 bits; the submit says so (400)
            return NO_PLAN
        return CachePlan(key, look=req.cache != "refresh")

    # -- lookups -------------------------------------------------------------------

    async def lookup(self, plans: Sequence[CachePlan]) -> dict[str, JSON]:
        """The answers kept for the plans that look (one read for all of them)."""
        keys = list(dict.fromkeys(p.key for p in plans if p.look and p.key is not None))
        if not keys:
            return {}
        ttl = self.config.ttl_seconds
        fresh_after = self._clock() - ttl if ttl > 0 else 0.0
        return await self.store.cache_lookup(keys, fresh_after)

    def attach(self, job: NewJob, plan: CachePlan, answers: Mapping[str, JSON]) -> NewJob:
        """The new job as the plan and the answers found make it: answered (a hit), or
        to keep its answer under the plan's key."""
        if plan.key is None:
            return job
        answer = answers.get(plan.key) if plan.look else None
        if answer is not None:
            return dataclasses.replace(job, cached_result=answer)
        return dataclasses.replace(job, cache_key=plan.key)

    def count(self, plan: CachePlan, outcome: SubmitOutcome) -> None:
        """Count a submit's hit or miss (an idempotent replay is neither)."""
        if plan.key is None or not outcome.created:
            return
        if outcome.job.cached:
            self.hits += 1
            self._pending[plan.key] += 1
        elif plan.look:
            self.misses += 1

    # -- housekeeping --------------------------------------------------------------

    async def flush(self) -> int:
        """Write the hits counted since the last call; every TRIM_SECONDS also evict
        (expired answers, then the least recently used beyond `max_bytes`). Returns how
        many answers were evicted."""
        now = self._clock()
        if self._pending:
            pending, self._pending = self._pending, Counter()
            await self.store.cache_used(pending, now)
        if now - self._trimmed_at < TRIM_SECONDS:
            return 0
        return await self.trim()

    async def trim(self) -> int:
        """Evict now: expired answers, then the least recently used beyond
        `max_bytes`; how many went."""
        now = self._trimmed_at = self._clock()
        ttl = self.config.ttl_seconds
        stale_before = now - ttl if ttl > 0 else 0.0
        return await self.store.cache_trim(stale_before, self.config.max_bytes)

    async def summary(self) -> dict[str, int]:
        """What /v1/stats says of the cache."""
        held: CacheSummary = await self.store.cache_summary()
        return {
            "entries": held.entries,
            "bytes": held.bytes,
            "hits_stored": held.hits + sum(self._pending.values()),
            "hits": self.hits,
            "misses": self.misses,
        }
