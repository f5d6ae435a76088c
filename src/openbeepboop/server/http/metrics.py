"""Prometheus metrics on a registry of the app's own (no process globals).

Request counts and latencies are kept as plain numbers and turned into metric families
only when `/metrics` is scraped (a collector): counting a request is then a dict update
and a bisect, with none of the per-sample locks and label checks of prometheus_client's
Counter and Histogram, which cost a few percent of the server's CPU per request.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ASGIApp = Any
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0)


class _Latency:
    """One route's latency histogram: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


class RequestStats:
    """HTTP request counts by (method, route, status) and latencies by route, exposed as
    `openbeepboop_http_requests_total` and `openbeepboop_http_request_seconds`."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        self._latency: dict[str, _Latency] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        key = (method, route, str(status))
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = _Latency()
        latency.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        latency.total += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "openbeepboop_http_requests",
            "HTTP requests by route and status.",
            labels=["method", "route", "status"],
        )
        for labels, n in list(self._counts.items()):
            requests.add_metric(list(labels), n)
        yield requests
        latency = HistogramMetricFamily(
            "openbeepboop_http_request_seconds",
            "HTTP request latency by route.",
            labels=["route"],
        )
        for route, h in list(self._latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], h.counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([route], buckets, h.total)
        yield latency


class CacheStats:
    """The response cache's counters as last read (core/cache.py `summary`), turned
    into metric families at scrape time."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        v = self.values
        yield CounterMetricFamily(
            "openbeepboop_cache_hits",
            "Requests answered from the response cache by this server.",
            value=v.get("hits", 0),
        )
        yield CounterMetricFamily(
            "openbeepboop_cache_misses",
            "Requests looked up in the response cache and not found, by this server.",
            value=v.get("misses", 0),
        )
        entries = GaugeMetricFamily(
            "openbeepboop_cache_entries", "Answers held by the response cache."
        )
        entries.add_metric([], v.get("entries", 0))
        yield entries
        size = GaugeMetricFamily(
            "openbeepboop_cache_bytes", "Bytes of the answers held by the response cache."
        )
        size.add_metric([], v.get("bytes", 0))
        yield size


class Metrics:
    """HTTP request counts and latencies, and queue gauges refreshed at scrape time."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestStats()
        self.registry.register(self.requests)
        self.jobs = Gauge(
            "openbeepboop_jobs",
            "Jobs in the store by model and status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.nodes = Gauge("openbeepboop_live_nodes", "Live nodes.", registry=self.registry)
        self.cache = CacheStats()
        self.registry.register(self.cache)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        self.requests.observe(method, route, status, seconds)

    def render(self, stats: dict[str, Any], cache: dict[str, int] | None = None) -> bytes:
        self.cache.values = cache or {}
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
