"""Prometheus metrics of the gateway, served on ``/metrics`` (aiohttp).

Per-pod gauges are read from the live ``PodState`` objects at scrape time, so
the request path pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.pod_metrics_store import PodMetricsStore
from gateway_plugins.routing.router import Router


class PodCollector(Collector):
    def __init__(self, pods: PodRegistry, router: Router, store: PodMetricsStore | None = None) -> None:
        self.pods = pods
        self.router = router
        self.store = store

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "pod", "model"]
        inflight = GaugeMetricFamily(
            "brickyard_pod_inflight_requests",
            "Requests this gateway has routed to the pod that have not finished.",
            labels=labels,
        )
        remote = GaugeMetricFamily(
            "brickyard_pod_remote_inflight_requests",
            "Requests in flight to the pod from the other gateway replicas, as they last reported.",
            labels=labels,
        )
        age = GaugeMetricFamily(
            "brickyard_pod_metrics_age_seconds",
            "Age of the pod's metrics record (absent when unknown or stale).",
            labels=labels,
        )
        now = time.time()
        for state in self.pods.states():
            values = [state.namespace, state.name, state.model]
            inflight.add_metric(values, state.inflight)
            remote.add_metric(values, state.remote_inflight)
            if state.metrics is not None:
                age.add_metric(values, now - state.metrics.timestamp)
        yield inflight
        yield remote
        yield age
        fallbacks = CounterMetricFamily(
            "brickyard_routing_fallbacks",
            "Decisions a strategy made by its explicit fallback rule (e.g. least-request when no candidate's "
            "metrics were known).",
            labels=["strategy"],
        )
        for strategy in {id(s): s for s in self.router.strategies.values()}.values():
            fallbacks.add_metric([strategy.name], strategy.fallbacks)
        yield fallbacks
        yield CounterMetricFamily(
            "brickyard_routing_unknown_metrics_decisions",
            "Decisions by a metrics-reading strategy while a candidate pod's metrics were unknown or stale.",
            value=self.router.decisions_with_unknown_metrics,
        )
        if self.store is not None:
            yield CounterMetricFamily(
                "brickyard_pod_metrics_records",
                "Pod-metrics records applied.",
                value=self.store.records_received,
            )
            yield CounterMetricFamily(
                "brickyard_redis_errors", "Failed Redis operations.", value=self.store.redis_errors
            )
        ready = GaugeMetricFamily("brickyard_model_ready_pods", "Ready pods per model.", labels=["model"])
        for model in self.pods.serving_models():
            ready.add_metric([model], len(self.pods.ready_pods(model)))
        yield ready


def metrics_app(registry: CollectorRegistry) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app
