"""The pod-metrics record: what an engine pod's sidecar publishes and routers read.

An engine exposes cumulative counters and instantaneous gauges (``EngineSample``);
routers want rates and recent means. ``MetricsWindow`` turns successive samples
into one ``PodMetrics`` record over a short trailing window. The runtime sidecar
feeds it samples parsed from the engine's ``/metrics``; the fleet simulator
feeds it samples read from its engine models: both produce records the same
way, so strategies see the same numbers in production and in simulation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class EngineSample:
    """One scrape of an engine: gauges now, counters since it started."""

    timestamp: float  # seconds (wall clock in production, virtual in the simulator)
    waiting: int
    running: int
    kv_usage: float
    prefix_queries: float = 0.0  # tokens looked up in the prefix cache
    prefix_hits: float = 0.0  # tokens found
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    ttft_sum: float = 0.0  # histogram sums and counts, seconds
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    queue_sum: float = 0.0
    queue_count: float = 0.0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    block_size: int = 0
    num_blocks: int = 0


@dataclass(slots=True, frozen=True)
class PodMetrics:
    """What routers read about a pod. Rates and means cover the trailing window."""

    timestamp: float  # when the engine was scraped, so readers can tell fresh from stale
    healthy: bool = True  # False: the engine stopped answering its /metrics
    waiting: int = 0  # requests queued in the engine
    running: int = 0  # requests in the running batch
    kv_usage: float = 0.0  # KV cache blocks in use, 0..1
    prefix_hit_rate: float = 0.0  # prefix-cache hits / queries (tokens)
    prompt_tps: float = 0.0  # prompt tokens per second
    generation_tps: float = 0.0  # output tokens per second
    ttft_mean: float = 0.0  # seconds
    tpot_mean: float = 0.0  # seconds per output token (inter-token latency)
    queue_mean: float = 0.0  # seconds waiting before scheduling
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    block_size: int = 0
    num_blocks: int = 0
    gpu_type: str = ""
    engine_type: str = "vllm"


class MetricsWindow:
    """Rates and means over the last ``window`` seconds of samples from one engine."""

    def __init__(self, window: float = 2.0, *, gpu_type: str = "", engine_type: str = "vllm") -> None:
        self.window = window
        self.gpu_type = gpu_type
        self.engine_type = engine_type
        self._samples: deque[EngineSample] = deque()

    def update(self, sample: EngineSample) -> PodMetrics:
        samples = self._samples
        if samples and sample.prompt_tokens < samples[-1].prompt_tokens:
            samples.clear()  # the engine restarted: counters began again from zero
        samples.append(sample)
        while len(samples) > 2 and sample.timestamp - samples[1].timestamp >= self.window:
            samples.popleft()
        first = samples[0]
        elapsed = sample.timestamp - first.timestamp

        def rate(name: str) -> float:
            return (getattr(sample, name) - getattr(first, name)) / elapsed if elapsed > 0 else 0.0

        def mean(total: str, count: str) -> float:
            n = getattr(sample, count) - getattr(first, count)
            return (getattr(sample, total) - getattr(first, total)) / n if n > 0 else 0.0

        queries = sample.prefix_queries - first.prefix_queries
        return PodMetrics(
            timestamp=sample.timestamp,
            waiting=sample.waiting,
            running=sample.running,
            kv_usage=sample.kv_usage,
            prefix_hit_rate=(sample.prefix_hits - first.prefix_hits) / queries if queries > 0 else 0.0,
            prompt_tps=rate("prompt_tokens"),
            generation_tps=rate("generation_tokens"),
            ttft_mean=mean("ttft_sum", "ttft_count"),
            tpot_mean=mean("itl_sum", "itl_count"),
            queue_mean=mean("queue_sum", "queue_count"),
            running_adapters=sample.running_adapters,
            waiting_adapters=sample.waiting_adapters,
            max_loras=sample.max_loras,
            block_size=sample.block_size,
            num_blocks=sample.num_blocks,
            gpu_type=self.gpu_type,
            engine_type=self.engine_type,
        )
