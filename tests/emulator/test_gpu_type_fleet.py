"""Heterogeneous fleets in the simulator, ``gpu-type`` profiles from engine profiles, and what it buys."""

from __future__ import annotations

import dataclasses
import heapq

import pytest

from emulator.gpu_types import CONTEXT_TOKENS, HEADROOM, gpu_profile, gpu_profiles
from emulator.profile import load_profile
from emulator.results import RequestOutcome
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadRequest, WorkloadSpec, generate
from gateway_plugins.config import GpuTypeSettings, RoutingSettings

L4, H100 = "llama-3.1-8b_l4", "llama-3.1-8b_h100"
FLEET = {L4: 4, H100: 2}
TTFT_SLO, TPOT_SLO = 1.0, 0.1


def mixed(
    short_rate: float, long_rate: float, duration: float = 60.0, seed: int = 1
) -> list[WorkloadRequest]:
    """Chat-sized prompts (~300 tokens) mixed with document-sized ones (~8,000), ~100 output tokens each."""

    def stream(rate: float, tokens: int, seed: int) -> list[WorkloadRequest]:
        spec = WorkloadSpec(rate=rate, duration=duration, seed=seed, prompt_tokens=tokens, output_tokens=100)
        # The log-normal tail is cut where it would not fit the L4's 16k-token context.
        return [
            dataclasses.replace(r, prompt_ids=r.prompt_ids[:12_000]) for r in generate("no-sharing", spec)
        ]

    short, long = stream(short_rate, 300, seed), stream(long_rate, 8_000, seed + 100)
    return list(heapq.merge(short, long, key=lambda r: r.arrival))


def routing() -> RoutingSettings:
    profiles = gpu_profiles(FLEET, tpot_slo_seconds=TPOT_SLO)
    return RoutingSettings(
        gpu_type=GpuTypeSettings(profiles=profiles, ttft_slo_seconds=TTFT_SLO, tpot_slo_seconds=TPOT_SLO)
    )


def attainment(outcomes: list[RequestOutcome]) -> float:
    return sum(o.ttft <= TTFT_SLO and o.tpot <= TPOT_SLO for o in outcomes) / len(outcomes)


def test_gpu_profiles_follow_the_engine_profiles() -> None:
    l4, h100 = load_profile(L4), load_profile(H100)
    slow, fast = (gpu_profile(p, tpot_slo_seconds=TPOT_SLO) for p in (l4, h100))
    assert (slow.cost, fast.cost) == (l4.cost_per_hour, h100.cost_per_hour)
    assert fast.prefill_tokens_per_second > 5 * slow.prefill_tokens_per_second
    assert fast.seconds_per_output_token < slow.seconds_per_output_token <= HEADROOM * TPOT_SLO
    assert fast.max_inflight > 5 * slow.max_inflight
    # The L4's batch stops where one more sequence would exceed the budget (or its KV cache).
    one_more = slow.max_inflight + 1
    assert (
        l4.step_time(one_more, one_more * CONTEXT_TOKENS) > HEADROOM * TPOT_SLO
        or one_more * CONTEXT_TOKENS > l4.kv_cache_tokens
    )
    # An objective the L4 cannot decode within even alone: one sequence, and a TPOT above the objective.
    strict = gpu_profile(l4, tpot_slo_seconds=0.05)
    assert strict.max_inflight == 1 and strict.seconds_per_output_token > 0.05


def test_profiles_of_one_gpu_type_must_not_disagree() -> None:
    with pytest.raises(ValueError, match="H100"):
        gpu_profiles([H100, "llama-3.1-70b_h100-tp4"], tpot_slo_seconds=TPOT_SLO)


def test_a_mixed_fleet_labels_and_reports_each_engines_gpu() -> None:
    spec = FleetSpec(fleet={L4: 2, H100: 1}, engines=99, strategy="least-request")
    sim = FleetSimulator(spec)
    result = sim.run(mixed(4.0, 0.5, duration=5.0))
    pods = sim.router.registry.ready_pods(spec.model)
    gpus = [load_profile(name).gpu for name in (L4, L4, H100)]
    label = spec.routing.gpu_type.label
    assert [pod.labels[label] for pod in pods] == gpus
    assert [pod.metrics.gpu_type for pod in pods if pod.metrics is not None] == gpus
    assert len(result.engine_stats) == 3 and result.rejected == 0


def test_gpu_type_meets_the_slo_more_often_than_least_request_on_a_mixed_fleet() -> None:
    """4 x L4 + 2 x H100; 30 chat requests and 4 document requests per second.

    least-request spreads documents onto L4s (8,000 tokens at ~4,300 tokens/s: TTFT ~2 s) whose long
    prefills also stall the L4s' decodes; gpu-type keeps documents on the H100s and chat on the L4s up to
    their TPOT-derived capacity, then spills over.
    """
    requests = mixed(30.0, 4.0)
    runs = {
        strategy: FleetSimulator(FleetSpec(fleet=FLEET, strategy=strategy, routing=routing(), seed=1)).run(
            requests
        )
        for strategy in ("least-request", "gpu-type")
    }
    l4_pods = {f"engine-{i}" for i in range(FLEET[L4])}
    limit = TTFT_SLO * gpu_profile(load_profile(L4), tpot_slo_seconds=TPOT_SLO).prefill_tokens_per_second

    def share_on_l4(outcomes: list[RequestOutcome], long: bool) -> float:
        picked = [o for o in outcomes if (o.prompt_tokens > limit) == long]
        return sum(o.pod in l4_pods for o in picked) / len(picked)

    least, typed = runs["least-request"].outcomes, runs["gpu-type"].outcomes
    assert attainment(typed) > attainment(least) + 0.05
    assert attainment(typed) > 0.9
    assert share_on_l4(typed, long=True) == 0.0 < share_on_l4(least, long=True)
    assert share_on_l4(typed, long=False) > 1.5 * share_on_l4(least, long=False)  # the cheap type does more
