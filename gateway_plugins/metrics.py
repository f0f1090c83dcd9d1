"""Prometheus metrics of the gateway, served on ``/metrics`` (aiohttp).

Per-pod gauges are read from the live ``PodState`` objects at scrape time, so
the request path pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.kv_events.feed import KvEventFeed
from gateway_plugins.pod_metrics_store import PodMetricsStore
from gateway_plugins.routing.kv_index import PodSync
from gateway_plugins.routing.router import Router
from gateway_plugins.tenancy.gate import Tenancy

#: Latency buckets, seconds: routing decisions (tens of microseconds) ...
_DECISION_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
#: ... and what a client sees from an engine (milliseconds to a minute).
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RequestMetrics:
    """Per-request metrics the ext_proc streams record (the rest are read at scrape time)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "brickyard_requests",
            "Requests by model, strategy and HTTP status (`forwarded`: the response went to the client "
            "without passing through the gateway, so its status is unknown here).",
            ["model", "strategy", "code"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "brickyard_routing_decision_seconds",
            "Time to choose a pod (strategy scoring included, body parsing and limit checks not).",
            buckets=_DECISION_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "brickyard_time_to_first_token_seconds",
            "From the routing decision to the first response body bytes, for responses the gateway reads.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.itl_seconds = Histogram(
            "brickyard_inter_token_latency_seconds",
            "Between consecutive chunks of a streamed response (one token each from vLLM), as the gateway "
            "sees them.",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )


class ResponseTimer:
    """Gateway-side time to first token and inter-token latency of one response the gateway reads."""

    __slots__ = ("_itl", "_last", "_ttft")

    def __init__(self, metrics: RequestMetrics, model: str, routed_at: float, streamed: bool) -> None:
        self._ttft = metrics.ttft_seconds.labels(model)
        self._itl = metrics.itl_seconds.labels(model) if streamed else None
        self._last = routed_at

    def chunk(self, now: float) -> None:
        """A body chunk arrived at ``now`` (``time.perf_counter``): the first is the TTFT, the rest ITLs."""
        if self._ttft is not None:
            self._ttft.observe(now - self._last)
            self._ttft = None
        elif self._itl is not None:
            self._itl.observe(now - self._last)
        self._last = now


class PodCollector(Collector):
    def __init__(
        self,
        pods: PodRegistry,
        router: Router,
        store: PodMetricsStore | None = None,
        tenancy: Tenancy | None = None,
        kv_feed: KvEventFeed | None = None,
    ) -> None:
        self.pods = pods
        self.router = router
        self.store = store
        self.tenancy = tenancy
        self.kv_feed = kv_feed

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
        by_model: dict[str, int] = {}
        for state in self.pods.states():
            values = [state.namespace, state.name, state.model]
            by_model[state.model] = by_model.get(state.model, 0) + state.inflight
            inflight.add_metric(values, state.inflight)
            remote.add_metric(values, state.remote_inflight)
            if state.metrics is not None:
                age.add_metric(values, now - state.metrics.timestamp)
        yield inflight
        yield remote
        yield age
        model_inflight = GaugeMetricFamily(
            "brickyard_requests_in_flight",
            "Requests this gateway has routed that have not finished, by the model of the pod serving them.",
            labels=["model"],
        )
        for model, count in by_model.items():
            model_inflight.add_metric([model], count)
        yield model_inflight
        fallbacks = CounterMetricFamily(
            "brickyard_routing_fallbacks",
            "Decisions a strategy made by its explicit fallback rule (e.g. least-request when no candidate's "
            "metrics were known).",
            labels=["strategy"],
        )
        for strategy, count in self.router.fallback_decisions.items():
            fallbacks.add_metric([strategy], count)
        yield fallbacks
        prefix = CounterMetricFamily(
            "brickyard_prefix_decisions",
            "Decisions of prefix-aware strategies by the index the chosen pod was matched on: exact (the "
            "engine's own KV-cache events) or approximate (what this gateway sent it).",
            labels=["index"],
        )
        for index, count in self.router.prefix_decisions.items():
            prefix.add_metric([index], count)
        yield prefix
        tokenizers = GaugeMetricFamily(
            "brickyard_model_tokenizer",
            "1 for each model whose own tokenizer this gateway loaded: its prompts' lengths and token blocks "
            "are exact; any other model's are estimated from its text.",
            labels=["model"],
        )
        for model in self.router.tokenizers:
            tokenizers.add_metric([model], 1)
        yield tokenizers
        if self.kv_feed is not None:
            yield from _kv_event_metrics(self.kv_feed)
        yield CounterMetricFamily(
            "brickyard_routing_unknown_metrics_decisions",
            "Decisions by a metrics-reading strategy while a candidate pod's metrics were unknown or stale.",
            value=self.router.decisions_with_unknown_metrics,
        )
        redis_errors = CounterMetricFamily(
            "brickyard_redis_errors",
            "Failed Redis operations, by what the gateway was doing.",
            labels=["use"],
        )
        if self.store is not None:
            yield CounterMetricFamily(
                "brickyard_pod_metrics_records",
                "Pod-metrics records applied.",
                value=self.store.records_received,
            )
            redis_errors.add_metric(["pod-metrics"], self.store.redis_errors)
        if self.tenancy is not None:
            redis_errors.add_metric(["rate-limits"], self.tenancy.limiter.redis_errors)
            redis_errors.add_metric(["users"], self.tenancy.users.redis_errors)
            rejections = CounterMetricFamily(
                "brickyard_rate_limit_rejections",
                "Requests refused with 429, by the limit they exceeded (rpm, tpm per user; rps per model).",
                labels=["kind"],
            )
            for kind, count in self.tenancy.rejections.items():
                rejections.add_metric([kind], count)
            yield rejections
            yield GaugeMetricFamily(
                "brickyard_users", "Users the gateway knows.", value=self.tenancy.users.users_count
            )
        yield redis_errors
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


def _kv_event_metrics(feed: KvEventFeed) -> Iterator[Metric]:
    index = feed.index
    pods = GaugeMetricFamily(
        "brickyard_kv_index_pods",
        "Pods in the exact prefix index by sync state: live (routed on their events) or uncertain (routed "
        "approximately after a gap, until it heals).",
        labels=["state"],
    )
    states = list(index.sync_states().values())
    for state in PodSync:
        pods.add_metric([state.value], states.count(state))
    yield pods
    blocks = GaugeMetricFamily(
        "brickyard_kv_index_blocks",
        "Blocks the pod's engine holds, per its KV-cache events.",
        labels=["namespace", "pod"],
    )
    for state in feed.registry.states():
        blocks.add_metric([state.namespace, state.name], index.blocks_held(state))
    yield blocks
    for name, value, text in (
        ("brickyard_kv_event_batches", feed.batches, "KV-event batches applied to the exact index."),
        (
            "brickyard_kv_event_replays",
            feed.replays,
            "Replays asked of engines (on subscription and after gaps).",
        ),
        ("brickyard_kv_event_replay_failures", feed.replay_failures, "Replays that timed out or failed."),
        ("brickyard_kv_event_gaps", index.gaps, "Gaps in a pod's event sequence that no replay closed."),
        ("brickyard_kv_event_blocks_stored", index.stored_blocks, "Blocks the engines reported stored."),
        ("brickyard_kv_event_blocks_removed", index.removed_blocks, "Blocks the engines reported evicted."),
        ("brickyard_kv_event_malformed", feed.malformed, "KV-event messages that could not be decoded."),
        (
            "brickyard_kv_event_orphan_blocks",
            index.orphan_blocks,
            "Stored blocks whose parent the index never saw (stored before its history began): not indexed.",
        ),
    ):
        yield CounterMetricFamily(name, text, value=value)
