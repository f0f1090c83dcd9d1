"""How much one engine serves: the load that "80% of capacity" in a benchmark is a fraction of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emulator.results import percentile
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, generate


def saturation_throughput(
    workload: str,
    profile: str,
    *,
    seed: int = 0,
    duration: float = 60.0,
    options: Mapping[str, Any] | None = None,
) -> float:
    """The highest arrival rate (requests/s) one engine keeps up with for ``workload``.

    A rate is sustainable when requests arriving late in a run wait no longer than early ones (the queue
    does not grow) and nothing is preempted; binary search between a sustainable and an unsustainable rate.
    """

    def sustainable(rate: float) -> bool:
        trace = list(
            generate(workload, WorkloadSpec(rate=rate, duration=duration, seed=seed, **(options or {})))
        )
        result = FleetSimulator(FleetSpec(engines=1, profile=profile, metrics_interval=0)).run(trace)
        outcomes = sorted(result.outcomes, key=lambda o: o.arrival)
        third = max(1, len(outcomes) // 3)
        early = percentile([o.ttft for o in outcomes[:third]], 50)
        late = percentile([o.ttft for o in outcomes[-third:]], 50)
        return late <= 2 * early + 0.25 and result.summary()["preemptions"] == 0

    low, high = 0.0, 8.0
    while sustainable(high):
        low, high = high, high * 2
    for _ in range(6):
        middle = (low + high) / 2
        if sustainable(middle):
            low = middle
        else:
            high = middle
    return low
