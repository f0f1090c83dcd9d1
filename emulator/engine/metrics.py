"""The engine's cumulative numbers and histograms, with vLLM's metric semantics and bucket boundaries,
so ``/metrics`` can be rendered from them."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    """Prometheus-style histogram: ``counts[i]`` holds observations <= ``bounds[i]`` and above the previous
    bound; the last entry is the +Inf bucket."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, weight: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += weight
        self.sum += value * weight
        self.count += weight

    def observe_series(self, first: float, step: float, n: int, weight: int = 1) -> None:
        """Observe ``first + i * step`` for i in 0..n-1, each ``weight`` times, in O(buckets).

        How a collapsed run of decode steps records its inter-token latencies.
        """
        if n <= 0:
            return
        below = 0  # how many of the n values are <= the current bound
        for index, bound in enumerate(self.bounds):
            if step > 0:
                at_most = min(n, max(0, math.floor((bound - first) / step) + 1))
            else:
                at_most = n if first <= bound else 0
            self.counts[index] += (at_most - below) * weight
            below = at_most
        self.counts[-1] += (n - below) * weight
        self.sum += (n * first + step * n * (n - 1) / 2) * weight
        self.count += n * weight

    def cumulative(self) -> list[int]:
        """Counts per ``le`` bound (the last one is +Inf), as Prometheus exposes them."""
        total, out = 0, []
        for value in self.counts:
            total += value
            out.append(total)
        return out


@dataclass(slots=True)
class EngineMetrics:
    """Cumulative counters and latency histograms (vLLM's names without the ``vllm:`` prefix)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    #: Finished requests by vLLM ``finished_reason`` ("length", "abort").
    requests_finished: dict[str, int] = field(default_factory=dict)
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e_request_latency: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    request_queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    request_prefill_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    request_decode_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    request_inference_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))

    def histograms(self) -> dict[str, Histogram]:
        """Histograms by vLLM metric name (``vllm:<name>_seconds``)."""
        return {
            "time_to_first_token": self.time_to_first_token,
            "inter_token_latency": self.inter_token_latency,
            "e2e_request_latency": self.e2e_request_latency,
            "request_queue_time": self.request_queue_time,
            "request_prefill_time": self.request_prefill_time,
            "request_decode_time": self.request_decode_time,
            "request_inference_time": self.request_inference_time,
        }


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of everything vLLM's ``/metrics`` shows about one engine."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    requests_finished: dict[str, int]
    running_lora_adapters: list[str]
    waiting_lora_adapters: list[str]
    max_loras: int
    block_size: int
    num_blocks: int
    histograms: dict[str, Histogram]
