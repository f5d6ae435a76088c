"""The queue's rules: submit, fetch, heartbeat, submit results, cancel, reap, wait.

Transport-free: HTTP handlers and CLI commands call these methods with plain values
and get domain objects or domain errors back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from openbeepboop.server.core.aliases import MOVE_LIMIT, Aliases, alias_of, moved_request
from openbeepboop.server.core.cache import CacheConfig, CachePlan, ResponseCache
from openbeepboop.server.core.deltas import DeltaHub
from openbeepboop.server.core.eta import Eta
from openbeepboop.server.core.notify import Notifier
from openbeepboop.server.core.passes import one_pass
from openbeepboop.server.core.pins import Pin, check_known, serving
from openbeepboop.server.core.quotas import QuotaConfig, Quotas
from openbeepboop.server.core.responses import RESPONSE_KEY
from openbeepboop.server.errors import (
    InvalidRequest,
    JobFailed,
    NotFound,
    RateLimited,
    Timeout,
    Unavailable,
)
from openbeepboop.server.models import (
    JSON,
    ApiKey,
    HeartbeatOutcome,
    Job,
    JobFilter,
    JobStatus,
    LeaseResume,
    NewJob,
    Node,
    NodeResult,
    Piece,
    ReapOutcome,
    ResultOutcome,
    Role,
    SubmitOutcome,
)
from openbeepboop.server.store.base import Store
from openbeepboop.server.topics import NODES_TOPIC, job_topic, model_topic

log = logging.getLogger("openbeepboop.queue")

NODE_TOUCH_SECONDS = 5.0
ACTIVE_COUNT_SECONDS = 1.0
SERVED_CACHE_SECONDS = 1.0
# a synchronous call checks this often that a live node still serves its model
SERVED_CHECK_SECONDS = 2.0
NODE_FORGET_SECONDS = 60.0  # how often the reaper forgets long-gone nodes
WATCH_READ_SECONDS = 0.02  # a node's cancel watch reads its jobs at most this often


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """The knobs of the queue's rules (filled from ServerSettings)."""

    lease_seconds: float = 60.0
    max_attempts: int = 3
    max_active_jobs_per_key: int = 100_000
    node_ttl_seconds: float = 60.0
    node_retention_seconds: float = 7 * 86400.0
    max_poll_wait_seconds: float = 60.0
    sync_timeout_seconds: float = 600.0
    model_wait_seconds: float = 10.0
    lease_grace_seconds: float | None = None  # after an outage; None: lease_seconds
    aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)  # core/aliases.py
    alias_wait_seconds: float = 30.0
    affinity_max_wait_seconds: float = 30.0  # 0: a node's loaded models get no preference
    fair_share: bool = True  # within a priority, shares in weighted turn (store/fair.py)

    @property
    def lease_grace(self) -> float:
        """How long leases run at least once servers are back after an outage."""
        if self.lease_grace_seconds is None:
            return self.lease_seconds
        return self.lease_grace_seconds


class Caller(Protocol):
    """Whoever waits on a long-poll, as its transport sees them: a claim is made only for
    a caller still there (a node that is gone must not be handed work)."""

    @property
    def gone(self) -> bool:
        """Known to have left (its connection closed)."""

    def watch(self, wake: asyncio.Event) -> None:
        """From now on, set `gone` and then `wake` as soon as the caller leaves."""


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One job as a client asks for it."""

    endpoint: str
    body: JSON
    priority: int = 0
    max_attempts: int | None = None
    metadata: JSON | None = None
    custom_id: str | None = None
    idempotency_key: str | None = None
    expires_at: float | None = None
    ttl_seconds: float | None = None
    batch_id: str | None = None
    node: str | None = None  # pinned to the node of this name or id (core/pins.py)
    node_labels: dict[str, str] | None = None  # pinned to nodes carrying these labels
    cache: str | None = None  # "use", "skip" or "refresh" (core/cache.py); None: by policy
    asked_hash: str | None = None  # set when an alias rewrote it: the hash of what was asked

    @property
    def pin(self) -> Pin | None:
        if self.node is None and not self.node_labels:
            return None
        return Pin(self.node, self.node_labels or None)


def request_hash(req: JobRequest) -> str:
    """What must match for an idempotent replay: the endpoint, body and our knobs."""
    knobs = [
        req.endpoint,
        req.body,
        req.priority,
        req.max_attempts,
        req.metadata,
        req.custom_id,
        req.expires_at,
        req.ttl_seconds,
    ]
    if req.pin is not None:  # only then: hashes stored before pins existed stay valid
        knobs += [req.node, req.node_labels or None]
    canonical = orjson.dumps(knobs, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class Queue:
    """The job lifecycle (queued, in_progress, then final; README "How it keeps your
    work"), over a `Store`."""

    def __init__(
        self,
        store: Store,
        config: QueueConfig,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        cache: ResponseCache | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.notifier = notifier or Notifier()
        self._clock = clock
        self.cache = cache or ResponseCache(store, CacheConfig(), clock)
        self.quotas = quotas or Quotas(store, QuotaConfig(), clock)
        self.aliases = Aliases(config.aliases, config.alias_wait_seconds)
        self.eta = Eta(store, clock)  # estimated start times (core/eta.py)
        self._node_owner: dict[str, str] = {}
        # node id -> (name, labels): what its claims match pinned jobs against
        self._node_ident: dict[str, tuple[str, dict[str, str]]] = {}
        self._node_touched: dict[str, float] = {}
        self._active: dict[str, tuple[int, float]] = {}
        self.deltas = DeltaHub()
        self.closing = False
        self._handoff: dict[str, list[asyncio.Future[Job]]] = {}  # job id -> sync waiters
        # checked at, model -> the live nodes that serve it
        self._served: tuple[float, dict[str, list[Node]]] = (0.0, {})

    def close(self) -> None:
        """The server is shutting down: long-polls answer now instead of holding it up."""
        self.closing = True
        self.notifier.publish_everything()

    # -- clients ----------------------------------------------------------------

    async def submit(
        self,
        key: ApiKey,
        requests: Sequence[JobRequest],
        durable: bool = True,
        positions: bool = False,
    ) -> list[SubmitOutcome]:
        """Queue jobs for `key` (all or none); idempotent replays return the first job;
        a request the response cache answers is stored completed (`cached`).
        `durable=False` only where the caller is told nothing before the result (see
        `Store.submit_jobs`); `positions`: the outcomes say where new jobs stand."""
        if not requests:
            raise InvalidRequest("no jobs to submit", param="jobs")
        requests = await self._resolve(requests)
        scope = self.cache.scope_of(key)
        plans = [self.cache.plan(key.id, scope, r) for r in requests]
        return await self._submit_planned(key, requests, plans, None, durable, positions)

    async def _submit_planned(
        self,
        key: ApiKey,
        requests: Sequence[JobRequest],
        plans: Sequence[CachePlan],
        answers: Mapping[str, JSON] | None,
        durable: bool,
        positions: bool,
    ) -> list[SubmitOutcome]:
        if answers is None:
            answers = await self.cache.lookup(plans)
        unanswered = sum(p.key not in answers for p in plans)
        await self._check_active_limit(key, unanswered)
        # quotas (core/quotas.py): count the jobs a node will run; take back replays
        reserved = await self.quotas.admit(key, unanswered)
        try:
            outcomes = await self._queue_jobs(key.id, requests, durable, positions, plans, answers)
        except Exception:
            await self.quotas.refund(reserved, unanswered)
            raise
        new = sum(o.created and not o.job.cached for o in outcomes)
        await self.quotas.refund(reserved, unanswered - new)
        return outcomes

    async def enqueue(self, owner: str, requests: Sequence[JobRequest]) -> list[SubmitOutcome]:
        """Queue jobs for `owner` without the active-job check: batch lines, which were
        counted against it when their batch was created (core/batches.py)."""
        requests = await self._resolve(requests)
        scope = await self.cache.scope_of_owner(owner)
        plans = [self.cache.plan(owner, scope, r) for r in requests]
        answers = await self.cache.lookup(plans)
        return await self._queue_jobs(owner, requests, True, False, plans, answers)

    async def _queue_jobs(
        self,
        owner: str,
        requests: Sequence[JobRequest],
        durable: bool,
        positions: bool,
        plans: Sequence[CachePlan],
        answers: Mapping[str, JSON],
    ) -> list[SubmitOutcome]:
        now = self._clock()
        new = [
            self.cache.attach(self._new_job(owner, r, now), plan, answers)
            for r, plan in zip(requests, plans, strict=True)
        ]
        pins = [p for p in {repr(r.pin): r.pin for r in requests}.values() if p is not None]
        if pins:  # a pin no node could ever satisfy is a clear 400, not a wait forever
            check_known(pins, await self.store.list_nodes(0.0))
        counted = positions and not self.config.fair_share  # fair: submitted_position
        outcomes = await self.store.submit_jobs(new, now, durable, counted)
        for plan, outcome in zip(plans, outcomes, strict=True):
            self.cache.count(plan, outcome)
        queued = [o.job for o in outcomes if o.created and not o.job.cached]
        self._count_active(owner, len(queued))
        self.notifier.publish({model_topic(j.model) for j in queued})
        return outcomes

    def _new_job(self, owner: str, req: JobRequest, now: float) -> NewJob:
        model = req.body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a string", param="model")
        expires_at = req.expires_at
        if req.ttl_seconds is not None:
            expires_at = now + req.ttl_seconds
        if expires_at is not None and expires_at <= now:
            raise InvalidRequest("expires_at is in the past", param="expires_at")
        digest = req.asked_hash or _digest(req)
        return NewJob(
            owner=owner,
            endpoint=req.endpoint,
            model=model,
            request=req.body,
            request_hash=digest,
            priority=req.priority,
            max_attempts=req.max_attempts or self.config.max_attempts,
            metadata=req.metadata,
            custom_id=req.custom_id,
            idempotency_key=req.idempotency_key,
            expires_at=expires_at,
            batch_id=req.batch_id,
            pin_node=req.node,
            pin_labels=req.node_labels or None,
        )

    async def _check_active_limit(self, key: ApiKey, adding: int) -> None:
        if key.role is not Role.CLIENT:
            return
        count, at = self._active.get(key.id, (0, 0.0))
        now = self._clock()
        if now - at > ACTIVE_COUNT_SECONDS:
            count = await self.store.count_active(key.id)
            self._active[key.id] = (count, now)
        limit = self.config.max_active_jobs_per_key
        if count + adding > limit:
            raise RateLimited(
                f"this key has {count} queued or running jobs; the limit is {limit}",
                retry_after=5,
                code="too_many_active_jobs",
            )

    def _count_active(self, owner: str, added: int) -> None:
        if owner in self._active:
            count, at = self._active[owner]
            self._active[owner] = (count + added, at)

    async def get(self, key: ApiKey, job_id: str) -> Job:
        """A job `key` may see; another owner's job is NotFound, as is a missing one."""
        job = await self.store.get_job(job_id)
        if job is None or not _may_see(key, job):
            raise NotFound(f"no job with id {job_id!r}", param="job_id", code="job_not_found")
        return job

    async def rerun(self, key: ApiKey, job_id: str) -> Job:
        """A new job with the request of `job_id` (one `key` may see), owned by `key`: same
        endpoint, body, priority, attempts, pins and metadata; not in a batch, with no
        idempotency key or expiry of its own; run on a node even when the response cache
        holds its answer (which it then replaces). A job asked of an alias is asked of
        it again (its first served member runs it)."""
        old = await self.get(key, job_id)
        metadata = old.metadata
        if isinstance(metadata, dict):  # a Response's bookkeeping belongs to the first run
            metadata = {k: v for k, v in metadata.items() if k != RESPONSE_KEY} or None
        alias = alias_of(metadata)
        again = JobRequest(
            endpoint=old.endpoint,
            body=old.request if alias is None else {**old.request, "model": alias},
            priority=old.priority,
            max_attempts=old.max_attempts,
            metadata=metadata,
            custom_id=old.custom_id,
            node=old.pin_node,
            node_labels=old.pin_labels,
            # run again for real: a cached answer is replaced, never served
            cache="refresh" if old.cache_key is not None or old.cached else "skip",
        )
        return (await self.submit(key, [again]))[0].job

    async def list_jobs(self, key: ApiKey, flt: JobFilter) -> list[Job]:
        """The jobs `key` may see that match `flt`, newest first (an admin's `flt.owner`
        narrows to one key; a client's is always its own)."""
        owner = None if key.role is Role.ADMIN else key.id
        return await self.store.list_jobs(dataclasses.replace(flt, owner=owner or flt.owner))

    async def queue_position(self, job: Job) -> int | None:
        """How many queued jobs of its model run before `job` (None unless queued)."""
        if job.status is not JobStatus.QUEUED:
            return None
        return await self.store.queue_position(job, self.config.fair_share)

    async def submitted_position(self, outcome: SubmitOutcome) -> int | None:
        """The queue position of a job as submitted (known already for a new job, unless
        under fair share, where it depends on the other shares' turns)."""
        if outcome.position is not None and not self.config.fair_share:
            return outcome.position
        return await self.queue_position(outcome.job)

    async def estimated_start(self, job: Job, position: int | None) -> float | None:
        """When `job`, queued with `position` jobs before it, should start (epoch
        seconds, core/eta.py); None unless queued, or while its model's pace is unknown."""
        if position is None or job.status is not JobStatus.QUEUED:
            return None
        pin = Pin.of(job)
        nodes = (await self._served_now()).get(job.model, [])
        nodes = [n for n in nodes if pin is None or pin.admits(n)]
        return await self.eta.start_at(job.model, position, nodes)

    async def eta_outlook(self) -> dict[str, JSON]:
        """Per model with a measured pace: its jobs per second, and how long a job queued
        now would wait (core/eta.py)."""
        counts = await self.store.stats()
        queued = {m: c.get(JobStatus.QUEUED.value, 0) for m, c in counts.items()}
        return await self.eta.outlook(queued, await self._served_now())

    async def cancel(self, key: ApiKey, job_id: str) -> Job:
        """Cancel a job that is not final; its node hears of it through its `watch` (else
        in its next heartbeat's reply)."""
        before = await self.get(key, job_id)
        job = await self.store.cancel_job(job_id, self._clock())
        if job is None:
            raise NotFound(f"no job with id {job_id!r}", param="job_id", code="job_not_found")
        if not before.status.is_final and job.status is JobStatus.CANCELLED:
            self.deltas.finish(job_id)
            self.notifier.publish([job_topic(job_id)])
            self._count_active(job.owner, -1)
        return job

    async def poll(self, key: ApiKey, job_ids: Sequence[str], wait: float) -> list[Job]:
        """The jobs `key` may see among `job_ids`. With `wait`, hold the answer until one
        of them is final (or `wait` seconds pass)."""
        wait = min(max(wait, 0.0), self.config.max_poll_wait_seconds)
        deadline = self._clock() + wait
        ids = list(dict.fromkeys(job_ids))
        with self.notifier.listen(job_topic(i) for i in ids) as event:
            while True:
                event.clear()
                jobs = await self._visible(key, ids)
                remaining = deadline - self._clock()
                if remaining <= 0 or not jobs or self.closing:
                    return jobs
                if any(j.status.is_final for j in jobs):
                    return jobs
                try:  # a job's topic also fires when it starts: look again
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return await self._visible(key, ids)

    async def _visible(self, key: ApiKey, ids: Sequence[str]) -> list[Job]:
        found = {j.id: j for j in await self.store.get_jobs(ids) if _may_see(key, j)}
        return [found[i] for i in ids if i in found]

    async def wait_for(self, job_id: str, seconds: float, known: Job | None = None) -> Job:
        """Wait until the job is final; Timeout after `seconds`. `known`: the job as the
        caller just saw it (saves a first read). A result recorded by this server is
        handed over at once; one recorded elsewhere is read when its topic fires."""
        deadline = self._clock() + seconds
        handed: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._handoff.setdefault(job_id, []).append(handed)
        try:
            with self.notifier.listen([job_topic(job_id)]) as event:
                return await self._wait_final(job_id, seconds, deadline, event, handed, known)
        finally:
            waiters = self._handoff.get(job_id, [])
            waiters.remove(handed)
            if not waiters:
                self._handoff.pop(job_id, None)

    async def _wait_final(
        self,
        job_id: str,
        seconds: float,
        deadline: float,
        event: asyncio.Event,
        handed: asyncio.Future[Job],
        job: Job | None,
    ) -> Job:
        while True:
            event.clear()
            if handed.done():
                job = handed.result()
            elif job is None:
                job = await self.store.get_job(job_id)
            if job is None:
                raise NotFound(f"no job with id {job_id!r}", code="job_not_found")
            if job.status.is_final:
                return job
            if self.closing:
                raise Unavailable(
                    f"the server is shutting down; job {job_id} is {job.status.value} "
                    f"and can be fetched at /v1/jobs/{job_id}",
                    retry_after=5,
                    code="server_shutting_down",
                )
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise Timeout(
                    f"job {job_id} did not finish within {seconds:g} s; it is still "
                    f"{job.status.value} and can be fetched at /v1/jobs/{job_id}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
            job = None

    async def complete(self, key: ApiKey, request: JobRequest) -> tuple[Job, JSON]:
        """The synchronous path: wait for a node serving the model, submit, wait for the
        result. The job survives a caller who gives up. Its submit need not wait for the
        disk: the caller learns of the job only with its result, whose commit does."""
        submitted = await self.submit_when_served(key, request, durable=False)
        waiter = asyncio.ensure_future(
            self.wait_for(submitted.id, self.config.sync_timeout_seconds, submitted)
        )
        watcher = asyncio.ensure_future(self.abandon_when_unserved(key, submitted, request))
        try:
            done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            failure = watcher.exception() if watcher in done else None
            if failure is not None:
                raise failure  # Unavailable: the model's last node left
            job = await waiter
        finally:
            waiter.cancel()
            watcher.cancel()
        if job.status is JobStatus.COMPLETED and job.result is not None:
            return job, job.result
        error = job.error or {}
        message = str(error.get("message") or f"the job ended {job.status.value}")
        code = str(error.get("code") or f"job_{job.status.value}")
        param = error.get("param")
        raise JobFailed(message, code=code, job_id=job.id, param=param and str(param))

    async def abandon_when_unserved(self, key: ApiKey, job: Job, request: JobRequest) -> None:
        """For a caller waiting on `job`: once no live node serves its model (its last
        node left, known after `node_ttl_seconds`), cancel the job, unless the request
        carried an Idempotency-Key (whose retry finds and waits on it), and raise
        Unavailable; return if the job ends first. Runs until cancelled otherwise."""
        pin = Pin.of(job)
        while True:
            await asyncio.sleep(SERVED_CHECK_SECONDS)
            if await self._is_served(job.model, pin) or await self._alias_served(job, pin):
                continue
            current = await self.store.get_job(job.id)
            if current is None or current.status.is_final:
                return
            kept = request.idempotency_key is not None
            if not kept:
                await self.cancel(key, job.id)
            fate = (
                f"it stays {current.status.value}; a retry with the same Idempotency-Key "
                "waits on it"
                if kept
                else "it was cancelled"
            )
            where = "" if pin is None else f" as {pin.describe()}"
            raise Unavailable(
                f"no live node serves model {job.model!r}{where} any more (job {job.id}: {fate})",
                retry_after=max(1.0, self.config.model_wait_seconds),
                code="model_not_available",
            )

    async def _is_served(self, model: str, pin: Pin | None = None) -> bool:
        """Whether a live node serves `model` (where `pin` allows), as known within the
        last second."""
        served = await self._served_now()
        return serving(served, model, pin) or await self._on_demand(model, pin)

    async def _served_now(self) -> dict[str, list[Node]]:
        """`served_models`, as known within the last second."""
        checked_at, served = self._served
        if self._clock() - checked_at >= SERVED_CACHE_SECONDS:
            served = await self.served_models()
            self._served = (self._clock(), served)
        return served

    async def _on_demand(self, model: str, pin: Pin | None) -> bool:
        """Whether a live node `pin` allows fetches `model` on demand."""
        nodes = await self.live_nodes()
        return self._fetched_on_demand(model, [n for n in nodes if pin is None or pin.admits(n)])

    async def waiting_for(self, job: Job) -> JSON | None:
        """For a queued pinned job that no live node may run yet: its pin, as given (its
        events say what it waits for); None otherwise."""
        pin = Pin.of(job)
        if pin is None or job.status is not JobStatus.QUEUED:
            return None
        return None if await self._is_served(job.model, pin) else pin.waiting_for()

    async def submit_when_served(
        self, key: ApiKey, request: JobRequest, durable: bool = True
    ) -> Job:
        """Submit once a live node serves the model (one the request's pin allows);
        Unavailable after the wait."""
        if request.pin is not None:  # the pin's 400 before a wait for its node
            check_known([request.pin], await self.store.list_nodes(0.0))
        members = self.aliases.members.get(str(request.body.get("model")))
        if members:  # an alias: once a live node serves one of its members
            await self._wait_for_member(str(request.body["model"]), members, request.pin)
            [request] = await self._resolve([request])
        plan = self.cache.plan(key.id, self.cache.scope_of(key), request)
        answers = await self.cache.lookup([plan])
        if not answers:  # the cache answers without any node
            await self.wait_for_model(str(request.body.get("model", "")), request.pin)
        outcomes = await self._submit_planned(key, [request], [plan], answers, durable, False)
        return outcomes[0].job

    async def wait_for_model(self, model: str, pin: Pin | None = None) -> None:
        """Return once a live node serves `model` (one `pin` allows). A model no node ever
        served, while some node is live, is NotFound at once (a typo should not wait);
        otherwise (the fleet is starting, or this model's nodes are away) wait, then
        Unavailable. A model found served is taken as served for the next second
        without asking the store."""
        checked_at, known = self._served
        if serving(known, model, pin) and self._clock() - checked_at < SERVED_CACHE_SECONDS:
            return
        wait = self.config.model_wait_seconds
        deadline = self._clock() + wait
        with self.notifier.listen([NODES_TOPIC]) as event:
            while True:
                event.clear()
                served = await self.served_models()
                self._served = (self._clock(), served)
                if serving(served, model, pin) or await self._on_demand(model, pin):
                    return
                if served and not await self._ever_served(model):
                    raise NotFound(
                        f"no node serves model {model!r}; live nodes serve "
                        f"{', '.join(sorted(served))}",
                        param="model",
                        code="model_not_found",
                    )
                if self.closing:
                    raise Unavailable(
                        "the server is shutting down", retry_after=5, code="server_shutting_down"
                    )
                remaining = deadline - self._clock()
                if remaining <= 0:
                    where = "" if pin is None else f" as {pin.describe()}"
                    raise Unavailable(
                        f"no live node serves model {model!r}{where} (waited {wait:g} s); "
                        "start a node for it or submit with 'Prefer: respond-async' to queue",
                        retry_after=max(1.0, wait),
                        code="model_not_available",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 1.0))

    # -- aliases (core/aliases.py) ------------------------------------------------

    async def _resolve(self, requests: Sequence[JobRequest]) -> Sequence[JobRequest]:
        """The requests as they run: one for an alias becomes one for its first member a
        live node serves (hashed as asked, for idempotent replays)."""
        if not self.aliases:
            return requests
        served = set(await self._served_now())
        out = []
        for req in requests:
            asked = self.aliases.resolve(req.body, req.metadata, served)
            if asked.alias is None and asked.metadata is req.metadata:
                out.append(req)
                continue
            digest = req.asked_hash or _digest(req)
            out.append(
                dataclasses.replace(
                    req, body=asked.body, metadata=asked.metadata, asked_hash=digest
                )
            )
        return out

    async def _wait_for_member(self, alias: str, members: Sequence[str], pin: Pin | None) -> None:
        """Return once a live node serves one of the alias's members (where `pin`
        allows); Unavailable after `model_wait_seconds`."""
        wait = self.config.model_wait_seconds
        deadline = self._clock() + wait
        with self.notifier.listen([NODES_TOPIC]) as event:
            while True:
                event.clear()
                for member in members:
                    if await self._is_served(member, pin):
                        return
                remaining = deadline - self._clock()
                if remaining <= 0 or self.closing:
                    raise Unavailable(
                        f"no live node serves a member of alias {alias!r} "
                        f"({', '.join(members)}; waited {wait:g} s); start a node for one "
                        "or submit with 'Prefer: respond-async' to queue",
                        retry_after=max(1.0, wait),
                        code="model_not_available",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 1.0))

    async def _alias_served(self, job: Job, pin: Pin | None) -> bool:
        """Whether `job` is an alias's and a live node serves one of its members (a
        job stranded on one member moves on: `move_stranded`)."""
        alias = self.aliases.alias_of(job)
        if alias is None:
            return False
        for member in self.aliases.members[alias]:
            if await self._is_served(member, pin):
                return True
        return False

    async def _fall_back(self, results: Sequence[NodeResult]) -> dict[int, ResultOutcome]:
        """Retryable failures of aliases' jobs with a later member a live node serves:
        each job moves there (fenced by its lease) instead of retrying on its member;
        by the index of the result."""
        failing = {
            i: r
            for i, r in enumerate(results)
            if r.result is None and not r.released and r.retryable
        }
        if not failing:
            return {}
        jobs = {j.id: j for j in await self.store.get_jobs([r.job_id for r in failing.values()])}
        served = set(await self._served_now())
        moved = {}
        for i, r in failing.items():
            job = jobs.get(r.job_id)
            member = None if job is None else self.aliases.next_member(job, served)
            if job is None or member is None or job.lease_id != r.lease_id:
                continue
            request = moved_request(job, member)
            now = await self.store.move_job(job.id, r.lease_id, member, request, r.error)
            if now is not None:
                moved[i] = ResultOutcome(job.id, accepted=True, job=now)
                log.info(
                    f"alias fallback: job {job.id} failed on {job.model}, moved to {member}",
                    extra={"job": job.id, "model": job.model, "to": member},
                )
        return moved

    async def move_stranded(self) -> int:
        """One pass: queued jobs of an alias that waited `alias_wait_seconds` on a member
        no live node serves move to the next member one serves (at most MOVE_LIMIT per
        member and pass); how many moved."""
        served = set(await self.served_models())
        before = self._clock() - self.aliases.wait_seconds
        moved: list[Job] = []
        for alias, member in self.aliases.stranded(served):
            flt = JobFilter(
                status=JobStatus.QUEUED, model=member, created_before=before, limit=MOVE_LIMIT
            )
            for job in await self.store.list_jobs(flt):
                target = self.aliases.next_member(job, served)
                if self.aliases.alias_of(job) != alias or target is None:
                    continue
                now = await self.store.move_job(
                    job.id, None, target, moved_request(job, target), None
                )
                if now is not None:
                    moved.append(now)
        if moved:
            self.notifier.publish({model_topic(j.model) for j in moved})
            log.info("alias fallbacks: stranded jobs moved", extra={"moved": len(moved)})
        return len(moved)

    # -- nodes ------------------------------------------------------------------

    async def register_node(
        self,
        key: ApiKey,
        name: str,
        models: list[JSON],
        capacity: int,
        hardware: JSON,
        version: str,
        labels: dict[str, str] | None = None,
    ) -> Node:
        now = self._clock()
        node = Node(
            id="node_" + secrets.token_hex(8),
            name=name,
            owner=key.id,
            models=models,
            capacity=capacity,
            hardware=hardware,
            version=version,
            registered_at=now,
            last_seen=now,
            labels=dict(labels or {}),
        )
        # the rows of earlier runs of this node (same key and name, no longer live) go
        await self.store.register_node(node, stale_before=now - self.config.node_ttl_seconds)
        self._node_owner[node.id] = key.id
        self._node_ident[node.id] = (node.name, node.labels)
        self._node_touched[node.id] = now
        self.notifier.publish([NODES_TOPIC])
        log.info("node registered", extra={"node_id": node.id, "node_name": name})
        return node

    async def _check_node(self, key: ApiKey, node_id: str) -> None:
        owner = self._node_owner.get(node_id)
        if owner is None or node_id not in self._node_ident:
            node = await self.store.get_node(node_id)
            if node is None:
                raise NotFound(
                    f"node {node_id!r} is not registered; register it first",
                    param="node_id",
                    code="node_not_registered",
                )
            owner = self._node_owner[node_id] = node.owner
            self._node_ident[node_id] = (node.name, node.labels)
        if owner != key.id and key.role is not Role.ADMIN:
            raise NotFound(f"node {node_id!r} is not registered with this key", param="node_id")

    async def _touch(self, node_id: str, stats: JSON | None = None) -> None:
        now = self._clock()
        last = self._node_touched.get(node_id, 0.0)
        if stats is None and now - last < NODE_TOUCH_SECONDS:
            return
        self._node_touched[node_id] = now
        if not await self.store.touch_node(node_id, now, stats):
            self._node_owner.pop(node_id, None)  # forgotten: its next call registers again
            self._node_ident.pop(node_id, None)
        if now - last > self.config.node_ttl_seconds:
            self.notifier.publish([NODES_TOPIC])

    async def fetch(
        self,
        key: ApiKey,
        node_id: str,
        models: Sequence[str],
        max_jobs: int,
        wait: float,
        caller: Caller | None = None,
        loaded: Mapping[str, float] | None = None,
    ) -> list[Job]:
        """Lease up to `max_jobs` jobs; with `wait`, long-poll until one arrives. While it
        waits, `caller` is watched: once gone, nothing more is claimed for it, and what a
        claim got as it left is released (`release_unsent`). Delivering the jobs is the
        transport's: what it cannot deliver, it releases the same way. `loaded`: the
        models the node has loaded, each with the seconds it has held it (see
        `_claim_loaded`)."""
        await self._check_node(key, node_id)
        await self._touch(node_id)
        wait = min(max(wait, 0.0), self.config.max_poll_wait_seconds)
        deadline = self._clock() + wait
        held = self._held(models, loaded)
        jobs = await self._claim(node_id, models, max_jobs, held)
        if jobs or wait <= 0 or self.closing:  # the usual case: no need to listen
            return jobs
        with self.notifier.listen(model_topic(m) for m in models) as event:
            if caller is not None:
                caller.watch(event)
            while True:  # listening first, then claiming again: no wake-up is missed
                event.clear()
                if caller is not None and caller.gone:
                    return []
                jobs = await self._claim(node_id, models, max_jobs, held)
                if jobs and caller is not None and caller.gone:
                    await self.release_unsent(jobs)
                    return []
                remaining = deadline - self._clock()
                if jobs or remaining <= 0 or self.closing:
                    return jobs
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return []

    def _held(
        self, models: Sequence[str], loaded: Mapping[str, float] | None
    ) -> dict[str, float] | None:
        """The asked models the node has loaded, each with when it loaded it; None when
        affinity has nothing to choose (off, none loaded, or all asked are loaded)."""
        if not loaded or self.config.affinity_max_wait_seconds <= 0:
            return None
        now = self._clock()
        held = {m: now - max(0.0, loaded[m]) for m in dict.fromkeys(models) if m in loaded}
        return held if held and len(held) < len(set(models)) else None

    async def _claim(
        self,
        node_id: str,
        models: Sequence[str],
        max_jobs: int,
        held: Mapping[str, float] | None = None,
    ) -> list[Job]:
        if held:
            jobs = await self._claim_any(node_id, await self._first(models, held), max_jobs)
            if jobs:
                return jobs
        return await self._claim_any(node_id, models, max_jobs)

    async def _first(self, models: Sequence[str], held: Mapping[str, float]) -> list[str]:
        """Model affinity: the models to claim from first. Those the node has loaded
        (`held`: model -> when the node loaded it), so that it does not swap weights back
        and forth when the queue alternates between models; but first any other asked
        model whose next job has waited more than `affinity_max_wait_seconds` because of
        that (counted from when the job was queued or when the node loaded what it holds,
        whichever is later). Costs one read per asked model not loaded (the head of its
        queue), flat in queue length."""
        now, bound = self._clock(), self.config.affinity_max_wait_seconds
        since = max(held.values())  # the node's latest load
        others = [m for m in dict.fromkeys(models) if m not in held]
        heads = await self.store.queue_heads(others, now)
        overdue = [m for m, queued in heads.items() if now - max(queued, since) > bound]
        return overdue or list(held)

    async def _claim_any(self, node_id: str, models: Sequence[str], max_jobs: int) -> list[Job]:
        name, labels = self._node_ident.get(node_id, (None, {}))
        jobs = await self.store.fetch_jobs(
            node_id,
            models,
            max_jobs,
            self.config.lease_seconds,
            self._clock(),
            name,
            labels,
            fair=self.config.fair_share,
        )
        if jobs:
            self.notifier.publish([job_topic(j.id) for j in jobs])  # started
        if len(jobs) >= max_jobs:  # more may wait: a claim racing this one skipped what
            self.notifier.publish({model_topic(j.model) for j in jobs})  # it held; retry
        return jobs

    async def release_unsent(self, jobs: Sequence[Job]) -> int:
        """Hand back jobs claimed for a caller that never got them (it left before the
        answer went out): queued again, the attempt not counted, each only while its
        lease is still the one claimed. Returns how many went back."""
        released = [
            job
            for job in jobs
            if job.lease_id is not None
            and await self.store.release_lease(job.id, job.lease_id) is not None
        ]
        if released:
            self.notifier.publish({model_topic(j.model) for j in released})
            self.notifier.publish(job_topic(j.id) for j in released)
            ids = ",".join(j.id for j in released)
            log.info(
                f"leases released: node {jobs[0].node_id} left before it got {ids}",
                extra={"jobs": ids, "node_id": jobs[0].node_id},
            )
        return len(released)

    async def heartbeat(
        self, key: ApiKey, node_id: str, lease_ids: Sequence[str], stats: JSON | None
    ) -> HeartbeatOutcome:
        """Extend the node's leases and record its stats."""
        await self._check_node(key, node_id)
        await self._touch(node_id, stats or {})
        return await self.store.heartbeat(
            node_id, lease_ids, self.config.lease_seconds, self._clock()
        )

    async def watch(
        self,
        key: ApiKey,
        node_id: str,
        leases: Mapping[str, str],
        wait: float,
        caller: Caller | None = None,
    ) -> list[str]:
        """The jobs among `leases` (job id -> lease id) cancelled under those leases;
        with `wait`, a long-poll held until one is (or `wait` seconds pass, or `caller`
        leaves). A job's topic fires on its cancel, here or on another server, so a
        node hears of it in milliseconds rather than at its next heartbeat."""
        await self._check_node(key, node_id)
        wait = min(max(wait, 0.0), self.config.max_poll_wait_seconds)
        deadline = self._clock() + wait
        with self.notifier.listen(job_topic(j) for j in leases) as event:
            if caller is not None:
                caller.watch(event)
            loop = asyncio.get_running_loop()
            while True:  # listening first, then reading: no cancel is missed
                event.clear()
                read_at = loop.time()
                cancelled = await self._cancelled(leases)
                remaining = deadline - self._clock()
                if cancelled or remaining <= 0 or self.closing:
                    return cancelled
                if caller is not None and caller.gone:
                    return []
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return await self._cancelled(leases)
                # the watched jobs' ends wake it too: on a busy node, one read for many
                await asyncio.sleep(read_at + WATCH_READ_SECONDS - loop.time())

    async def _cancelled(self, leases: Mapping[str, str]) -> list[str]:
        jobs = await self.store.get_jobs(list(leases)) if leases else []
        return [
            j.id for j in jobs if j.status is JobStatus.CANCELLED and j.lease_id == leases.get(j.id)
        ]

    async def submit_results(
        self, key: ApiKey, node_id: str | None, results: Sequence[NodeResult]
    ) -> list[ResultOutcome]:
        """Record results under fencing; each is accepted or refused on its own."""
        if node_id is not None:
            await self._check_node(key, node_id)
        moved = await self._fall_back(results) if self.aliases else {}
        if moved:  # an alias's jobs moved to their next members; the rest as usual
            rest = [r for i, r in enumerate(results) if i not in moved]
            stored = iter(await self.store.submit_results(rest, self._clock()) if rest else [])
            outcomes = [moved[i] if i in moved else next(stored) for i in range(len(results))]
        else:
            outcomes = await self.store.submit_results(results, self._clock())
        # quotas (core/quotas.py): the tokens of completed jobs count for their shares
        # (before anyone waiting hears of them: a client's next submit sees them)
        await self.quotas.count_tokens(o.job for o in outcomes if o.accepted and o.job)
        finished, requeued = [], set()
        for o in outcomes:
            if o.job is None:
                continue
            if o.job.status.is_final:
                for waiter in self._handoff.get(o.job.id, ()):
                    if not waiter.done():
                        waiter.set_result(o.job)
                self.deltas.finish(o.job.id)
                finished.append(job_topic(o.job.id))
                self._count_active(o.job.owner, -1)
            else:
                requeued.add(model_topic(o.job.model))
        self.notifier.publish([*finished, *requeued])
        return outcomes

    async def push_deltas(self, events: Sequence[JSON]) -> int:
        """Pieces of running jobs (`choices` when given, or `progress`, else the text
        `delta`), each
        accepted only under the job's current lease (fencing, as for results); returns
        how many were accepted."""
        leases = {
            j.id: j.lease_id
            for j in await self.store.get_jobs(list({str(e["job_id"]) for e in events}))
            if j.status is JobStatus.IN_PROGRESS
        }
        accepted = 0
        for e in events:
            if leases.get(e["job_id"]) == e["lease_id"]:
                piece: Piece = str(e.get("delta") or "")
                if e.get("choices"):
                    piece = e["choices"]
                elif e.get("progress"):
                    piece = {"progress": e["progress"]}
                accepted += self.deltas.push(e["job_id"], int(e["index"]), piece)
        return accepted

    def follow(self, job: Job) -> AsyncIterator[Piece]:
        """The job's pieces as they are made (those so far first), until it is final."""

        async def is_final() -> bool:
            now = await self.store.get_job(job.id)
            return now is None or now.status.is_final

        return self.deltas.follow(job.id, is_final)

    async def live_nodes(self) -> list[Node]:
        return await self.store.list_nodes(self._clock() - self.config.node_ttl_seconds)

    async def demanded_models(self, key: ApiKey, node_id: str, prefixes: list[str]) -> list[str]:
        """Models of queued jobs that start with one of `prefixes` (models a node may
        fetch on demand); read from the per-model counters, so it costs the same however
        long the queue is."""
        await self._check_node(key, node_id)
        await self._touch(node_id)
        wanted = tuple(p for p in prefixes if p)
        return sorted(
            model
            for model, counts in (await self.store.stats()).items()
            if counts.get(JobStatus.QUEUED.value, 0) > 0 and model.startswith(wanted)
        )

    @staticmethod
    def _fetched_on_demand(model: str, nodes: list[Node]) -> bool:
        """Whether one of `nodes` fetches `model` on demand (its spec prefixes, reported
        in its heartbeats' stats)."""
        for node in nodes:
            prefixes = (node.stats or {}).get("on_demand")
            if isinstance(prefixes, list) and model.startswith(
                tuple(p for p in prefixes if isinstance(p, str) and p)
            ):
                return True
        return False

    async def live_node(self, node_id: str) -> Node | None:
        """The node, if it registered and is live (heard from within node_ttl_seconds)."""
        node = await self.store.get_node(node_id)
        if node is None or node.last_seen < self._clock() - self.config.node_ttl_seconds:
            return None
        return node

    async def _ever_served(self, model: str) -> bool:
        """Whether any node that ever registered (live or not) lists `model`."""
        return any(model in node.model_names() for node in await self.store.list_nodes(0.0))

    async def served_models(self) -> dict[str, list[Node]]:
        """Model name -> the live nodes that serve it."""
        served: dict[str, list[Node]] = {}
        for node in await self.live_nodes():
            for name in node.model_names():
                served.setdefault(name, []).append(node)
        return served

    async def stats(self) -> dict[str, Any]:
        per_model = await self.store.stats()
        totals: dict[str, int] = {s.value: 0 for s in JobStatus}
        for counts in per_model.values():
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
        nodes = await self.live_nodes()
        return {"jobs": totals, "models": per_model, "nodes": len(nodes)}

    # -- housekeeping -----------------------------------------------------------

    async def reap(self) -> ReapOutcome:
        """One pass: re-queue expired leases, fail exhausted ones, expire late jobs; and
        record that leases are watched (see `resume_leases`)."""
        now = self._clock()
        outcome = await self.store.reap(now)
        await self.store.watch_leases(now)
        if outcome.requeued:
            self.notifier.publish_all_models()
        final = [*outcome.failed, *outcome.expired]
        for job_id in final:
            self.deltas.finish(job_id)
        if final:
            self.notifier.publish(job_topic(j) for j in final)
        if outcome.changed:
            log.info(
                "reaped leases",
                extra={
                    "requeued": len(outcome.requeued),
                    "failed": len(outcome.failed),
                    "expired": len(outcome.expired),
                },
            )
        return outcome

    async def forget_nodes(self) -> int:
        """Forget nodes not seen for `node_retention_seconds` (their rows), and drop
        what this process remembers of nodes no longer live (read again if they call);
        how many rows went."""
        now = self._clock()
        gone = await self.store.forget_nodes(now - self.config.node_retention_seconds)
        quiet = now - self.config.node_ttl_seconds
        for node_id, touched in list(self._node_touched.items()):
            if touched < quiet:
                del self._node_touched[node_id]
                self._node_owner.pop(node_id, None)
                self._node_ident.pop(node_id, None)
        if gone:
            log.info("forgot nodes", extra={"nodes": gone})
        return gone

    async def resume_leases(self, reaper_interval: float) -> LeaseResume:
        """At start, before the first reaper pass: when no server of the deployment has
        watched the leases for a while (two reaper intervals and a second), the nodes
        holding them could not heartbeat meanwhile; leases still live when they were
        last watched then run at least `lease_grace` more seconds, so that nodes that
        kept working through the outage can renew them and hand in their results."""
        resumed = await self.store.resume_leases(
            self._clock(), self.config.lease_grace, 2 * reaper_interval + 1.0
        )
        if resumed.extended:
            since = resumed.watched_at
            unwatched = "unknown" if since is None else f"{self._clock() - since:.1f} s"
            log.warning(
                f"leases resumed after an outage: {len(resumed.extended)} extended by a "
                f"grace of {self.config.lease_grace:g} s (unwatched for {unwatched})",
                extra={"extended": len(resumed.extended)},
            )
        return resumed

    async def run_reaper(self, interval: float) -> None:
        """Reap forever, every `interval` seconds, and forget long-gone nodes every
        NODE_FORGET_SECONDS (sooner with a short retention; a background task of the
        server)."""
        every = min(NODE_FORGET_SECONDS, self.config.node_retention_seconds / 4)
        forgot_at = -every
        while True:
            await one_pass("reaper", self.reap, log)
            await one_pass("response cache", self.cache.flush, log)
            if self.aliases:
                await one_pass("alias fallbacks", self.move_stranded, log)
            if time.monotonic() - forgot_at >= every:
                forgot_at = time.monotonic()
                await one_pass("node expiry", self.forget_nodes, log)
            await asyncio.sleep(interval)


def _digest(req: JobRequest) -> str:
    try:
        return request_hash(req)
    except TypeError as exc:  # orjson: integers beyond 64 bits, nesting too deep
        raise InvalidRequest(f"the request cannot be stored: {exc}") from exc


def _may_see(key: ApiKey, job: Job) -> bool:
    return key.role is Role.ADMIN or job.owner == key.id
