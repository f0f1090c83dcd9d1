"""Prometheus metrics of the gateway, served on ``/metrics`` (aiohttp).

Per-pod gauges are read from the live ``PodState`` objects at scrape time, so
the request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway_plugins.discovery.registry import PodRegistry


class PodCollector(Collector):
    def __init__(self, pods: PodRegistry) -> None:
        self.pods = pods

    def collect(self) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "brickyard_pod_inflight_requests",
            "Requests this gateway has routed to the pod that have not finished.",
            labels=["namespace", "pod", "model"],
        )
        for state in self.pods.states():
            inflight.add_metric([state.namespace, state.name, state.model], state.inflight)
        yield inflight
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
