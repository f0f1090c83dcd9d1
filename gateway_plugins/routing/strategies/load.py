"""Load-balancing strategies: spread requests by what each pod is doing now.

The gateway's own counters (``PodState.load``) are fresh at every decision;
metric records are a scrape interval old. Metric strategies therefore add what
this gateway routed to a pod since its record (``routed_since_record``,
``tokens_since_record``), so a burst arriving between two records does not all
land on the pod that looked idlest in the last one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.routing.strategies.base import MetricsStrategy, Stateless, least_load_scores
from gateway_plugins.routing.types import PodState, RoutingRequest

#: Output tokens assumed for a request that does not set ``max_tokens``.
DEFAULT_OUTPUT_TOKENS = 128


class RandomStrategy(Stateless):
    """Uniformly random: the baseline every other strategy must beat."""

    name: ClassVar[str] = "random"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        rnd = random.random
        return [rnd() for _ in pods]


class RoundRobinStrategy(Stateless):
    """Each candidate in turn (by position in the model's ready list)."""

    name: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        scores = [0.0] * len(pods)
        scores[self._turn % len(pods)] = 1.0
        return scores

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        self._turn += 1


class LeastRequestStrategy(Stateless):
    """Fewest requests in flight; ties broken at random.

    Counts this gateway's own requests, which rise at the moment of selection
    (a burst arriving together spreads across pods instead of piling onto the
    one that looked idle), plus what the other gateway replicas last reported.
    """

    name: ClassVar[str] = "least-request"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        return least_load_scores(pods)


class PowerOfTwoStrategy(Stateless):
    """Two candidates drawn at random, the one with fewer requests in flight wins.

    Near least-request's balance without every gateway replica converging on the
    same pod between two in-flight reports.
    """

    name: ClassVar[str] = "power-of-two"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        if len(pods) <= 2:
            return least_load_scores(pods)
        scores = [float("-inf")] * len(pods)
        for i in random.sample(range(len(pods)), 2):
            scores[i] = -float(pods[i].load)
        return scores


class LeastQueueStrategy(MetricsStrategy):
    """Fewest requests waiting in the engine's queue (the Inference Extension's queue scorer)."""

    name: ClassVar[str] = "least-queue"

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        return -float(metrics.waiting + pod.routed_since_record)


class LeastKvCacheStrategy(MetricsStrategy):
    """Lowest KV-cache usage, plus the prompt tokens routed to the pod since its record."""

    name: ClassVar[str] = "least-kv-cache"

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        capacity = metrics.num_blocks * metrics.block_size
        pending = pod.tokens_since_record / capacity if capacity else 0.0
        return -(metrics.kv_usage + pending)


class LeastGpuCacheStrategy(LeastKvCacheStrategy):
    """``least-kv-cache`` under the name older vLLM metrics (``gpu_cache_usage_perc``) gave it."""

    name: ClassVar[str] = "least-gpu-cache"


class ThroughputStrategy(MetricsStrategy):
    """Least token throughput (prompt + generated tokens per second over the record's window).

    Tokens routed since the record count as one more second's worth.
    """

    name: ClassVar[str] = "throughput"

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        return -(metrics.prompt_tps + metrics.generation_tps + pod.tokens_since_record)


class LeastLatencyStrategy(MetricsStrategy):
    """Shortest estimated time to serve this request, from the pod's measured means:

    queue  = (waiting + routed since the record) x the pod's mean prefill time (ttft - queue time)
    prefill = this prompt's tokens x the pod's prefill seconds per prompt token
    decode = this request's max_tokens (or 128) x the pod's mean time per output token
    """

    name: ClassVar[str] = "least-latency"

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        prefill_time = max(0.0, metrics.ttft_mean - metrics.queue_mean)
        per_token = prefill_time / metrics.prompt_tokens_mean if metrics.prompt_tokens_mean else 0.0
        queue = (metrics.waiting + pod.routed_since_record) * prefill_time
        output = request.max_tokens or DEFAULT_OUTPUT_TOKENS
        return -(queue + request.prompt_tokens * per_token + output * metrics.tpot_mean)
