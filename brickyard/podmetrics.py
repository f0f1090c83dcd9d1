"""The pod-metrics record: what an engine pod's sidecar publishes and routers read.

One record per pod, refreshed every scrape. The runtime sidecar fills it from
the engine's ``/metrics``; the fleet simulator fills it from its engine models;
routing strategies read it from ``PodState.metrics``. Rates and means cover a
short trailing window; ``timestamp`` is when the engine was scraped, so a
reader can tell fresh from stale.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class PodMetrics:
    timestamp: float  # seconds (time.time() in production, virtual time in the simulator)
    healthy: bool = True  # False: the engine stopped answering its /metrics
    waiting: int = 0  # requests queued in the engine
    running: int = 0  # requests in the running batch
    kv_usage: float = 0.0  # KV cache blocks in use, 0..1
    prefix_hit_rate: float = 0.0  # prefix-cache hits / queries (tokens) over the window
    prompt_tps: float = 0.0  # prompt tokens processed per second over the window
    generation_tps: float = 0.0  # output tokens per second over the window
    ttft_mean: float = 0.0  # seconds, requests that got their first token in the window
    tpot_mean: float = 0.0  # seconds per output token (inter-token latency), over the window
    queue_mean: float = 0.0  # seconds spent waiting before scheduling, over the window
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    block_size: int = 0
    num_blocks: int = 0
    gpu_type: str = ""
    engine_type: str = "vllm"
