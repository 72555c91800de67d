"""Prometheus metrics: request counts and latencies by route template, open streams, jobs by status."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry()
REQUESTS = Counter("darts_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram(
    "darts_http_request_seconds",
    "time to the response's first byte",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
OPEN_STREAMS = Gauge("darts_open_streams", "Server-Sent Event streams open now", registry=REGISTRY)


class JobsByStatus(Collector):
    """`darts_jobs{status=...}` read from the database at scrape time (nothing when it is unreachable)."""

    def __init__(self) -> None:
        self.count: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("darts_jobs", "jobs by status", labels=["status"])
        if self.count is not None:
            try:
                counts = self.count()
            except Exception:
                counts = {}
            for status, n in sorted(counts.items()):
                family.add_metric([status], n)
        yield family


JOBS = JobsByStatus()
REGISTRY.register(JOBS)


class RequestMetrics:
    """ASGI middleware timing each request to its response start, labelled by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                LATENCY.labels(scope["method"], _route(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            REQUESTS.labels(scope["method"], _route(scope), str(status["code"])).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
