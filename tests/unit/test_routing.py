import random
from collections import Counter
from collections.abc import Sequence

import pytest

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import (
    FallbackScores,
    LeastRequestStrategy,
    RandomStrategy,
    build_strategies,
)
from gateway_plugins.routing.types import PodState, RoutingRequest


def pods(n: int, model: str = "m") -> list[PodInfo]:
    return [PodInfo(f"p{i}", f"10.0.0.{i}:8000", model) for i in range(n)]


def router(n: int = 3, **kwargs: object) -> Router:
    registry = PodRegistry()
    registry.replace_all(pods(n))
    return Router(registry, build_strategies(), default_strategy="least-request", **kwargs)  # type: ignore[arg-type]


def test_rank_breaks_ties_at_random() -> None:
    rng = random.Random(1)
    picks = Counter(rank([1.0, 3.0, 3.0, 0.0], rng)[0] for _ in range(400))
    assert set(picks) == {1, 2}
    assert min(picks.values()) > 150


def test_rank_orders_best_first() -> None:
    rng = random.Random(1)
    assert rank([0.1, 0.9, 0.5], rng, 3) == [1, 2, 0]
    assert rank([0.1, 0.9, 0.5], rng, 2) == [1, 2]
    assert rank((0.1, 0.9, 0.5), rng) == [1]


def test_least_request_prefers_fewest_inflight() -> None:
    states = [PodState("a", "1:1", "m", inflight=3), PodState("b", "1:2", "m", inflight=1)]
    scores = LeastRequestStrategy().score(RoutingRequest("m"), states)
    assert rank(scores, random.Random(1)) == [1]


def test_random_covers_all_pods() -> None:
    states = [PodState(f"p{i}", f"1:{i}", "m") for i in range(4)]
    rng = random.Random(1)
    strategy = RandomStrategy(rng)
    seen = {rank(strategy.score(RoutingRequest("m"), states), rng)[0] for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_no_strategy_and_no_tie_break_draws_from_the_global_random_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every draw comes from the injected generator: one seed gives one sequence of decisions."""

    def forbidden(*_: object) -> None:
        raise AssertionError("drew from the global random module")

    for name in ("random", "choice", "sample", "shuffle", "randrange", "getrandbits"):
        monkeypatch.setattr(random, name, forbidden)
    registry = PodRegistry()
    registry.replace_all(pods(4))

    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        r = Router(registry, build_strategies(rng=rng), default_strategy="least-request", rng=rng)
        names = []
        for strategy in ("random", "power-of-two", "least-request", "random:1,power-of-two:1"):
            for _ in range(20):  # released at once: every least-request decision is a four-way tie
                decision = r.route(RoutingRequest("m"), r.strategy(strategy), fallbacks=1)
                r.release(decision)
                names += [decision.pod.name, decision.fallbacks[0].name]
        return names

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_burst_spreads_because_inflight_counts_at_selection() -> None:
    r = router(3)
    decisions = [r.route(RoutingRequest("m")) for _ in range(9)]
    assert Counter(d.pod.name for d in decisions) == {"p0": 3, "p1": 3, "p2": 3}
    for decision in decisions:
        r.release(decision)
    assert [p.inflight for p in r.registry.ready_pods("m")] == [0, 0, 0]


def test_strategy_precedence_header_then_model_then_default() -> None:
    r = router(2, model_strategies={"m": "random"})
    assert r.route(RoutingRequest("m")).strategy == "random"
    assert r.route(RoutingRequest("m"), r.strategy("least-request")).strategy == "least-request"
    other = router(2)
    assert other.route(RoutingRequest("m")).strategy == "least-request"


def test_unknown_strategy_is_a_400() -> None:
    with pytest.raises(GatewayError) as info:
        router().strategy("fastest-please")
    assert info.value.status == 400
    assert "least-request" in info.value.message


def test_unknown_strategy_in_configuration_fails_at_startup() -> None:
    with pytest.raises(ValueError, match="nope"):
        Router(PodRegistry(), build_strategies(), default_strategy="nope")


def test_unknown_model_404_and_known_model_without_ready_pods_503() -> None:
    r = router(1)
    with pytest.raises(GatewayError) as unknown:
        r.route(RoutingRequest("other"))
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    r.registry.upsert(PodInfo("p0", "10.0.0.0:8000", "m", ready=False))
    with pytest.raises(GatewayError) as none_ready:
        r.route(RoutingRequest("m"))
    assert none_ready.value.status == 503
    assert none_ready.value.cause == "no-model-backends"


def test_subset_hint_restricts_candidates() -> None:
    r = router(3)
    for _ in range(10):
        assert r.route(RoutingRequest("m"), subset={"10.0.0.2:8000"}).pod.name == "p2"
    with pytest.raises(GatewayError) as info:
        r.route(RoutingRequest("m"), subset=set())
    assert info.value.status == 503


def test_fallbacks_are_distinct_and_ranked() -> None:
    decision = router(3).route(RoutingRequest("m"), fallbacks=2)
    names = [decision.pod.name, *(p.name for p in decision.fallbacks)]
    assert sorted(names) == ["p0", "p1", "p2"]
    assert decision.pod.inflight == 1
    assert all(p.inflight == 0 for p in decision.fallbacks)


class MetricsReader(LeastRequestStrategy):
    name = "metrics-reader"
    uses_metrics = True


def test_decisions_with_unknown_metrics_are_counted() -> None:
    registry = PodRegistry()
    registry.replace_all(pods(2))
    r = Router(registry, {**build_strategies(), "metrics-reader": MetricsReader()}, default_strategy="random")
    r.route(RoutingRequest("m"))
    assert r.decisions_with_unknown_metrics == 0  # random does not read metrics
    r.route(RoutingRequest("m"), r.strategy("metrics-reader"))
    assert r.decisions_with_unknown_metrics == 1
    for state in registry.ready_pods("m"):
        state.metrics = PodMetrics(timestamp=1.0)
    r.route(RoutingRequest("m"), r.strategy("metrics-reader"))
    assert r.decisions_with_unknown_metrics == 1


def test_fallbacks_are_counted_by_the_router_for_committed_decisions_only() -> None:
    r = router(2)
    assert r.fallback_decisions == dict.fromkeys(r.fallback_decisions, 0)
    assert {"least-queue", "least-kv-cache", "inference-extension"} <= r.fallback_decisions.keys()
    queue = r.strategy("least-queue")
    pods_ = list(r.registry.ready_pods("m"))
    assert isinstance(queue.score(RoutingRequest("m"), pods_), FallbackScores)  # no records
    assert r.fallback_decisions["least-queue"] == 0  # scoring alone counts nothing
    r.route(RoutingRequest("m"), queue)
    assert r.fallback_decisions["least-queue"] == 1
    # A combination counts each part that fell back, under the part's name, whatever decided.
    r.route(RoutingRequest("m"), r.strategy("least-queue:1,least-kv-cache:2,least-request"))
    r.route(RoutingRequest("m"), r.strategy("inference-extension"))
    assert (r.fallback_decisions["least-queue"], r.fallback_decisions["least-kv-cache"]) == (3, 2)
    assert r.fallback_decisions["inference-extension"] == 0
    assert r.decisions_with_unknown_metrics == 3
    # A decision that fails after scoring counts nowhere.
    with pytest.raises(RuntimeError):
        r.route(RoutingRequest("m"), Failing())
    assert r.fallback_decisions == {**r.fallback_decisions, "least-queue": 3, "least-kv-cache": 2}
    assert "combination" not in r.fallback_decisions  # where the unregistered "failing" would count
    assert r.decisions_with_unknown_metrics == 3
    assert sum(pod.inflight for pod in pods_) == 3


class Failing(LeastRequestStrategy):
    """Falls back, then fails to commit (a bug in ``on_routed``)."""

    name = "failing"
    uses_metrics = True

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        return FallbackScores(super().score(request, pods))

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        raise RuntimeError("bug")


def test_unavailable_pods_leave_routing_until_they_come_back() -> None:
    r = router(2)
    r.registry.set_available("default", "p0", False)
    assert {r.route(RoutingRequest("m")).pod.name for _ in range(10)} == {"p1"}
    r.registry.set_available("default", "p1", False)
    with pytest.raises(GatewayError) as info:
        r.route(RoutingRequest("m"))
    assert info.value.status == 503
    r.registry.set_available("default", "p0", True)
    assert r.route(RoutingRequest("m")).pod.name == "p0"
