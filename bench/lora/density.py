"""Building blocks of the adapter-density benchmark: workloads, one simulated trial, the SLO, the search.

Two ways to serve ``adapters`` LoRA adapters of one base model (docs/benchmarks/lora.md):

* **dense**: one fleet of base-model engines, each with ``max_loras`` adapter slots that the engine model
  fills on demand (LRU; each load costs the profile's ``lora_load_s``; a request whose adapter would exceed
  the slots waits), routed with the gateway's ``lora-affinity``;
* **dedicated**: one deployment per adapter, at least one replica each (no scale to zero); its engines serve
  only that adapter (one slot, loaded once) and are routed with ``least-request``.

Each is sized to the fewest engines whose simulated run meets the SLO. The simulator is used through its
public API only (``FleetSimulator``, ``FleetSpec``, ``FleetResult.summary``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadRequest, WorkloadSpec, generate


@dataclass(frozen=True)
class Slo:
    """Percentiles over every request of a run. A percentile with no observation (no request, or none with
    more than one output token for TPOT) has nothing to violate."""

    ttft_p99_ms: float = 1000.0
    tpot_p99_ms: float = 100.0

    def met(self, summary: dict[str, float]) -> bool:
        ttft, tpot = summary["ttft_p99_ms"], summary["tpot_p99_ms"]
        return (
            summary["rejected"] == 0
            and (math.isnan(ttft) or ttft <= self.ttft_p99_ms)
            and (math.isnan(tpot) or tpot <= self.tpot_p99_ms)
        )


@dataclass(frozen=True)
class Setup:
    profile: str = "llama-3.1-8b_h100"
    model: str = "llama-3.1-8b-instruct"
    adapters: int = 50
    zipf_s: float = 1.1
    prompt_tokens: int = 512
    output_tokens: int = 200
    #: Adapter slots of each dense engine (vLLM's ``--max-loras``); dedicated engines have one.
    max_loras: int = 8
    seed: int = 1
    slo: Slo = field(default_factory=Slo)
    #: Dedicated sizing reuses one result per rate bucket: rates rounded (in log scale) to the nearest point
    #: of a geometric grid with this ratio.
    bucket_ratio: float = 1.1

    def workload(self, rate: float, duration: float, *, adapters: int | None = None) -> list[WorkloadRequest]:
        """``lora-mix`` at ``rate`` over ``adapters`` adapters (one: the sub-workload of a single adapter,
        which is again Poisson with the same prompt and output lengths)."""
        spec = WorkloadSpec(
            rate=rate,
            duration=duration,
            model=self.model,
            seed=self.seed,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens,
            adapters=adapters or self.adapters,
            zipf_s=self.zipf_s,
        )
        return list(generate("lora-mix", spec))


def adapter_rates(total: float, adapters: int, zipf_s: float) -> list[float]:
    """Each adapter's share of ``total`` req/s, most popular first (the weights ``lora-mix`` draws with)."""
    weights = [1 / rank**zipf_s for rank in range(1, adapters + 1)]
    norm = sum(weights)
    return [total * w / norm for w in weights]


def rate_bucket(rate: float, ratio: float) -> int:
    """The grid point nearest ``rate`` in log scale, as an exponent: its rate is ``ratio**bucket``."""
    return round(math.log(rate) / math.log(ratio))


@dataclass
class Trial:
    engines: int
    met: bool
    summary: dict[str, float]
    adapter_loads: int

    def to_json(self) -> dict[str, Any]:
        s = self.summary
        keys = ("requests", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "throughput_rps")
        return {
            "engines": self.engines,
            "met": self.met,
            **{k: _finite(s[k]) for k in keys},
            "preemptions": s["preemptions"],
            "adapter_loads": self.adapter_loads,
            "wall_seconds": round(s["wall_seconds"], 2),
        }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


def run_trial(setup: Setup, requests: list[WorkloadRequest], engines: int, *, dense: bool) -> Trial:
    """One simulated run: a dense fleet (``lora-affinity``, ``max_loras`` slots) or one adapter's deployment
    (``least-request``, one slot)."""
    spec = FleetSpec(
        engines=engines,
        profile=setup.profile,
        model=setup.model,
        strategy="lora-affinity" if dense else "least-request",
        max_loras=setup.max_loras if dense else 1,
        seed=setup.seed,
    )
    sim = FleetSimulator(spec)
    loads = _count_adapter_loads(sim)
    summary = sim.run(requests).summary()
    return Trial(engines, setup.slo.met(summary), summary, loads())


def _count_adapter_loads(sim: FleetSimulator) -> Callable[[], int]:
    """Count adapter loads into GPU slots (the engine's stats have no such counter): wrap each engine's
    ``LoraSlots.activate``, which returns the number of adapters a step loaded."""
    count = [0]
    for engine in sim.engines:
        slots = engine.core.lora_slots
        activate = slots.activate

        def counted(adapters: Any, activate: Callable[[Any], int] = activate) -> int:
            loaded = activate(adapters)
            count[0] += loaded
            return loaded

        slots.activate = counted  # type: ignore[method-assign]
    return lambda: count[0]


@dataclass
class Sizing:
    """The fewest engines meeting the SLO, and every trial the search ran (``trials[engines - 1]``, when
    ``engines > 1``, is a trial that missed: the witness that one fewer is not enough)."""

    engines: int
    trials: dict[int, Trial]

    @property
    def at(self) -> Trial:
        return self.trials[self.engines]

    @property
    def one_fewer(self) -> Trial | None:
        return self.trials.get(self.engines - 1)


def minimal_count(evaluate: Callable[[int], Trial], start: int = 1, *, limit: int = 4096) -> Sizing:
    """The fewest engines ``n >= 1`` whose trial meets the SLO, assuming more engines never hurt.

    Gallops from ``start`` (down by 1, 2, 4... while it meets; up likewise while it misses), then bisects
    between the largest count seen missing and the smallest seen meeting. On return ``n`` met and, if
    ``n > 1``, ``n - 1`` was evaluated and missed.
    """
    trials: dict[int, Trial] = {}

    def met(n: int) -> bool:
        if n not in trials:
            trials[n] = evaluate(n)
        return trials[n].met

    start = max(1, start)
    step = 1
    if met(start):
        lo, hi = 0, start  # zero engines serve nothing
        while hi > 1:
            candidate = max(1, hi - step)
            if not met(candidate):
                lo = candidate
                break
            hi, step = candidate, step * 2
    else:
        lo = start
        while True:
            candidate = lo + step
            if candidate > limit:
                raise RuntimeError(f"no fleet of up to {limit} engines meets the SLO")
            if met(candidate):
                hi = candidate
                break
            lo, step = candidate, step * 2
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if met(middle):
            hi = middle
        else:
            lo = middle
    return Sizing(hi, trials)


class DedicatedSizer:
    """Sizes one adapter's deployment for its own traffic, one simulated search per rate bucket (cached).

    The adapter's sub-workload is simulated at its bucket's rate (``Setup.workload`` with one adapter) for
    ``duration`` seconds; the search starts at the count of the nearest smaller bucket already sized.
    """

    def __init__(self, setup: Setup, duration: float) -> None:
        self.setup = setup
        self.duration = duration
        self.buckets: dict[int, Sizing] = {}

    def bucket_rate(self, bucket: int) -> float:
        return self.setup.bucket_ratio**bucket

    def size(self, rate: float) -> tuple[int, Sizing]:
        bucket = rate_bucket(rate, self.setup.bucket_ratio)
        if bucket not in self.buckets:
            requests = self.setup.workload(self.bucket_rate(bucket), self.duration, adapters=1)
            hint = max((s.engines for b, s in self.buckets.items() if b < bucket), default=1)
            self.buckets[bucket] = minimal_count(
                lambda n: run_trial(self.setup, requests, n, dense=False), hint
            )
        return bucket, self.buckets[bucket]

    def fleet_hint(self, total: float) -> int:
        """A first guess of the engines serving ``total`` req/s, to start the dense search near its answer:
        ``total`` over the lowest per-engine rate at which a deployment missed the SLO (one engine fewer
        than its minimum), else over the highest per-engine rate that met it."""
        missed = [self.bucket_rate(b) / (s.engines - 1) for b, s in self.buckets.items() if s.engines > 1]
        met = [self.bucket_rate(b) / s.engines for b, s in self.buckets.items()]
        return max(1, math.ceil(total / min(missed, default=max(met))))


def size_dedicated(setup: Setup, total: float, sizer: DedicatedSizer) -> list[dict[str, Any]]:
    """Each adapter's deployment (most popular first): its rate, its bucket's rate and its engine count."""
    rates = adapter_rates(total, setup.adapters, setup.zipf_s)
    rows: list[dict[str, Any]] = [{} for _ in rates]
    for rank in sorted(range(len(rates)), key=rates.__getitem__):  # least popular first: hints grow
        bucket, sizing = sizer.size(rates[rank])
        rows[rank] = {
            "adapter": rank,
            "rate": rates[rank],
            "bucket_rate": sizer.bucket_rate(bucket),
            "engines": sizing.engines,
        }
    return rows


def size_dense(setup: Setup, requests: list[WorkloadRequest], start: int) -> Sizing:
    return minimal_count(lambda n: run_trial(setup, requests, n, dense=True), start)
