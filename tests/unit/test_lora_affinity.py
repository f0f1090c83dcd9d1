"""``lora-affinity``: running > queued (or just sent) > free slot > the rest; fewest in flight within."""

from __future__ import annotations

import random

import pytest

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.config import LoadGuardSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import FallbackScores, build_strategies
from gateway_plugins.routing.strategies.affinity import LoraAffinityStrategy
from gateway_plugins.routing.strategies.base import least_load_scores
from gateway_plugins.routing.types import PodState, RoutingRequest

BASE = "llama"
SQL = RoutingRequest("sql")


def pod(name: str, *, load: int = 0, running: str = "", waiting: str = "", max_loras: int = 2) -> PodState:
    """A pod serving BASE whose record lists these adapters (comma-separated) running and queued."""
    state = PodState(name, f"10.0.0.{len(name)}:8000", BASE, inflight=load)
    state.apply_metrics(record(running, waiting, max_loras))
    return state


def record(running: str = "", waiting: str = "", max_loras: int = 2) -> PodMetrics:
    return PodMetrics(
        timestamp=1.0,
        running_adapters=tuple(filter(None, running.split(","))),
        waiting_adapters=tuple(filter(None, waiting.split(","))),
        max_loras=max_loras,
    )


def strategy(**guard: float) -> LoraAffinityStrategy:
    return LoraAffinityStrategy(LoadGuardSettings(**guard))  # type: ignore[arg-type]


def order(strategy: LoraAffinityStrategy, pods: list[PodState], request: RoutingRequest = SQL) -> list[str]:
    return [pods[i].name for i in rank(strategy.score(request, pods), random.Random(0), len(pods))]


def test_tiers_running_then_queued_then_free_slot_then_the_rest() -> None:
    pods = [
        pod("full", running="a,b"),
        pod("free-slot", load=1, running="a"),
        pod("queued", load=2, running="a,b", waiting="sql"),
        pod("running", load=3, running="sql,a"),
    ]
    assert order(strategy(), pods) == ["running", "queued", "free-slot", "full"]


def test_fewest_in_flight_wins_within_a_tier() -> None:
    pods = [pod("busy", load=3, running="sql"), pod("idle", load=1, running="sql"), pod("free", running="")]
    assert order(strategy(), pods) == ["idle", "busy", "free"]


def test_a_slot_is_taken_by_any_adapter_running_or_queued() -> None:
    # max_loras 2: one running + one queued adapter fill it, the same adapter in both counts once.
    pods = [pod("filled", running="a", waiting="b"), pod("one-left", running="a", waiting="a", load=5)]
    assert order(strategy(min_gap=100), pods) == ["one-left", "filled"]


def test_a_burst_follows_its_first_request_until_the_next_record() -> None:
    lora = strategy()
    pods = [pod("p0", load=1), pod("p1", load=1)]
    first = pods[rank(lora.score(SQL, pods), random.Random(0))[0]]
    lora.on_routed(SQL, first)
    first.inflight += 1
    # The other pod is now less loaded and has a free slot too; the one sent "sql" is as good as queued.
    assert order(lora, pods)[0] == first.name
    first.apply_metrics(record())  # a newer record without "sql": the request finished, nothing is pending
    assert order(lora, pods)[0] != first.name


def test_adapters_sent_since_the_record_fill_slots() -> None:
    lora = strategy()
    pods = [pod("p0", max_loras=1), pod("p1", max_loras=1, load=1)]
    lora.on_routed(RoutingRequest("other"), pods[0])
    assert order(lora, pods) == ["p1", "p0"]  # p0's only slot went to "other"


def test_overloaded_pod_keeps_an_adapter_only_against_pods_that_would_evict_one() -> None:
    hot = pod("hot", load=30, running="sql")
    spare = pod("spare", load=2, running="a")
    others = [pod(f"full{i}", load=2, running="a,b") for i in range(4)]
    assert order(strategy(), [hot, spare, *others])[:2] == ["spare", "hot"]
    assert order(strategy(), [hot, *others])[0] == "hot"
    assert order(strategy(min_gap=100), [hot, spare, *others])[0] == "hot"  # guard off


def test_base_model_requests_are_least_request() -> None:
    lora = strategy()
    pods = [pod("p0", load=2, running="sql"), pod("p1", load=1)]
    pods[1].metrics = None
    scores = lora.score(RoutingRequest(BASE), pods)
    assert scores == least_load_scores(pods)
    assert not isinstance(scores, FallbackScores)
    pods = [pod("p0", load=1, max_loras=1), pod("p1", running="a", max_loras=1)]
    lora.on_routed(RoutingRequest(BASE), pods[0])
    assert order(lora, pods, RoutingRequest("x"))[0] == "p0"  # the base model took no adapter slot


def test_unknown_records_score_the_mean_and_all_unknown_fall_back_to_least_request() -> None:
    lora = strategy()
    pods = [pod("running", load=4, running="sql"), pod("full", running="a,b"), pod("unknown", load=1)]
    pods[2].metrics = None
    scores = lora.score(SQL, pods)
    assert scores[2] == pytest.approx((scores[0] + scores[1]) / 2)
    assert order(lora, pods) == ["running", "unknown", "full"]
    for state in pods:
        state.metrics = None
    assert order(lora, pods)[0] == "full"  # least in flight
    assert isinstance(lora.score(SQL, pods), FallbackScores)


def test_routes_adapters_through_the_registry_and_router() -> None:
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"p{i}", f"10.0.0.{i}:8000", BASE) for i in range(3))
    registry.set_adapters("default", "p1", ("sql",))
    registry.set_adapters("default", "p2", ("sql",))
    p0, p1, p2 = registry.ready_pods(BASE)
    for state, running in ((p0, ""), (p1, "a,b"), (p2, "sql")):
        state.apply_metrics(record(running))
    router = Router(registry, build_strategies(), default_strategy="lora-affinity")
    decision = router.route(RoutingRequest("sql"))
    assert (decision.pod, decision.strategy) == (p2, "lora-affinity")  # p0 is idle but has no "sql"
