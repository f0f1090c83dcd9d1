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
from typing import Self

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.routing.strategies.base import (
    MetricsStrategy,
    Stateless,
    StrategyContext,
    least_load_scores,
)
from gateway_plugins.routing.strategies.registry import strategy
from gateway_plugins.routing.types import PodState, RoutingRequest

#: Output tokens assumed for a request that does not set ``max_tokens``.
DEFAULT_OUTPUT_TOKENS = 128


class _Drawing(Stateless):
    """A strategy that draws from the injected random source, never the global one."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        return cls(context.rng)


@strategy("random")
class RandomStrategy(_Drawing):
    """Uniformly random: the baseline every other strategy must beat."""

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        rnd = self.rng.random
        return [rnd() for _ in pods]


@strategy("round-robin")
class RoundRobinStrategy(Stateless):
    """Each candidate in turn (by position in the model's ready list)."""

    def __init__(self) -> None:
        self._turn = 0

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        scores = [0.0] * len(pods)
        scores[self._turn % len(pods)] = 1.0
        return scores

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        self._turn += 1


@strategy("least-request")
class LeastRequestStrategy(Stateless):
    """Fewest requests in flight; ties broken at random.

    Counts this gateway's own requests, which rise at the moment of selection
    (a burst arriving together spreads across pods instead of piling onto the
    one that looked idle), plus what the other gateway replicas last reported.
    """

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        return least_load_scores(pods)


@strategy("power-of-two")
class PowerOfTwoStrategy(_Drawing):
    """Two candidates drawn at random, the one with fewer requests in flight wins.

    Near least-request's balance without every gateway replica converging on the
    same pod between two in-flight reports.
    """

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        if len(pods) <= 2:
            return least_load_scores(pods)
        scores = [float("-inf")] * len(pods)
        for i in self.rng.sample(range(len(pods)), 2):
            scores[i] = -float(pods[i].load)
        return scores


@strategy("least-queue")
class LeastQueueStrategy(MetricsStrategy):
    """Fewest requests waiting in the engine's queue (the Inference Extension's queue scorer)."""

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        return -float(metrics.waiting + pod.routed_since_record)


@strategy("least-kv-cache", aliases=("least-gpu-cache",))  # the older vLLM metric's name
class LeastKvCacheStrategy(MetricsStrategy):
    """Lowest KV-cache usage, plus the prompt tokens routed to the pod since its record."""

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        capacity = metrics.num_blocks * metrics.block_size
        pending = pod.tokens_since_record / capacity if capacity else 0.0
        return -(metrics.kv_usage + pending)


@strategy("throughput")
class ThroughputStrategy(MetricsStrategy):
    """Least token throughput (prompt + generated tokens per second over the record's window).

    Tokens routed since the record count as one more second's worth.
    """

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        return -(metrics.prompt_tps + metrics.generation_tps + pod.tokens_since_record)


@strategy("least-latency")
class LeastLatencyStrategy(MetricsStrategy):
    """Shortest estimated time to serve this request, from the pod's measured means:

    queue  = (waiting + routed since the record) x the pod's mean prefill time (ttft - queue time)
    prefill = this prompt's tokens x the pod's prefill seconds per prompt token
    decode = this request's max_tokens (or 128) x the pod's mean time per output token
    """

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        prefill_time = max(0.0, metrics.ttft_mean - metrics.queue_mean)
        per_token = prefill_time / metrics.prompt_tokens_mean if metrics.prompt_tokens_mean else 0.0
        queue = (metrics.waiting + pod.routed_since_record) * prefill_time
        output = request.max_tokens if request.max_tokens is not None else DEFAULT_OUTPUT_TOKENS
        return -(queue + request.prompt_tokens * per_token + output * metrics.tpot_mean)
