"""Per-request results of a run (simulated or live) and the summary every benchmark reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class RequestOutcome:
    arrival: float  # seconds from the start of the run
    ttft: float  # arrival -> first output token, seconds
    e2e: float  # arrival -> last output token, seconds
    output_tokens: int
    prompt_tokens: int
    pod: str
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (simulation only)
    ok: bool = True

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (vLLM's TPOT)."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(
    results: Sequence[RequestOutcome], *, duration: float, prefix_hits: int = 0, prefix_queries: int = 0
) -> dict[str, float]:
    """TTFT/TPOT percentiles (ms), throughput and prefix-cache hit rate of a run.

    ``duration`` is the span over which throughput is computed (arrivals plus
    drain). Failed requests count in ``errors``, not in the latencies.
    """
    done = [r for r in results if r.ok]
    ttft = [r.ttft for r in done]
    tpot = [r.tpot for r in done if r.output_tokens > 1]
    return {
        "requests": len(results),
        "errors": len(results) - len(done),
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "tpot_p50_ms": percentile(tpot, 50) * 1000,
        "tpot_p99_ms": percentile(tpot, 99) * 1000,
        "ttft_mean_ms": sum(ttft) / len(ttft) * 1000 if ttft else math.nan,
        "e2e_p50_ms": percentile([r.e2e for r in done], 50) * 1000,
        "throughput_rps": len(done) / duration if duration else math.nan,
        "output_tps": sum(r.output_tokens for r in done) / duration if duration else math.nan,
        "prefix_hit_rate": prefix_hits / prefix_queries if prefix_queries else 0.0,
    }
