"""The PodAutoscaler's scaling rules as pure functions over plain data.

The controller (``controllers/``) and the fleet simulator's benchmark (``bench/autoscaling``) call the same
functions: a metric window of the fleet-wide total of one metric (the sum over ready replicas: queue length,
KV-cache usage, ...), the current replica count, the time, and a small :class:`ScalerState` the caller
keeps between decisions (JSON-serialisable: ``to_dict`` / ``from_dict``). Nothing here does I/O, reads a
clock or knows Kubernetes types. Times are seconds on any monotonic scale.

Shared notation: ``n`` is the current replica count, ``target`` the policy's per-replica ``target_value``,
``ceil``/``floor`` are taken with a 1e-9 guard against float noise (``12 / 4`` is 3 replicas, not 4).

**Rate bounds** (KPA and APA, AIBrix's defaults): one decision moves from ``n`` to at most
``hi = max(1, ceil(max_scale_up_rate x n))`` (non-zero, so a fleet at zero can start) and at least
``lo = floor(n / max_scale_down_rate)``: with the default rates 2 and 2, n=1 -> [0, 2], n=4 -> [2, 8],
n=10 -> [5, 20].

**Tolerance band**: a per-replica value ``v`` is *within tolerance* when
``target x (1 - down_tolerance) <= v <= target x (1 + up_tolerance)``; only outside it does a scaler move.

**KPA** (Knative's autoscaler as AIBrix shapes it), :func:`kpa`:

1. ``stable`` = average of the window's samples in the last ``stable_window_seconds`` (180 s),
   ``panic`` = the same over ``panic_window_seconds`` (60 s; the stable average when that is empty).
   No sample in the stable window: keep ``n`` (clamped to [min, max]).
2. Stable desire: ``n`` if ``stable / n`` is within tolerance, else ``ceil(stable / target)`` clamped to
   ``[lo, hi]``. Panic desire: ``ceil(panic / target)`` clamped to ``[lo, hi]``.
3. Panic test (Knative's rule): over the threshold when ``ceil(panic / target) / max(1, n) >=
   panic_threshold`` (2.0: the panic window asks for at least twice the replicas there are).
4. Panic mode: crossing the threshold enters it (``max_panic_replicas = n``); every decision over the
   threshold sets ``panic_until = now + stable_window_seconds``, so panic lasts at least a stable window
   after it starts and after the last time the threshold was crossed. A decision below the threshold after
   ``panic_until`` leaves panic (``panic_until = None``, ``max_panic_replicas = 0``).
5. In panic the desire is ``max(stable desire, panic desire, max_panic_replicas, n)``, capped at ``hi``,
   and ratchets ``max_panic_replicas``: **never a scale-down in panic**. Outside panic it is the stable
   desire.
6. Cooldowns, then [min, max] (below).

**APA** (AIBrix's application-specific autoscaler), :func:`apa`:

1. ``current`` = average of the window's samples in the last ``panic_window_seconds`` (APA's window,
   60 s); none: keep ``n``. ``ratio = current / n / target``.
2. ``ratio > 1 + up_tolerance``: ``ceil(current / target)`` (that is ``ceil(n x ratio)``) capped at
   ``hi``; ``ratio < 1 - down_tolerance``: the same floored at ``lo``; otherwise ``n``. With ``n = 0`` the
   ratio is undefined: ``ceil(current / target)`` capped at ``hi`` (= 1).
3. Cooldowns, then [min, max].

**Cooldowns** (KPA and APA): a scale-up is held at ``n`` within ``scale_up_cooldown_seconds`` (0 s) of the
last scale-up; a scale-down is held at ``n`` within ``scale_down_cooldown_seconds`` (300 s) of the last
scale event of either direction, so replicas just added are not removed at the next dip. A held decision
says so in its reason.

**[min, max]**: the last step of every scaler clamps to ``[min_replicas, max_replicas]``; it may override
a cooldown or a rate bound (replicas above a lowered ``max_replicas`` go at once).

**Bookkeeping**: every scaler mutates the ``state`` it is given: ``last_scale_up`` / ``last_scale_down``
become ``now`` when the returned ``desired`` is above / below ``n`` (the caller is expected to apply it),
plus the KPA panic fields and the HPA history below. The caller persists the state.

**HPA-like** (Kubernetes' ``autoscaling/v2`` HorizontalPodAutoscaler with default behaviour, on a
utilisation ratio such as running sequences / ``max_num_seqs``), :func:`hpa_like`, the benchmark's
CPU-style baseline:

1. ``ratio = utilization / target``; within the tolerance band (HPA's global 0.1, here the policy's
   tolerances, 0.1 by default) the recommendation is ``n``, else ``ceil(n x ratio)``. With ``n = 0`` HPA
   is disabled: ``min_replicas``.
2. Scale-down stabilisation: recommendations of the last 300 s are kept (``state.recommendations``); the
   result is ``n`` raised to this recommendation and lowered to the largest one of the window, so it only
   goes down to the highest recommendation of the last 5 minutes (scale-up stabilisation is 0 s).
3. Scale-up limit, HPA's default policies with ``selectPolicy: Max``: at most
   ``max(2 x start, start + 4)`` where ``start`` is ``n`` minus the replicas added (plus those removed) in
   the last 15 s (``state.scale_events``); scale-down is not rate limited (100% per 15 s).
4. [min, max]. No cooldowns and no panic.

The policy's other knobs (windows, rates, panic threshold, cooldowns) do not apply to the HPA rule.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "HPA_SCALE_UP_PERIOD_SECONDS",
    "HPA_STABILIZATION_SECONDS",
    "Decision",
    "MetricWindow",
    "ScalerState",
    "ScalingPolicy",
    "apa",
    "hpa_like",
    "kpa",
    "rate_bounds",
]

_EPS = 1e-9
#: Kubernetes HPA's default ``behavior.scaleDown.stabilizationWindowSeconds``.
HPA_STABILIZATION_SECONDS = 300.0
#: Period of HPA's default scale-up policies (100% or 4 pods per 15 s, whichever is larger).
HPA_SCALE_UP_PERIOD_SECONDS = 15.0
_HPA_SCALE_UP_PODS = 4


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _floor(x: float) -> int:
    return math.floor(x + _EPS)


@dataclass(frozen=True)
class ScalingPolicy:
    """A PodAutoscaler's bounds and tunables; the defaults are AIBrix's (control-plane reference)."""

    min_replicas: int = 1
    max_replicas: int = 10
    target_value: float = 1.0  # per-replica target of the metric
    stable_window_seconds: float = 180.0
    panic_window_seconds: float = 60.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    up_tolerance: float = 0.1
    down_tolerance: float = 0.1
    scale_up_cooldown_seconds: float = 0.0
    scale_down_cooldown_seconds: float = 300.0

    def __post_init__(self) -> None:
        problems = []
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            problems.append(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        if not self.target_value > 0:
            problems.append(f"target_value must be > 0, got {self.target_value}")
        if not 0 < self.panic_window_seconds <= self.stable_window_seconds:
            problems.append("need 0 < panic_window_seconds <= stable_window_seconds")
        if not self.panic_threshold > 0:
            problems.append("panic_threshold must be > 0")
        if self.max_scale_up_rate < 1 or self.max_scale_down_rate < 1:
            problems.append("max_scale_up_rate and max_scale_down_rate must be >= 1")
        if self.up_tolerance < 0 or not 0 <= self.down_tolerance < 1:
            problems.append("need up_tolerance >= 0 and 0 <= down_tolerance < 1")
        if self.scale_up_cooldown_seconds < 0 or self.scale_down_cooldown_seconds < 0:
            problems.append("cooldowns must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    def clamp(self, replicas: int) -> int:
        """``replicas`` within ``[min_replicas, max_replicas]``."""
        return min(max(replicas, self.min_replicas), self.max_replicas)

    def within_tolerance(self, per_replica: float) -> bool:
        """Whether a per-replica value is inside ``target x [1 - down_tolerance, 1 + up_tolerance]``."""
        ratio = per_replica / self.target_value
        return 1 - self.down_tolerance - _EPS <= ratio <= 1 + self.up_tolerance + _EPS


def rate_bounds(policy: ScalingPolicy, replicas: int) -> tuple[int, int]:
    """``(floor(n / max_scale_down_rate), max(1, ceil(max_scale_up_rate x n)))``: how far one decision
    of KPA or APA may move from ``n`` replicas."""
    n = max(0, replicas)
    return _floor(n / policy.max_scale_down_rate), max(1, _ceil(policy.max_scale_up_rate * n))


class MetricWindow:
    """Time-stamped samples of the fleet-wide metric total, trimmed to the stable window.

    ``average(now, w)`` is the mean of the samples taken in ``(now - w, now]``. Samples must be added in
    time order; samples at or before ``latest - stable_window_seconds`` are dropped, since no window
    can hold them any more.
    """

    __slots__ = ("_samples", "stable_window_seconds")

    def __init__(self, stable_window_seconds: float) -> None:
        if not stable_window_seconds > 0:
            raise ValueError("stable_window_seconds must be > 0")
        self.stable_window_seconds = stable_window_seconds
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, at: float, value: float) -> None:
        samples = self._samples
        if samples and at < samples[-1][0]:
            raise ValueError(f"sample at {at} is older than the latest one ({samples[-1][0]})")
        samples.append((at, value))
        horizon = at - self.stable_window_seconds
        while samples[0][0] <= horizon:
            samples.popleft()

    def average(self, now: float, window_seconds: float) -> float | None:
        """Mean of the samples in ``(now - window_seconds, now]``; ``None`` when there is none."""
        start = now - window_seconds
        total, count = 0.0, 0
        for at, value in reversed(self._samples):
            if at <= start:
                break
            if at <= now:
                total += value
                count += 1
        return total / count if count else None

    def __len__(self) -> int:
        return len(self._samples)


@dataclass
class ScalerState:
    """What a scaler remembers between decisions; JSON-serialisable (``to_dict`` / ``from_dict``)."""

    panic_until: float | None = None  # KPA: in panic mode until this time
    max_panic_replicas: int = 0
    last_scale_up: float | None = None
    last_scale_down: float | None = None
    #: hpa_like only: ``(time, recommendation)`` of the last 300 s (scale-down stabilisation).
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    #: hpa_like only: ``(time, replica change)`` of the last 15 s (scale-up limit).
    scale_events: list[tuple[float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: pairs become two-element lists."""
        data = asdict(self)
        data["recommendations"] = [list(pair) for pair in self.recommendations]
        data["scale_events"] = [list(pair) for pair in self.scale_events]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalerState:
        """The inverse of ``to_dict``; unknown keys are ignored and missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("recommendations", "scale_events"):
            if key in values:
                values[key] = [(float(t), int(v)) for t, v in values[key]]
        return cls(**values)

    def in_panic(self, now: float) -> bool:
        """KPA: whether panic mode is on at ``now`` (it ends at the first decision below the threshold
        after ``panic_until``)."""
        return self.panic_until is not None and now <= self.panic_until


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # short human-readable, goes into Kubernetes Events
    panic: bool = False


def _settle(
    policy: ScalingPolicy,
    state: ScalerState,
    current: int,
    desired: int,
    now: float,
    *,
    reason: str,
    panic: bool = False,
    cooldowns: bool = True,
) -> Decision:
    """Cooldowns, then [min, max], then the scale-event bookkeeping: the common tail of every scaler."""
    if cooldowns and desired > current:
        last = state.last_scale_up
        if last is not None and now - last < policy.scale_up_cooldown_seconds:
            reason = f"{reason}; scale-up held by cooldown until {last + policy.scale_up_cooldown_seconds:g}s"
            desired = current
    elif cooldowns and desired < current:
        last = max((t for t in (state.last_scale_up, state.last_scale_down) if t is not None), default=None)
        if last is not None and now - last < policy.scale_down_cooldown_seconds:
            until = last + policy.scale_down_cooldown_seconds
            reason = f"{reason}; scale-down held by cooldown until {until:g}s"
            desired = current
    bounded = policy.clamp(desired)
    if bounded != desired:
        reason = f"{reason}; clamped to [{policy.min_replicas}, {policy.max_replicas}]"
    if bounded > current:
        state.last_scale_up = now
    elif bounded < current:
        state.last_scale_down = now
    return Decision(bounded, reason, panic)


def kpa(
    policy: ScalingPolicy, window: MetricWindow, current_replicas: int, now: float, state: ScalerState
) -> Decision:
    """Knative-style scaling on stable and panic window averages (rules in the module docstring)."""
    n = max(0, current_replicas)
    stable = window.average(now, policy.stable_window_seconds)
    if stable is None:
        reason = f"no metric sample in the last {policy.stable_window_seconds:g}s"
        return _settle(policy, state, n, n, now, reason=reason, panic=state.in_panic(now))
    panic_value = window.average(now, policy.panic_window_seconds)
    if panic_value is None:
        panic_value = stable
    target = policy.target_value
    lo, hi = rate_bounds(policy, n)
    stable_want, panic_want = _ceil(stable / target), _ceil(panic_value / target)
    if n > 0 and policy.within_tolerance(stable / n):
        stable_desired = n
        reason = f"stable {stable:.4g} within tolerance of {n} x {target:g}"
    else:
        stable_desired = min(max(stable_want, lo), hi)
        reason = f"stable {stable:.4g} / target {target:g} -> {stable_desired}"
    panic_desired = min(max(panic_want, lo), hi)

    if panic_want / max(1, n) >= policy.panic_threshold:
        if state.panic_until is None:
            state.max_panic_replicas = n
        state.panic_until = now + policy.stable_window_seconds
    elif state.panic_until is not None and now > state.panic_until:
        state.panic_until, state.max_panic_replicas = None, 0

    if state.panic_until is None:
        return _settle(policy, state, n, stable_desired, now, reason=reason)
    desired = min(max(stable_desired, panic_desired, state.max_panic_replicas, n), hi)
    state.max_panic_replicas = max(state.max_panic_replicas, desired)
    reason = f"panic: {policy.panic_window_seconds:g}s average {panic_value:.4g} / {target:g} -> {desired}"
    return _settle(policy, state, n, desired, now, reason=reason, panic=True)


def apa(
    policy: ScalingPolicy, window: MetricWindow, current_replicas: int, now: float, state: ScalerState
) -> Decision:
    """AIBrix's APA: the per-replica ratio to the target, outside its tolerances, capped by the rates."""
    n = max(0, current_replicas)
    current = window.average(now, policy.panic_window_seconds)
    if current is None:
        reason = f"no metric sample in the last {policy.panic_window_seconds:g}s"
        return _settle(policy, state, n, n, now, reason=reason)
    target = policy.target_value
    lo, hi = rate_bounds(policy, n)
    want = _ceil(current / target)
    if n == 0:
        desired = min(want, hi)
        reason = f"{current:.4g} with no replicas -> {desired}"
    else:
        ratio = current / n / target
        if ratio > 1 + policy.up_tolerance:
            desired = min(want, hi)
        elif ratio < 1 - policy.down_tolerance:
            desired = max(want, lo)
        else:
            desired = n
        reason = f"{current:.4g} / ({n} x {target:g}) = {ratio:.3g} -> {desired}"
    return _settle(policy, state, n, desired, now, reason=reason)


def hpa_like(
    policy: ScalingPolicy, utilization: float, current_replicas: int, now: float, state: ScalerState
) -> Decision:
    """Kubernetes HPA's rule with default behaviour on a mean utilisation ratio (module docstring)."""
    n = max(0, current_replicas)
    if n == 0:
        reason = "no replicas: HPA disabled"
        return _settle(policy, state, n, policy.min_replicas, now, reason=reason, cooldowns=False)
    ratio = utilization / policy.target_value
    recommendation = n if policy.within_tolerance(utilization) else _ceil(n * ratio)
    reason = f"utilisation {utilization:.3g} / target {policy.target_value:g} -> {recommendation}"

    horizon = now - HPA_STABILIZATION_SECONDS
    state.recommendations = [(t, r) for t, r in state.recommendations if t > horizon]
    state.recommendations.append((now, recommendation))
    highest = max(r for _, r in state.recommendations)
    desired = min(max(n, recommendation), highest)
    if desired > recommendation:
        reason = f"{reason}; stabilised at {desired} (highest of the last {HPA_STABILIZATION_SECONDS:g}s)"

    period = now - HPA_SCALE_UP_PERIOD_SECONDS
    state.scale_events = [(t, change) for t, change in state.scale_events if t > period]
    start = n - sum(change for _, change in state.scale_events)  # added ones out, removed ones back
    limit = max(2 * start, start + _HPA_SCALE_UP_PODS)
    if desired > max(limit, n):
        desired = max(limit, n)
        reason = f"{reason}; scale-up limited to {desired}"

    decision = _settle(policy, state, n, desired, now, reason=reason, cooldowns=False)
    if decision.desired != n:
        state.scale_events.append((now, decision.desired - n))
    return decision
