"""``gpu-type``: the cheapest GPU type that meets the SLOs and has room, spill-over, unknown types last."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from brickyard_core.podmetrics import PodMetrics
from brickyard_core.typed_config import load
from gateway_plugins.config import GatewaySettings, GpuProfile, GpuTypeSettings, RoutingSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import FallbackScores, build_strategies
from gateway_plugins.routing.strategies.gpu_type import GpuTypeStrategy, preference
from gateway_plugins.routing.types import PodState, RoutingRequest

LABEL = GpuTypeSettings().label
#: TTFT objective 1 s: "cheap" prefills prompts up to 1,000 tokens in time, "fast" up to 10,000.
CHEAP = GpuProfile(cost=1.0, prefill_tokens_per_second=1_000, seconds_per_output_token=0.03, max_inflight=4)
FAST = GpuProfile(cost=4.0, prefill_tokens_per_second=10_000, seconds_per_output_token=0.01, max_inflight=8)
#: The cheapest of all, but decodes slower than the 50 ms TPOT objective: it never meets a request.
SLOW = GpuProfile(cost=0.5, prefill_tokens_per_second=5_000, seconds_per_output_token=0.1, max_inflight=16)


def settings(**profiles: GpuProfile) -> GpuTypeSettings:
    return GpuTypeSettings(
        profiles=profiles or {"cheap": CHEAP, "fast": FAST},
        ttft_slo_seconds=1.0,
        tpot_slo_seconds=0.05,
        max_waiting=2,
    )


def pod(
    name: str, gpu: str | None, *, load: int = 0, record: str | None = None, waiting: int = 0
) -> PodState:
    """A pod labelled with ``gpu`` (no label when None); with a record reporting ``record`` as its type."""
    state = PodState(name, f"10.0.0.{len(name)}:8000", "m", labels={LABEL: gpu} if gpu else {}, inflight=load)
    if record is not None:
        state.apply_metrics(PodMetrics(timestamp=1.0, waiting=waiting, gpu_type=record))
    return state


def prompt(tokens: int) -> RoutingRequest:
    return RoutingRequest("m", prompt_token_ids=range(tokens))  # type: ignore[arg-type]


def order(strategy: GpuTypeStrategy, pods: list[PodState], tokens: int) -> list[str]:
    return [pods[i].name for i in rank(strategy.score(prompt(tokens), pods), random.Random(0), len(pods))]


def fell_back(strategy: GpuTypeStrategy, pods: list[PodState], tokens: int) -> bool:
    """Whether the strategy's fallback rule scored this request (the router counts it once committed)."""
    return isinstance(strategy.score(prompt(tokens), pods), FallbackScores)


def test_the_cheapest_type_meeting_the_slo_wins_over_a_less_loaded_faster_one() -> None:
    pods = [pod("fast", "fast"), pod("cheap-busy", "cheap", load=3), pod("cheap", "cheap", load=1)]
    assert order(GpuTypeStrategy(settings()), pods, 500) == ["cheap", "cheap-busy", "fast"]


def test_a_prompt_the_cheap_type_cannot_prefill_in_time_goes_to_the_faster_type() -> None:
    pods = [pod("cheap", "cheap"), pod("fast", "fast", load=5)]
    strategy = GpuTypeStrategy(settings())
    assert order(strategy, pods, 1_000)[0] == "cheap"  # exactly 1 s on the cheap type: meets
    assert order(strategy, pods, 1_001)[0] == "fast"
    assert order(strategy, pods, 50_000) == ["fast", "cheap"]  # nothing meets: fastest first
    assert not fell_back(strategy, pods, 50_000)


def test_a_type_missing_the_tpot_objective_is_only_spill_over_however_cheap() -> None:
    strategy = GpuTypeStrategy(settings(cheap=CHEAP, fast=FAST, slow=SLOW))
    pods = [pod("slow", "slow"), pod("fast", "fast"), pod("cheap", "cheap")]
    assert order(strategy, pods, 500) == ["cheap", "fast", "slow"]
    assert order(strategy, pods, 5_000) == ["fast", "slow", "cheap"]  # others: highest prefill speed first


def test_requests_spill_over_when_the_cheap_type_is_saturated() -> None:
    registry = PodRegistry()
    registry.replace_all([PodInfo("cheap", "10.0.0.1:8000", "m", labels={LABEL: "cheap"})])
    registry.upsert(PodInfo("fast", "10.0.0.2:8000", "m", labels={LABEL: "fast"}))
    routing = RoutingSettings(gpu_type=settings())
    router = Router(registry, build_strategies(routing), default_strategy="gpu-type")
    decisions = [router.route(prompt(100)) for _ in range(6)]
    assert [d.pod.name for d in decisions] == ["cheap"] * CHEAP.max_inflight + ["fast", "fast"]
    router.release(decisions[0])
    assert router.route(prompt(100)).pod.name == "cheap"  # room again


def test_a_queue_in_the_record_saturates_a_pod_below_its_inflight_limit() -> None:
    strategy = GpuTypeStrategy(settings())
    pods = [pod("cheap", "cheap", record="cheap", waiting=3), pod("fast", "fast", load=2)]
    assert order(strategy, pods, 100)[0] == "fast"
    pods[0].apply_metrics(PodMetrics(timestamp=2.0, waiting=2, gpu_type="cheap"))
    assert order(strategy, pods, 100)[0] == "cheap"


def test_the_type_in_the_record_wins_over_the_label() -> None:
    strategy = GpuTypeStrategy(settings())
    pods = [pod("a", "cheap", record="fast", load=1), pod("b", "fast")]
    assert order(strategy, pods, 100) == ["b", "a"]  # both fast: the less loaded first
    pods[0].apply_metrics(None)  # record unknown (stale): the label says
    assert order(strategy, pods, 100) == ["a", "b"]


def test_pods_of_unknown_type_come_last_and_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    strategy = GpuTypeStrategy(settings())
    pods = [pod("mystery", "tpu-v9"), pod("unlabelled", None), pod("fast", "fast", load=7)]
    with caplog.at_level(logging.WARNING):
        assert order(strategy, pods, 100)[0] == "fast"
        order(strategy, pods, 100)
    assert sum("'tpu-v9'" in r.message for r in caplog.records) == 1  # once per type, not per request
    assert sum("without a GPU type" in r.message for r in caplog.records) == 1
    pods[2].inflight = FAST.max_inflight  # the only profiled pod saturated: spill over to the unknown ones
    assert order(strategy, pods, 100)[:2] in (["mystery", "unlabelled"], ["unlabelled", "mystery"])
    assert not fell_back(strategy, pods, 100)


def test_only_pods_of_unknown_type_is_least_request_counted_as_a_fallback() -> None:
    strategy = GpuTypeStrategy(settings())
    pods = [pod("a", None, load=3), pod("b", "tpu-v9", load=1), pod("c", None, load=2, record="", waiting=5)]
    assert order(strategy, pods, 100) == ["b", "a", "c"]  # c is queued
    assert fell_back(strategy, pods, 100)
    assert order(GpuTypeStrategy(GpuTypeSettings()), pods, 100) == ["b", "c", "a"]  # 5 waiting: not a queue


def test_when_every_pod_is_saturated_the_least_loaded_relative_to_capacity_wins() -> None:
    strategy = GpuTypeStrategy(settings())
    pods = [
        pod("unknown", None, record="", waiting=9),
        pod("fast", "fast", load=10),
        pod("cheap", "cheap", load=4),
    ]
    assert order(strategy, pods, 100) == ["cheap", "fast", "unknown"]  # 4/4 < 10/8; unknown type last
    assert fell_back(strategy, pods, 100)
    pods[2].inflight = 6
    assert order(strategy, pods, 100) == ["fast", "cheap", "unknown"]
    assert fell_back(strategy, pods, 100)


def test_the_precomputed_buckets_give_the_order_of_the_formula_for_every_prompt_length() -> None:
    """Per bucket the order is computed once; it must equal the formula evaluated for each prompt."""
    profiles = {
        "cheap": CHEAP,
        "fast": FAST,
        "slow": SLOW,
        "mid": GpuProfile(cost=2.0, prefill_tokens_per_second=3_333.3, seconds_per_output_token=0.02),
        "twin": GpuProfile(cost=2.5, prefill_tokens_per_second=3_333.3, seconds_per_output_token=0.04),
    }
    config = settings(**profiles)
    strategy = GpuTypeStrategy(config)
    pods = [pod(gpu, gpu) for gpu in sorted(profiles)] + [pod("unknown", None)]
    limits = [1_000, 3_333, 10_000]
    lengths = [0, 1, 50_000, *(n + d for n in limits for d in (-1, 0, 1))]
    lengths += random.Random(7).sample(range(1, 20_000), 200)
    for tokens in lengths:
        assert order(strategy, pods, tokens) == [*preference(config, tokens), "unknown"], tokens
    assert {strategy.bucket(n) for n in lengths} == {0, 1, 2, 3}


def test_profiles_are_configured_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        """
routing:
  gpu_type:
    ttft_slo_seconds: 0.5
    tpot_slo_seconds: 0.1
    profiles:
      NVIDIA-L4:
        cost: 0.80
        prefill_tokens_per_second: 4300
        seconds_per_output_token: 0.09
        max_inflight: 24
      NVIDIA-H100-80GB-HBM3:
        cost: 3.24
        prefill_tokens_per_second: 40000
        seconds_per_output_token: 0.03
        max_inflight: 256
"""
    )
    config = load(GatewaySettings, path)
    strategy = build_strategies(config.routing)["gpu-type"]
    pods = [pod("h100", "NVIDIA-H100-80GB-HBM3"), pod("l4", "NVIDIA-L4")]
    assert order(strategy, pods, 2_000) == ["l4", "h100"]  # type: ignore[arg-type]
    assert order(strategy, pods, 2_200) == ["h100", "l4"]  # type: ignore[arg-type]


def test_a_profile_without_speed_or_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="'broken'"):
        GpuTypeStrategy(settings(broken=GpuProfile(prefill_tokens_per_second=0)))
    with pytest.raises(ValueError, match="'broken'"):
        GpuTypeStrategy(settings(broken=GpuProfile(max_inflight=0)))
