"""The PodAutoscaler's scaling rules (controllers.autoscaling.algorithms) on the reference's numbers."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controllers.autoscaling.algorithms import (
    Decision,
    MetricWindow,
    ScalerState,
    ScalingPolicy,
    apa,
    hpa_like,
    kpa,
    rate_bounds,
)

ROOMY = {"min_replicas": 0, "max_replicas": 1000}
Scaler = Callable[[ScalingPolicy, MetricWindow, int, float, ScalerState], Decision]


def window_of(*pieces: tuple[float, float, float], step: float = 10.0) -> MetricWindow:
    """Samples of ``value`` every ``step`` seconds from ``start`` to ``end`` inclusive, per piece."""
    window = MetricWindow(180.0)
    for start, end, value in pieces:
        t = start
        while t <= end + 1e-9:
            window.add(t, value)
            t += step
    return window


def flat(value: float, now: float = 300.0) -> MetricWindow:
    """The same value over the whole stable window: stable and panic averages are both ``value``."""
    return window_of((now - 170.0, now, value))


# -- policy --------------------------------------------------------------------------------------


def test_defaults_are_the_references() -> None:
    assert asdict(ScalingPolicy()) == {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_value": 1.0,
        "stable_window_seconds": 180.0,
        "panic_window_seconds": 60.0,
        "panic_threshold": 2.0,
        "max_scale_up_rate": 2.0,
        "max_scale_down_rate": 2.0,
        "up_tolerance": 0.1,
        "down_tolerance": 0.1,
        "scale_up_cooldown_seconds": 0.0,
        "scale_down_cooldown_seconds": 300.0,
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"min_replicas": -1},
        {"min_replicas": 5, "max_replicas": 4},
        {"max_replicas": 0, "min_replicas": 0},
        {"target_value": 0.0},
        {"panic_window_seconds": 200.0},
        {"panic_threshold": 0.0},
        {"max_scale_up_rate": 0.5},
        {"max_scale_down_rate": 0.9},
        {"down_tolerance": 1.0},
        {"up_tolerance": -0.1},
        {"scale_down_cooldown_seconds": -1.0},
    ],
)
def test_invalid_policies_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ScalingPolicy(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "bounds"), [(0, (0, 1)), (1, (0, 2)), (4, (2, 8)), (10, (5, 20))])
def test_rate_bounds_at_default_rates(n: int, bounds: tuple[int, int]) -> None:
    assert rate_bounds(ScalingPolicy(), n) == bounds


# -- metric window -------------------------------------------------------------------------------


def test_window_averages_the_samples_inside_the_window() -> None:
    window = window_of((0.0, 50.0, 1.0), (60.0, 120.0, 4.0))  # 6 samples of 1, 7 of 4
    assert window.average(120.0, 180.0) == pytest.approx((6 * 1 + 7 * 4) / 13)
    assert window.average(120.0, 60.0) == pytest.approx(4.0)  # (60, 120]: 60 itself is out
    assert window.average(120.0, 61.0) == pytest.approx(4.0)
    assert window.average(120.0, 75.0) == pytest.approx((1 + 7 * 4) / 8)  # 50 is in (45, 120]
    assert window.average(55.0, 10.0) == pytest.approx(1.0)  # samples after now are not counted


def test_window_is_empty_without_samples_in_range_and_trims_to_the_stable_window() -> None:
    window = MetricWindow(180.0)
    assert window.average(10.0, 60.0) is None
    window.add(0.0, 5.0)
    assert window.average(100.0, 60.0) is None
    assert window.average(100.0, 180.0) == 5.0
    for t in range(10, 400, 10):
        window.add(float(t), 1.0)
    assert len(window) == 18  # (210, 390]
    with pytest.raises(ValueError):
        window.add(100.0, 1.0)


# -- KPA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (40.0, 4),  # on target
        (44.0, 4),  # 11 per replica: the top of the band
        (44.5, 5),  # just above: ceil(4.45)
        (36.0, 4),  # 9 per replica: the bottom of the band
        (35.0, 4),  # below the band, but ceil(3.5) is 4
        (29.0, 3),
        (12.0, 2),  # ceil(1.2) = 2
        (4.0, 2),  # ceil(0.4) = 1, floored at n / 2
        (60.0, 6),  # 1.5x: no panic
    ],
)
def test_kpa_tolerance_band_and_stable_desire(total: float, expected: int) -> None:
    policy = ScalingPolicy(target_value=10.0, **ROOMY)
    decision = kpa(policy, flat(total), 4, 300.0, ScalerState())
    assert decision == Decision(expected, decision.reason, panic=False)


@pytest.mark.parametrize(
    ("n", "total", "expected"),
    [
        (1, 50.0, 2),  # wants 5: capped at max(1, ceil(2 x 1))
        (4, 100.0, 8),  # wants 10: capped at 8
        (10, 300.0, 20),  # wants 30: capped at 20
        (0, 300.0, 1),  # from zero: max(1, 0)
        (1, 0.0, 0),  # floor(1 / 2)
        (4, 0.0, 2),
        (10, 0.0, 5),
    ],
)
def test_kpa_and_apa_rate_caps(n: int, total: float, expected: int) -> None:
    policy = ScalingPolicy(target_value=10.0, **ROOMY)
    assert kpa(policy, flat(total), n, 300.0, ScalerState()).desired == expected
    assert apa(policy, flat(total), n, 300.0, ScalerState()).desired == expected


def test_kpa_panic_entry_hold_and_exit() -> None:
    policy = ScalingPolicy(target_value=10.0, scale_down_cooldown_seconds=0.0, **ROOMY)
    state = ScalerState()
    # Steady at 20 (two replicas on target), then 100 over the last panic window.
    window = window_of((0.0, 120.0, 20.0), (130.0, 180.0, 100.0))
    entry = kpa(policy, window, 2, 180.0, state)
    assert entry.panic and entry.desired == 4  # the panic window wants 10 (5x): capped at 2 x 2
    assert state.panic_until == 180.0 + 180.0
    assert state.max_panic_replicas == 4

    # Still over the threshold with 4 replicas (wants 10 >= 2 x 4): the panic is extended.
    window.add(190.0, 100.0)
    again = kpa(policy, window, 4, 190.0, state)
    assert again.panic and again.desired == 8
    assert state.panic_until == 190.0 + 180.0

    # The load collapses: below the threshold, but panic holds until panic_until and never scales down.
    for t in range(200, 371, 10):
        window.add(float(t), 5.0)
    for now in (200.0, 300.0, 370.0):
        held = kpa(policy, window, 8, now, state)
        assert held.panic and held.desired == 8, now
    assert state.panic_until == 370.0

    # Past panic_until and below the threshold: panic ends and the stable desire applies.
    window.add(380.0, 5.0)
    out = kpa(policy, window, 8, 380.0, state)
    assert not out.panic
    assert state.panic_until is None and state.max_panic_replicas == 0
    assert out.desired == 4  # wants 1: floored at 8 / 2


def test_kpa_never_scales_down_in_panic_even_when_the_stable_window_would() -> None:
    policy = ScalingPolicy(target_value=10.0, scale_down_cooldown_seconds=0.0, **ROOMY)
    state = ScalerState(panic_until=500.0, max_panic_replicas=6)
    decision = kpa(policy, flat(10.0, now=300.0), 6, 300.0, state)  # one replica's worth
    assert decision.panic and decision.desired == 6


def test_kpa_uses_the_stable_average_when_the_panic_window_is_empty() -> None:
    policy = ScalingPolicy(target_value=10.0, **ROOMY)
    window = window_of((100.0, 200.0, 50.0))
    decision = kpa(policy, window, 5, 290.0, ScalerState())  # panic window (230, 290] is empty
    assert decision == Decision(5, decision.reason)  # 50 over 5 replicas: on target, no panic


# -- APA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (40.0, 4),
        (44.0, 4),  # ratio 1.1: not above 1 + up_tolerance
        (44.1, 5),
        (36.0, 4),  # ratio 0.9
        (35.9, 4),  # below the band, ceil(3.59) = 4
        (30.0, 3),
        (400.0, 8),  # capped at ceil(2 x 4)
        (0.0, 2),  # floored at floor(4 / 2)
    ],
)
def test_apa_tolerance_band(total: float, expected: int) -> None:
    policy = ScalingPolicy(target_value=10.0, **ROOMY)
    decision = apa(policy, flat(total), 4, 300.0, ScalerState())
    assert decision.desired == expected
    assert not decision.panic


def test_apa_reads_the_last_panic_window_only() -> None:
    policy = ScalingPolicy(target_value=10.0, **ROOMY)
    window = window_of((0.0, 230.0, 100.0), (240.0, 300.0, 40.0))
    assert apa(policy, window, 4, 300.0, ScalerState()).desired == 4  # the old 100s are out of (240, 300]


# -- both: cooldowns, bounds, empty windows ----------------------------------------------------------


@pytest.mark.parametrize("scaler", [kpa, apa])
def test_scale_up_cooldown(scaler: Scaler) -> None:
    policy = ScalingPolicy(target_value=10.0, scale_up_cooldown_seconds=60.0, **ROOMY)
    state = ScalerState(last_scale_up=250.0)
    held = scaler(policy, flat(60.0), 4, 300.0, state)  # wants 6
    assert held.desired == 4 and "cooldown" in held.reason
    assert state.last_scale_up == 250.0
    state = ScalerState(last_scale_up=240.0)
    assert scaler(policy, flat(60.0), 4, 300.0, state).desired == 6
    assert state.last_scale_up == 300.0


@pytest.mark.parametrize("scaler", [kpa, apa])
@pytest.mark.parametrize(
    ("last_up", "last_down", "expected"),
    [
        (None, None, 2),
        (1.0, None, 4),  # 299 s after a scale-up
        (0.0, None, 2),  # 300 s after: allowed
        (None, 100.0, 4),  # 200 s after a scale-down
        (-50.0, -10.0, 2),
    ],
)
def test_scale_down_cooldown_counts_from_the_last_scale_event(
    scaler: Scaler, last_up: float | None, last_down: float | None, expected: int
) -> None:
    policy = ScalingPolicy(target_value=10.0, **ROOMY)
    state = ScalerState(last_scale_up=last_up, last_scale_down=last_down)
    decision = scaler(policy, flat(20.0), 4, 300.0, state)
    assert decision.desired == expected
    assert state.last_scale_down == (300.0 if expected < 4 else last_down)


@pytest.mark.parametrize("scaler", [kpa, apa])
@pytest.mark.parametrize(
    ("n", "total", "bounds", "last_up", "expected"),
    [
        (3, 0.0, (2, 10), None, 2),  # floor(3 / 2) = 1, raised to min
        (4, 70.0, (1, 5), None, 5),  # wants 7, lowered to max
        (12, 40.0, (1, 10), 299.0, 10),  # above a lowered max: at once, though the cooldown holds 12
        (1, 0.0, (2, 10), 299.0, 2),  # below min: at once, though the cooldown holds 1
        (1, 10.0, (3, 10), None, 3),  # below min: at once, beyond the up rate
    ],
)
def test_min_max_clamp(
    scaler: Scaler, n: int, total: float, bounds: tuple[int, int], last_up: float | None, expected: int
) -> None:
    policy = ScalingPolicy(target_value=10.0, min_replicas=bounds[0], max_replicas=bounds[1])
    decision = scaler(policy, flat(total), n, 300.0, ScalerState(last_scale_up=last_up))
    assert decision.desired == expected
    assert "clamped" in decision.reason


@pytest.mark.parametrize("scaler", [kpa, apa])
def test_empty_window_keeps_the_replicas(scaler: Scaler) -> None:
    policy = ScalingPolicy(target_value=10.0, min_replicas=2, max_replicas=6)
    state = ScalerState()
    for n, expected in ((4, 4), (1, 2), (9, 6)):
        decision = scaler(policy, MetricWindow(180.0), n, 300.0, state)
        assert decision.desired == expected
        assert "no metric sample" in decision.reason


# -- HPA-like --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("utilization", "expected"),
    [(0.5, 4), (0.55, 4), (0.56, 5), (0.45, 4), (0.44, 4), (0.3, 3), (0.8, 7)],
)
def test_hpa_tolerance(utilization: float, expected: int) -> None:
    policy = ScalingPolicy(target_value=0.5, **ROOMY)
    assert hpa_like(policy, utilization, 4, 0.0, ScalerState()).desired == expected


def test_hpa_scale_down_waits_for_the_highest_recommendation_of_300_s() -> None:
    policy = ScalingPolicy(target_value=0.5, **ROOMY)
    state = ScalerState()
    assert hpa_like(policy, 0.5, 4, 0.0, state).desired == 4
    assert hpa_like(policy, 0.1, 4, 100.0, state).desired == 4  # recommends 1; 4 was recommended at 0
    held = hpa_like(policy, 0.1, 4, 299.0, state)
    assert held.desired == 4 and "stabilised" in held.reason
    assert hpa_like(policy, 0.1, 4, 300.0, state).desired == 1  # the recommendation at 0 left the window
    assert state.last_scale_down == 300.0


def test_hpa_scale_up_is_immediate() -> None:
    policy = ScalingPolicy(target_value=0.5, **ROOMY)
    state = ScalerState()
    hpa_like(policy, 0.1, 4, 0.0, state)
    assert hpa_like(policy, 0.75, 4, 10.0, state).desired == 6


@pytest.mark.parametrize(("n", "expected"), [(1, 5), (4, 8), (10, 20), (2, 6)])
def test_hpa_scale_up_limit_double_or_plus_four(n: int, expected: int) -> None:
    policy = ScalingPolicy(target_value=0.1, **ROOMY)
    decision = hpa_like(policy, 1.0, n, 0.0, ScalerState())  # wants 10 n
    assert decision.desired == expected
    assert "limited" in decision.reason


def test_hpa_scale_up_limit_counts_the_last_15_s() -> None:
    policy = ScalingPolicy(target_value=0.1, **ROOMY)
    state = ScalerState()
    assert hpa_like(policy, 1.0, 4, 0.0, state).desired == 8
    assert state.scale_events == [(0.0, 4)]
    assert hpa_like(policy, 1.0, 8, 10.0, state).desired == 8  # the period started at 4: limit 8
    assert hpa_like(policy, 1.0, 8, 15.0, state).desired == 16  # the event at 0 is out of (0, 15]


def test_hpa_bounds_and_zero_replicas() -> None:
    policy = ScalingPolicy(target_value=0.5, min_replicas=2, max_replicas=5)
    assert hpa_like(policy, 0.9, 0, 0.0, ScalerState()).desired == 2
    assert hpa_like(policy, 1.0, 4, 0.0, ScalerState()).desired == 5
    assert hpa_like(policy, 0.0, 3, 0.0, ScalerState()).desired == 2  # recommends 0: raised to min


def test_state_survives_json() -> None:
    policy = ScalingPolicy(target_value=0.5, **ROOMY)
    state = ScalerState()
    hpa_like(policy, 0.9, 4, 0.0, state)
    burst = window_of((0.0, 120.0, 20.0), (130.0, 180.0, 100.0))
    assert kpa(ScalingPolicy(target_value=10.0, **ROOMY), burst, 2, 180.0, state).panic
    text = json.dumps(state.to_dict())
    assert ScalerState.from_dict(json.loads(text)) == state
    assert ScalerState.from_dict({"panic_until": 5.0, "unknown": 1}) == ScalerState(panic_until=5.0)


# -- properties ----------------------------------------------------------------------------------


policies = st.builds(
    ScalingPolicy,
    min_replicas=st.integers(0, 5),
    max_replicas=st.integers(5, 60),
    target_value=st.floats(0.01, 100.0),
    panic_threshold=st.floats(1.0, 4.0),
    max_scale_up_rate=st.floats(1.0, 5.0),
    max_scale_down_rate=st.floats(1.0, 5.0),
    up_tolerance=st.floats(0.0, 0.5),
    down_tolerance=st.floats(0.0, 0.5),
    scale_up_cooldown_seconds=st.sampled_from([0.0, 30.0]),
    scale_down_cooldown_seconds=st.sampled_from([0.0, 300.0]),
)
states = st.builds(
    ScalerState,
    panic_until=st.one_of(st.none(), st.floats(0.0, 800.0)),
    max_panic_replicas=st.integers(0, 100),
    last_scale_up=st.one_of(st.none(), st.floats(0.0, 600.0)),
    last_scale_down=st.one_of(st.none(), st.floats(0.0, 600.0)),
)


@settings(max_examples=400, deadline=None)
@given(
    policy=policies,
    state=states,
    n=st.integers(0, 80),
    samples=st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5000.0)), max_size=40),
    algorithm=st.sampled_from([kpa, apa]),
)
def test_desired_stays_within_bounds_and_rate_caps(
    policy: ScalingPolicy, state: ScalerState, n: int, samples: list[tuple[float, float]], algorithm: Scaler
) -> None:
    window, t = MetricWindow(policy.stable_window_seconds), 400.0
    for gap, value in samples:
        t += gap
        window.add(t, value)
    lo, hi = rate_bounds(policy, n)
    decision = algorithm(policy, window, n, t, state)
    assert policy.min_replicas <= decision.desired <= policy.max_replicas
    assert policy.clamp(lo) <= decision.desired <= policy.clamp(hi)


@settings(max_examples=300, deadline=None)
@given(
    policy=policies,
    n=st.integers(1, 80),
    history=st.lists(st.floats(0.0, 3.0), max_size=30),
    utilization=st.floats(0.0, 5.0),
)
def test_hpa_like_stays_within_bounds_and_its_up_limit(
    policy: ScalingPolicy, n: int, history: list[float], utilization: float
) -> None:
    state = ScalerState()
    for i, past in enumerate(history):  # older decisions, not applied: only the recommendations count
        hpa_like(policy, past, n, 100.0 * i, state)
        state.scale_events.clear()
    now = 100.0 * len(history)
    decision = hpa_like(policy, utilization, n, now, state)
    assert policy.min_replicas <= decision.desired <= policy.max_replicas
    assert decision.desired <= policy.clamp(max(2 * n, n + 4, n))
