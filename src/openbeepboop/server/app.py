"""`create_app(settings, store)`: the whole HTTP server, with its state on `app.state`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from openbeepboop import __version__
from openbeepboop.auth import KeyRing
from openbeepboop.queue import Queue, QueueConfig
from openbeepboop.server import errors, routes_client, routes_node, routes_ops
from openbeepboop.server.fastlane import FastLane
from openbeepboop.server.guards import BodyLimit, KeyRateLimiter
from openbeepboop.server.metrics import Metrics, MetricsMiddleware
from openbeepboop.server.schemas import JobBatch, JobSpec
from openbeepboop.settings import ServerSettings
from openbeepboop.store.base import Store
from openbeepboop.store.sqlite import SqliteStore


def queue_config(settings: ServerSettings) -> QueueConfig:
    return QueueConfig(
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        max_active_jobs_per_key=settings.max_active_jobs_per_key,
        node_ttl_seconds=settings.node_ttl_seconds,
        max_poll_wait_seconds=settings.max_poll_wait_seconds,
        sync_timeout_seconds=settings.sync_timeout_seconds,
        model_wait_seconds=settings.model_wait_seconds,
    )


def open_store(settings: ServerSettings) -> Store:
    """The store `settings.database_url` names (SQLite by default)."""
    return SqliteStore(settings.sqlite_path, synchronous=settings.sqlite_synchronous)


def create_app(settings: ServerSettings, store: Store | None = None) -> FastAPI:
    """Build the server. The store is opened and closed with the app's lifespan, and the
    lease reaper runs while the app does."""
    store = store or open_store(settings)
    queue = Queue(store, queue_config(settings))
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.open()
        reaper = asyncio.create_task(queue.run_reaper(settings.reaper_interval_seconds))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await store.close()

    app = FastAPI(
        title="OpenBeepBoop",
        version=__version__,
        summary="A durable LLM job queue with an OpenAI-compatible API and pull-based nodes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.queue = queue
    app.state.keyring = KeyRing(store)
    app.state.rate_limiter = KeyRateLimiter(settings.rate_limit, settings.node_rate_limit)
    app.state.metrics = metrics
    errors.install(app)
    app.include_router(routes_client.router)
    app.include_router(routes_node.router)
    app.include_router(routes_ops.router)
    app.add_middleware(FastLane)  # innermost: serves the hottest calls past FastAPI
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    _document_job_schemas(app)
    return app


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
