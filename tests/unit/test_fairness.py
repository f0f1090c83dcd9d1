"""``vtc-basic``: users above the fair share of tokens are confined to a stable subset of pods."""

from __future__ import annotations

import math

import pytest

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.config import FairnessSettings
from gateway_plugins.routing.strategies import FallbackScores
from gateway_plugins.routing.strategies.fairness import VirtualTokenCounterStrategy
from gateway_plugins.routing.types import PodState, RoutingRequest

PODS = [PodState(f"p{i}", f"10.0.0.{i}:8000", "m") for i in range(8)]


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def vtc(half_life: float = 60.0) -> tuple[VirtualTokenCounterStrategy, Clock]:
    clock = Clock()
    return VirtualTokenCounterStrategy(FairnessSettings(half_life_seconds=half_life), clock), clock


def request(user: str | None, prompt: int = 100, output: int | None = 100) -> RoutingRequest:
    return RoutingRequest("m", user=user, prompt_token_ids=[1] * prompt, max_tokens=output)


def serve(strategy: VirtualTokenCounterStrategy, user: str | None, count: int = 1, **kwargs: int) -> None:
    """Route and finish ``count`` requests of ``user``."""
    for _ in range(count):
        r = request(user, **kwargs)
        strategy.on_routed(r, PODS[0])
        strategy.on_finished(r, PODS[0])


def hold(strategy: VirtualTokenCounterStrategy, user: str | None) -> RoutingRequest:
    """Route one request of ``user`` and keep it in flight: the user is active."""
    r = request(user)
    strategy.on_routed(r, PODS[0])
    return r


def allowed(strategy: VirtualTokenCounterStrategy, user: str | None) -> list[int]:
    scores = strategy.score(request(user), PODS)
    return [i for i, s in enumerate(scores) if math.isfinite(s)]


def test_a_heavy_user_is_confined_and_light_users_are_not() -> None:
    strategy, _ = vtc()
    serve(strategy, "heavy", 100)  # 20,000 tokens
    for user in ("a", "b", "c"):
        serve(strategy, user, 4)
        hold(strategy, user)  # 1,000 each, active
    # The fair share counts the requesting user as active: (20,000 + 3 x 1,000) / 4 = 5,750.
    assert len(allowed(strategy, "heavy")) == math.ceil(8 * 5_750 / 20_000)
    for user in ("a", "b", "c", "never-seen"):
        assert allowed(strategy, user) == list(range(8))


def test_the_more_users_share_the_fleet_the_fewer_pods_a_heavy_user_gets() -> None:
    strategy, _ = vtc()
    serve(strategy, "heavy", 100)
    light = [hold(strategy, f"light-{i}") for i in range(7)]
    assert len(allowed(strategy, "heavy")) == 2  # fair = 27,000 / 8 -> ceil(8 x 3,375 / 20,000)
    for r in light:
        strategy.on_finished(r, PODS[1])
    assert len(allowed(strategy, "heavy")) == 8  # alone again: nobody to be fair to


def test_the_subset_is_stable_and_least_loaded_within_it() -> None:
    strategy, _ = vtc()
    serve(strategy, "heavy", 100)
    hold(strategy, "other")
    subset = allowed(strategy, "heavy")
    assert len(subset) == 5  # fair = (20,000 + 200) / 2 -> ceil(8 x 10,100 / 20,000)
    assert all(allowed(strategy, "heavy") == subset for _ in range(5))
    pods = [PodState(p.name, p.address, "m", inflight=0 if i == subset[1] else 3) for i, p in enumerate(PODS)]
    scores = strategy.score(request("heavy"), pods)
    assert max(range(8), key=lambda i: scores[i]) == subset[1]
    pods[subset[1]].inflight = 4
    pods[subset[2]].inflight = 1
    pods[next(i for i in range(8) if i not in subset)].inflight = 0  # idlest, but not one of heavy's
    scores = strategy.score(request("heavy"), pods)
    assert max(range(8), key=lambda i: scores[i]) == subset[2]


def test_different_heavy_users_get_different_subsets() -> None:
    strategy, _ = vtc()
    heavies = [f"tenant-{i}" for i in range(6)]
    for user in heavies:
        serve(strategy, user, 20)
    for i in range(30):
        hold(strategy, f"light-{i}")
    subsets = {tuple(allowed(strategy, user)) for user in heavies}
    assert all(len(s) < 8 for s in subsets)
    assert len(subsets) > 1


def test_counters_decay_with_the_half_life() -> None:
    strategy, clock = vtc(half_life=10.0)
    serve(strategy, "heavy", 100)
    assert strategy.counter("heavy") == pytest.approx(20_000)
    clock.now += 10.0
    assert strategy.counter("heavy") == pytest.approx(10_000)
    serve(strategy, "light", 1)
    clock.now += 20.0
    assert strategy.counter("heavy") == pytest.approx(2_500)
    assert strategy.counter("light") == pytest.approx(50)


def test_a_once_heavy_user_is_free_again_after_its_tokens_decay() -> None:
    strategy, clock = vtc(half_life=10.0)
    serve(strategy, "heavy", 100)
    light = hold(strategy, "light")
    assert len(allowed(strategy, "heavy")) < 8
    clock.now += 100.0  # ten half-lives: 20,000 -> 20 tokens, light's 200 -> 0.2
    assert len(allowed(strategy, "heavy")) < 8  # both decay alike: the ratio is what counts
    strategy.on_finished(light, PODS[0])
    hold(strategy, "light")  # light's new 200 against heavy's 20
    assert allowed(strategy, "heavy") == list(range(8))


def test_rebasing_keeps_counters_and_forgets_idle_users() -> None:
    strategy, clock = vtc(half_life=1.0)
    serve(strategy, "gone", 1)
    kept = hold(strategy, "busy")
    clock.now += 5.0
    before = strategy.counter("busy")
    clock.now += 40.0  # past the rebase after 32 half-lives
    serve(strategy, "new", 1)
    assert "gone" not in strategy._tenants  # idle and decayed below one token
    assert strategy.counter("busy") == pytest.approx(before * 2.0**-40)
    strategy.on_finished(kept, PODS[0])
    assert strategy.counter("new") == pytest.approx(200)


def test_requests_without_a_user_share_one_counter() -> None:
    strategy, _ = vtc()
    serve(strategy, None, 100)
    hold(strategy, "named")
    assert len(allowed(strategy, None)) < 8
    assert allowed(strategy, "named") == list(range(8))


def test_output_tokens_default_when_max_tokens_is_unset() -> None:
    strategy, _ = vtc()
    serve(strategy, "u", 1, prompt=10, output=None)  # type: ignore[arg-type]
    assert strategy.counter("u") == pytest.approx(10 + FairnessSettings().expected_output_tokens)


def test_half_life_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half_life"):
        VirtualTokenCounterStrategy(FairnessSettings(half_life_seconds=0), Clock())


def test_a_confined_user_spills_onto_pods_without_a_queue() -> None:
    strategy, _ = vtc()
    serve(strategy, "heavy", 100)
    hold(strategy, "other")
    subset = allowed(strategy, "heavy")  # no pod has a record: held to its subset, a fallback
    assert isinstance(strategy.score(request("heavy"), PODS), FallbackScores)
    outside = [i for i in range(8) if i not in subset]
    pods = [PodState(p.name, p.address, "m") for p in PODS]
    pods[outside[0]].apply_metrics(PodMetrics(timestamp=0.0, waiting=0, running=12))
    pods[outside[1]].apply_metrics(PodMetrics(timestamp=0.0, waiting=3, running=40))
    scores = strategy.score(request("heavy"), pods)
    usable = {i for i, s in enumerate(scores) if math.isfinite(s)}
    assert usable == {*subset, outside[0]}  # unknown records and queues take no spill-over
    assert not isinstance(scores, FallbackScores)
