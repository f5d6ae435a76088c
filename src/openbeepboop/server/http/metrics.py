"""Prometheus metrics on a registry of the app's own (no process globals)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ASGIApp = Any


class Metrics:
    """HTTP request counts and latencies, and queue gauges refreshed at scrape time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "openbeepboop_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "openbeepboop_http_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120),
        )
        self.jobs = Gauge(
            "openbeepboop_jobs",
            "Jobs in the store by model and status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.nodes = Gauge("openbeepboop_live_nodes", "Live nodes.", registry=self.registry)
        # the labelled children, found once: `labels()` validates and locks on every call
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[str, Any] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        counted = self._counted.get((method, route, str(status)))
        if counted is None:
            counted = self.requests.labels(method, route, str(status))
            self._counted[(method, route, str(status))] = counted
        timed = self._timed.get(route)
        if timed is None:
            timed = self._timed[route] = self.latency.labels(route)
        counted.inc()
        timed.observe(seconds)

    def render(self, stats: dict[str, Any]) -> bytes:
        self.jobs.clear()
        for model, counts in stats.get("models", {}).items():
            for status, n in counts.items():
                self.jobs.labels(model, status).set(n)
        self.nodes.set(stats.get("nodes", 0))
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Count and time every HTTP request by its route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - start)
