"""vLLM's ``/metrics`` in Prometheus text format, rendered from an ``EngineStats`` snapshot.

Names, label keys and types follow vLLM V1 (0.32): every series carries
``engine`` and ``model_name``; ``cache_config_info`` and ``lora_requests_info``
are info-style gauges, the latter valued with a timestamp, with the LoRA
state in comma-separated labels. Routers and the runtime sidecar parse exactly
this. One difference is left: vLLM keeps a ``lora_requests_info`` series for
every combination of adapters it has logged (each valued with the time it was
last current, so the newest is the state now), the emulator shows only the
current one; readers that take the newest sample see the same.
"""

from __future__ import annotations

import time

from emulator.engine import EngineStats

_GAUGES = (
    ("num_requests_running", "Number of requests in model execution batches.", "num_running"),
    ("num_requests_waiting", "Number of requests waiting to be processed.", "num_waiting"),
    ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
)
_COUNTERS = (
    (
        "prefix_cache_queries",
        "Prefix cache queries, in terms of number of queried tokens.",
        "prefix_cache_queries",
    ),
    ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", "prefix_cache_hits"),
    ("prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens"),
    ("generation_tokens", "Number of generation tokens processed.", "generation_tokens"),
    ("num_preemptions", "Cumulative number of preemption from the engine.", "num_preemptions"),
)
_HISTOGRAMS = {
    "time_to_first_token": "Histogram of time to first token in seconds.",
    "inter_token_latency": "Histogram of inter-token latency in seconds.",
    "e2e_request_latency": "Histogram of e2e request latency in seconds.",
    "request_queue_time": "Histogram of time spent in WAITING phase for request.",
    "request_prefill_time": "Histogram of time spent in PREFILL phase for request.",
    "request_decode_time": "Histogram of time spent in DECODE phase for request.",
    "request_inference_time": "Histogram of time spent in RUNNING phase for request.",
}


def render(stats: EngineStats, model: str, *, lora_enabled: bool, prefix_caching: bool = True) -> str:
    base = f'engine="0",model_name="{model}"'
    lines: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP vllm:{name} {help_}")
        lines.append(f"# TYPE vllm:{name} {kind}")

    for name, help_, attr in _GAUGES:
        family(name, "gauge", help_)
        lines.append(f"vllm:{name}{{{base}}} {float(getattr(stats, attr))}")
    for name, help_, attr in _COUNTERS:
        family(f"{name}_total", "counter", help_)
        lines.append(f"vllm:{name}_total{{{base}}} {float(getattr(stats, attr))}")
    family("request_success_total", "counter", "Count of successfully processed requests.")
    for reason in ("stop", "length", "abort"):
        count = float(stats.requests_finished.get(reason, 0))
        lines.append(f'vllm:request_success_total{{{base},finished_reason="{reason}"}} {count}')
    for name, help_ in _HISTOGRAMS.items():
        histogram = stats.histograms[name]
        family(f"{name}_seconds", "histogram", help_)
        for bound, cumulative in zip((*histogram.bounds, "+Inf"), histogram.cumulative(), strict=True):
            le = bound if isinstance(bound, str) else float(bound)
            lines.append(f'vllm:{name}_seconds_bucket{{{base},le="{le}"}} {float(cumulative)}')
        lines.append(f"vllm:{name}_seconds_count{{{base}}} {float(histogram.count)}")
        lines.append(f"vllm:{name}_seconds_sum{{{base}}} {float(histogram.sum)}")
    family("cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
    lines.append(
        f'vllm:cache_config_info{{block_size="{stats.block_size}",cache_dtype="auto",'
        f'enable_prefix_caching="{prefix_caching}",engine="0",gpu_memory_utilization="0.9",'
        f'kv_cache_size_tokens="{stats.block_size * stats.num_blocks}",'
        f'num_gpu_blocks="{stats.num_blocks}"}} 1.0'
    )
    if lora_enabled:
        family("lora_requests_info", "gauge", "Running stats on lora requests.")
        lines.append(
            f'vllm:lora_requests_info{{max_lora="{stats.max_loras}",'
            f'running_lora_adapters="{",".join(stats.running_lora_adapters)}",'
            f'waiting_lora_adapters="{",".join(stats.waiting_lora_adapters)}"}} {time.time()}'
        )
    return "\n".join(lines) + "\n"
