"""`create_app(settings, store)`: the whole HTTP server, its services in one `AppState`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from openbeepboop import __version__
from openbeepboop.server.core.assistants import Assistants
from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.batches import BatchConfig, Batches
from openbeepboop.server.core.cache import CacheConfig, ResponseCache
from openbeepboop.server.core.dashboard import Dashboard
from openbeepboop.server.core.files import Files
from openbeepboop.server.core.identity import identity_of
from openbeepboop.server.core.keys import GivenKey, given_keys
from openbeepboop.server.core.queue import Queue, QueueConfig
from openbeepboop.server.core.quotas import QuotaConfig, Quotas
from openbeepboop.server.core.retention import Retention, RetentionConfig
from openbeepboop.server.core.sessions import Sessions
from openbeepboop.server.core.swarm_keys import SwarmKeys, key_signer
from openbeepboop.server.http import (
    errors,
    fastlane,
    routes_batch,
    routes_client,
    routes_llamanet,
    routes_node,
    routes_ops,
    routes_responses,
    routes_swarm_keys,
    routes_templates,
    ws,
)
from openbeepboop.server.http.fastlane import FastLane
from openbeepboop.server.http.guards import BodyLimit, StorableUrl
from openbeepboop.server.http.inbound import JobBatch, JobSpec
from openbeepboop.server.http.metrics import Metrics, MetricsMiddleware
from openbeepboop.server.http.ratelimit import KeyRateLimiter
from openbeepboop.server.http.state import AppState, app_state
from openbeepboop.server.http.swarm_peers import PeerFetch
from openbeepboop.server.http.swarm_setup import swarm_member
from openbeepboop.server.settings import ServerSettings
from openbeepboop.server.store import factory
from openbeepboop.server.store.base import SharedStore, Store
from openbeepboop.server.web import site


class QueueApp(FastAPI):
    """FastAPI, with the fast lane (when on) in front of its whole middleware stack."""

    obb: AppState  # the server's services (state.py: app_state)
    lanes: dict[str, fastlane.Lane] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.lanes is None:
            return stack
        return FastLane(stack, self.lanes, app_state(self))


def queue_config(settings: ServerSettings) -> QueueConfig:
    return QueueConfig(
        lease_seconds=settings.lease_seconds,
        lease_grace_seconds=settings.lease_grace_seconds,
        max_attempts=settings.max_attempts,
        max_active_jobs_per_key=settings.max_active_jobs_per_key,
        node_ttl_seconds=settings.node_ttl_seconds,
        node_retention_seconds=settings.node_retention_seconds,
        max_poll_wait_seconds=settings.max_poll_wait_seconds,
        sync_timeout_seconds=settings.sync_timeout_seconds,
        model_wait_seconds=settings.model_wait_seconds,
        aliases=settings.model_aliases,
        alias_wait_seconds=settings.alias_wait_seconds,
        affinity_max_wait_seconds=settings.affinity_max_wait_seconds,
        fair_share=settings.fair_share,
    )


def cache_config(settings: ServerSettings) -> CacheConfig:
    return CacheConfig(
        enabled=settings.cache_policy != "off",
        policy=settings.cache_policy,
        ttl_seconds=settings.cache_ttl_seconds,
        max_bytes=settings.cache_max_bytes,
        models=settings.cache_models,
        keys=settings.cache_keys,
        scope=settings.cache_scope,
    )


def quota_config(settings: ServerSettings) -> QuotaConfig:
    return QuotaConfig(
        jobs_per_hour=settings.quota_jobs_per_hour,
        tokens_per_hour=settings.quota_tokens_per_hour,
    )


def retention_config(settings: ServerSettings) -> RetentionConfig:
    return RetentionConfig(
        completed_seconds=settings.keep_completed_jobs_seconds,
        failed_seconds=settings.keep_failed_jobs_seconds,
        cancelled_seconds=settings.keep_cancelled_jobs_seconds,
        batches_seconds=settings.keep_batches_seconds,
        batch_rows=settings.prune_batch_rows,
        share=settings.prune_share,
    )


def files_of(store: Store, settings: ServerSettings) -> Files:
    return Files(
        store,
        settings.max_file_bytes,
        settings.max_batch_lines,
        max_line_bytes=settings.max_batch_line_bytes,
        quota_bytes=settings.file_quota_bytes,
        default_expiry_seconds=settings.file_expiry_seconds,
    )


def open_store(settings: ServerSettings) -> Store:
    """The store `settings.database_url` names (SQLite by default)."""
    return factory.open_store(settings)


def create_app(settings: ServerSettings, store: Store | None = None) -> FastAPI:
    """Build the server. The store is opened and closed with the app's lifespan, and the
    lease reaper and the pruner (core/retention.py) run while the app does. The keys the
    operator gave (`admin_key`, ...) are checked here (ConfigError) and made sure of in
    the store before the app serves (StartupRefused when one cannot be)."""
    given = given_keys(settings)  # before anything is opened: a wrong key is one line
    store = store or open_store(settings)
    queue = Queue(
        store,
        queue_config(settings),
        cache=ResponseCache(store, cache_config(settings)),
        quotas=Quotas(store, quota_config(settings)),
    )
    files = files_of(store, settings)
    retention = Retention(store, retention_config(settings))
    assistants = Assistants(store, queue)
    batches = Batches(
        store, queue, files, assistants, BatchConfig(priority=settings.batch_priority)
    )
    metrics = Metrics()
    dashboard = Dashboard(queue)
    identity = identity_of(settings)
    swarm = swarm_member(settings, identity, queue)
    signer = key_signer(settings)  # client and node keys work on every member
    keyring = KeyRing(store, signer=signer, origin=identity.id)
    swarm_keys = None if signer is None else SwarmKeys(store, keyring, PeerFetch(signer))
    if swarm is not None and swarm_keys is not None:  # revocations gossiped each heartbeat
        swarm_keys.publish_to(swarm)
        swarm.on_beat("key revocations", swarm_keys.sync)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _open(store, keyring, given)
        if isinstance(store, SharedStore):  # several servers: wake-ups and deltas cross
            await store.bridge(queue.notifier, queue.deltas)
        await queue.resume_leases(settings.reaper_interval_seconds)  # before the reaper
        tasks = [
            asyncio.create_task(queue.run_reaper(settings.reaper_interval_seconds)),
            asyncio.create_task(batches.run()),
            asyncio.create_task(keyring.run_recheck(settings.key_recheck_seconds)),
        ]
        if settings.prune_interval_seconds > 0:
            tasks.append(asyncio.create_task(retention.run(settings.prune_interval_seconds)))
        if swarm is not None:
            if swarm_keys is not None:  # the first record already says what we know
                await swarm_keys.refresh()
            await swarm.start()
            tasks.append(asyncio.create_task(swarm.run()))
        try:
            yield
        finally:
            await dashboard.close()  # ends the pages' live streams
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if swarm is not None:
                swarm.stop()
            await store.close()

    app = QueueApp(
        title="OpenBeepBoop",
        version=__version__,
        summary="A durable LLM job queue with an OpenAI-compatible API and pull-based nodes.",
        lifespan=lifespan,
        **_telemetry(settings.opentelemetry),
    )
    app.obb = AppState(
        settings=settings,
        queue=queue,
        files=files,
        batches=batches,
        assistants=assistants,
        keyring=keyring,
        rate_limiter=KeyRateLimiter(
            settings.rate_limit,
            settings.node_rate_limit,
            # several servers on one database count each key's requests there
            shared=store.hit_counters if isinstance(store, SharedStore) else None,
        ),
        metrics=metrics,
        sessions=Sessions(store, keyring, settings.web_session_seconds),
        dashboard=dashboard,
        identity=identity,
        swarm=swarm,
        swarm_keys=swarm_keys,
    )
    errors.install(app)
    app.include_router(routes_client.router)
    app.include_router(routes_responses.router)
    app.include_router(routes_batch.router)
    app.include_router(routes_templates.router)
    app.include_router(ws.router)
    app.include_router(routes_node.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_llamanet.router)
    app.include_router(routes_swarm_keys.router)
    site.install(app, settings)
    if settings.fast_lane:
        app.lanes = fastlane.lanes([routes_client.router, routes_node.router])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        # a file upload carries the file plus a little multipart framing
        per_path={"/v1/files": settings.max_file_bytes + 64 * 1024},
    )
    app.add_middleware(StorableUrl)
    _document_job_schemas(app)
    return app


async def _open(store: Store, keyring: KeyRing, given: list[GivenKey]) -> None:
    """Open the store and make sure of the keys the operator gave (closed again when
    one cannot be: the server does not start)."""
    await store.open()
    try:
        for key in given:
            await keyring.ensure_given(key)
    except BaseException:
        await store.close()
        raise


def _telemetry(enabled: bool) -> dict[str, Any]:
    """FastAPI's own OpenTelemetry (in FastAPI 0.16x and later) asks the global providers
    on every request whether an SDK was set up; off unless the setting asks for it."""
    if enabled or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _document_job_schemas(app: FastAPI) -> None:
    """Add the models that `POST /v1/jobs` validates by hand to the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (JobSpec, JobBatch):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
