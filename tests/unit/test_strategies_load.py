"""Load-balancing strategies, the unknown-metrics rule, weighted combinations and strategy precedence."""

import random
from collections import Counter

import pytest

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import FallbackScores, build_strategies
from gateway_plugins.routing.strategies.load import (
    LeastKvCacheStrategy,
    LeastLatencyStrategy,
    LeastQueueStrategy,
    PowerOfTwoStrategy,
    ThroughputStrategy,
)
from gateway_plugins.routing.types import PodState, RoutingRequest


def states(n: int, **metrics: list[float]) -> list[PodState]:
    """``n`` pods; each keyword gives one PodMetrics field per pod (None = unknown record)."""
    pods = [PodState(f"p{i}", f"10.0.0.{i}:8000", "m") for i in range(n)]
    for i, pod in enumerate(pods):
        fields = {name: values[i] for name, values in metrics.items()}
        if any(v is None for v in fields.values()):
            continue
        pod.metrics = PodMetrics(timestamp=1.0, **fields)  # type: ignore[arg-type]
    return pods


def pick(strategy: object, pods: list[PodState], request: RoutingRequest | None = None) -> str:
    scores = strategy.score(request or RoutingRequest("m"), pods)  # type: ignore[attr-defined]
    return pods[rank(scores, random.Random(0))[0]].name


def test_least_kv_cache_prefers_free_cache_and_counts_tokens_routed_since_the_record() -> None:
    pods = states(2, kv_usage=[0.5, 0.3], num_blocks=[1000, 1000], block_size=[16, 16])
    strategy = LeastKvCacheStrategy()
    assert pick(strategy, pods) == "p1"
    # 4,000 prompt tokens sent to p1 since its record: 25% of its 16,000-token cache.
    pods[1].tokens_since_record = 4000
    assert pick(strategy, pods) == "p0"
    pods[1].apply_metrics(pods[1].metrics)  # a new record includes them
    assert pods[1].tokens_since_record == 0


def test_unknown_records_score_the_mean_of_the_known_ones() -> None:
    pods = states(3, waiting=[0, 10, None])
    scores = LeastQueueStrategy().score(RoutingRequest("m"), pods)
    assert scores == [0.0, -10.0, -5.0]


def test_all_unknown_falls_back_to_least_load_and_says_so() -> None:
    pods = states(3, waiting=[None, None, None])
    pods[0].inflight, pods[1].inflight, pods[2].inflight = 4, 1, 2
    strategy = LeastQueueStrategy()
    assert pick(strategy, pods) == "p1"
    assert isinstance(strategy.score(RoutingRequest("m"), pods), FallbackScores)
    pods[0].metrics = PodMetrics(timestamp=1.0, waiting=9)
    # One record known: the rule for partly unknown applies, no fallback.
    assert not isinstance(strategy.score(RoutingRequest("m"), pods), FallbackScores)


def test_least_queue_adds_requests_routed_since_the_record() -> None:
    pods = states(2, waiting=[2, 0])
    pods[1].routed_since_record = 3
    assert pick(LeastQueueStrategy(), pods) == "p0"


def test_throughput_prefers_the_pod_doing_least_token_work() -> None:
    pods = states(2, prompt_tps=[5000.0, 1000.0], generation_tps=[500.0, 800.0])
    assert pick(ThroughputStrategy(), pods) == "p1"


def test_least_latency_weighs_queue_against_prefill_speed() -> None:
    # p0: idle but slow prefill (1 ms/token); p1: two queued requests of 0.2 s prefill, fast prefill.
    common = {"prompt_tokens_mean": [1000.0, 1000.0], "queue_mean": [0.0, 0.1], "tpot_mean": [0.02, 0.02]}
    pods = states(2, ttft_mean=[1.0, 0.3], waiting=[0, 2], **common)
    strategy = LeastLatencyStrategy()
    short = RoutingRequest("m", prompt_token_ids=list(range(100)), max_tokens=10)
    long = RoutingRequest("m", prompt_token_ids=list(range(4000)), max_tokens=10)
    # short: p0 costs 0.1 s of prefill, p1 0.4 s of queue + 0.02 s: p0. long: p0 4 s, p1 0.4 + 0.8 s: p1.
    assert pick(strategy, pods, short) == "p0"
    assert pick(strategy, pods, long) == "p1"


def test_power_of_two_compares_two_random_candidates() -> None:
    pods = states(4)
    for pod, load in zip(pods, [5, 0, 7, 9], strict=True):
        pod.inflight = load
    strategy = PowerOfTwoStrategy(random.Random(3))
    picks = Counter(pick(strategy, pods) for _ in range(600))
    assert "p3" not in picks  # the most loaded pod never wins a pair
    assert picks["p1"] > picks["p0"] > picks["p2"] > 0  # the least loaded wins every pair it is in


def test_round_robin_takes_each_pod_in_turn() -> None:
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"p{i}", f"10.0.0.{i}:8000", "m") for i in range(3))
    router = Router(registry, build_strategies(), default_strategy="round-robin")
    assert [router.route(RoutingRequest("m")).pod.name for _ in range(6)] == ["p0", "p1", "p2"] * 2


# -- weighted combinations -----------------------------------------------------------------------------


def router(n: int = 3, default: str = "least-request") -> Router:
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"p{i}", f"10.0.0.{i}:8000", "m") for i in range(n))
    return Router(registry, build_strategies(), default_strategy=default)


def test_weighted_combination_normalises_and_weighs_each_part() -> None:
    r = router(3)
    pods = list(r.registry.ready_pods("m"))
    for pod, (waiting, kv) in zip(pods, [(0, 0.9), (10, 0.0), (5, 0.5)], strict=True):
        pod.metrics = PodMetrics(timestamp=1.0, waiting=waiting, kv_usage=kv)
    queue_heavy = r.strategy("least-queue:3,least-kv-cache:1")
    kv_heavy = r.strategy("least-queue:1, least-kv-cache:3")
    assert pick(queue_heavy, pods) == "p0"
    assert pick(kv_heavy, pods) == "p1"
    # p2 is in the middle of both: 0.5 x 3 + ~0.44 x 1 vs p0's 3 + 0.
    assert queue_heavy.score(RoutingRequest("m"), pods) == pytest.approx([3.0, 1.0, 1.5 + 0.4 / 0.9])


def test_weighted_parts_with_equal_scores_count_fully_and_weight_zero_drops_a_part() -> None:
    r = router(2)
    combined = r.strategy("least-request:2,random:0")
    assert combined.name == "least-request:2"
    assert list(combined.score(RoutingRequest("m"), list(r.registry.ready_pods("m")))) == [2.0, 2.0]


def test_combinations_are_parsed_once() -> None:
    r = router(2)
    assert r.strategy("prefix-cache:3,least-request") is r.strategy("prefix-cache:3,least-request")


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("prefix-cache:x", "whole number"),
        ("prefix-cache:-1", "negative"),
        ("prefix-cache,prefix-cache", "twice"),
        ("prefix-cache:0", "weight 0"),
        ("nope:2,least-request", "unknown strategy 'nope'"),
        ("inference-extension:1,least-request", "unknown strategy 'inference-extension'"),
        (",least-request", "empty strategy name"),
    ],
)
def test_bad_combinations_are_a_400_naming_the_problem(header: str, problem: str) -> None:
    with pytest.raises(GatewayError) as info:
        router().strategy(header)
    assert info.value.status == 400
    assert info.value.code == "invalid_routing_strategy"
    assert problem in info.value.message


def test_inference_extension_preset_is_queue_kv_prefix() -> None:
    preset = router().strategy("inference-extension")
    assert [(part.name, weight) for part, weight in preset.parts] == [  # type: ignore[attr-defined]
        ("least-queue", 2),
        ("least-kv-cache", 2),
        ("prefix-cache", 3),
    ]


def test_an_alias_names_the_same_instance_and_counts_as_it() -> None:
    strategies = build_strategies()
    assert strategies["prefix-cache-preble"] is strategies["prefix-cache-and-load"]
    assert strategies["least-gpu-cache"] is strategies["least-kv-cache"]
    r = router()
    decision = r.route(RoutingRequest("m"), r.strategy("least-gpu-cache"))  # no records: a fallback
    assert (decision.strategy, decision.label) == ("least-kv-cache", "least-kv-cache")
    assert r.fallback_decisions["least-kv-cache"] == 1
    assert "least-gpu-cache" not in r.fallback_decisions


# -- precedence: header > model profile annotation > model setting > default ------------------------------


def test_model_profiles_from_the_pod_annotation() -> None:
    registry = PodRegistry()
    config = (
        '{"defaultProfile": "fast", "profiles": {"fast": {"routingStrategy": "least-kv-cache"},'
        ' "cache": {"routingStrategy": "prefix-cache:2,least-request"}}}'
    )
    registry.replace_all(
        [
            PodInfo("p0", "10.0.0.0:8000", "m", annotations={"model.aibrix.ai/config": config}),
            PodInfo("p1", "10.0.0.1:8000", "m"),
            PodInfo("q0", "10.0.1.0:8000", "other"),
        ]
    )
    r = Router(registry, build_strategies(), default_strategy="random", model_strategies={"m": "throughput"})
    assert r.route(RoutingRequest("m")).strategy == "least-kv-cache"
    assert r.route(RoutingRequest("m"), profile="cache").strategy == "prefix-cache:2,least-request:1"
    assert r.route(RoutingRequest("m"), profile="missing").strategy == "least-kv-cache"
    assert (
        r.route(RoutingRequest("m"), r.strategy("power-of-two"), profile="cache").strategy == "power-of-two"
    )
    assert r.route(RoutingRequest("other")).strategy == "random"


@pytest.mark.parametrize(
    "annotation",
    ["not json", '{"profiles": []}', '{"profiles": {"default": {"routingStrategy": "warp-drive"}}}'],
)
def test_a_broken_annotation_is_ignored_not_fatal(annotation: str) -> None:
    registry = PodRegistry()
    registry.replace_all(
        [PodInfo("p0", "10.0.0.0:8000", "m", annotations={"model.aibrix.ai/config": annotation})]
    )
    r = Router(
        registry, build_strategies(), default_strategy="least-request", model_strategies={"m": "random"}
    )
    assert r.route(RoutingRequest("m")).strategy == "random"


def test_an_adapter_takes_its_base_models_strategy_unless_it_has_its_own() -> None:
    registry = PodRegistry()
    registry.replace_all([PodInfo("p0", "10.0.0.0:8000", "base"), PodInfo("p1", "10.0.0.1:8000", "base")])
    for name in ("p0", "p1"):
        registry.set_adapters("default", name, ("sql", "chat"))
    r = Router(
        registry,
        build_strategies(),
        default_strategy="random",
        model_strategies={"base": "lora-affinity", "chat": "least-request"},
    )
    assert r.route(RoutingRequest("sql")).strategy == "lora-affinity"
    assert r.route(RoutingRequest("chat")).strategy == "least-request"
    assert r.route(RoutingRequest("base")).strategy == "lora-affinity"
