"""``vtc-basic`` and ``session-affinity`` in the fleet simulator, against ``least-request``."""

from __future__ import annotations

import heapq

from emulator.results import percentile
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadRequest, WorkloadSpec, generate


def heavy_and_light(heavy_rate: float, light_rate: float, duration: float = 10.0) -> list[WorkloadRequest]:
    """One tenant sending ``heavy_rate`` requests/s, and forty others sharing ``light_rate``."""

    def stream(rate: float, seed: int) -> list[WorkloadRequest]:
        spec = WorkloadSpec(
            rate=rate, duration=duration, seed=seed, users=40, prompt_tokens=512, output_tokens=128
        )
        return list(generate("no-sharing", spec))

    heavy = stream(heavy_rate, 1)
    for request in heavy:
        request.user = "heavy"
    return list(heapq.merge(heavy, stream(light_rate, 2), key=lambda r: r.arrival))


def ttft_p99(requests: list[WorkloadRequest], strategy: str) -> tuple[float, float]:
    """TTFT p99 of the light users' requests and of the heavy tenant's, in seconds."""
    heavy_arrivals = {r.arrival for r in requests if r.user == "heavy"}
    result = FleetSimulator(FleetSpec(engines=4, strategy=strategy)).run(requests)
    assert len(result.outcomes) == len(requests)
    light = [o.ttft for o in result.outcomes if o.arrival not in heavy_arrivals]
    heavy = [o.ttft for o in result.outcomes if o.arrival in heavy_arrivals]
    return percentile(light, 99), percentile(heavy, 99)


def test_vtc_keeps_light_users_fast_while_a_heavy_tenant_overloads_the_fleet() -> None:
    requests = heavy_and_light(heavy_rate=400.0, light_rate=8.0)  # four engines take about 300/s
    light_lr, heavy_lr = ttft_p99(requests, "least-request")
    light_vtc, heavy_vtc = ttft_p99(requests, "vtc-basic")
    assert light_lr > 1.0  # the overload reaches everyone under least-request
    assert light_vtc * 5 < light_lr
    assert heavy_vtc > heavy_lr  # the tenant above its share carries its own overload


def test_vtc_costs_the_heavy_tenant_nothing_while_there_is_spare_capacity() -> None:
    requests = heavy_and_light(heavy_rate=100.0, light_rate=8.0)
    light_lr, heavy_lr = ttft_p99(requests, "least-request")
    light_vtc, heavy_vtc = ttft_p99(requests, "vtc-basic")
    assert heavy_vtc < 2 * heavy_lr  # spill-over onto pods without a queue: work-conserving
    assert light_vtc < 2 * light_lr


def test_session_affinity_reuses_the_conversation_cache_on_multi_turn() -> None:
    spec = WorkloadSpec(rate=20.0, duration=60.0, seed=3, prompt_tokens=512, output_tokens=64)
    requests = list(generate("multi-turn", spec))
    rates = {
        strategy: FleetSimulator(FleetSpec(engines=4, strategy=strategy))
        .run(requests)
        .summary()["prefix_hit_rate"]
        for strategy in ("least-request", "session-affinity")
    }
    assert rates["session-affinity"] > rates["least-request"] + 0.15, rates
