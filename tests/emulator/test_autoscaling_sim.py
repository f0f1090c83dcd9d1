"""The elastic fleet simulator: engines added after a cold start, removed ones drained, under a scaler."""

from __future__ import annotations

import pytest

from controllers.autoscaling.algorithms import MetricWindow, ScalerState, ScalingPolicy, apa
from emulator.simulator import FleetMetrics, FleetResult, FleetSimulator, FleetSpec
from emulator.workloads import WorkloadRequest, WorkloadSpec, generate


def requests(rate: float, duration: float, *, start: float = 0.0, seed: int = 1, output: int = 200) -> list:
    spec = WorkloadSpec(rate=rate, duration=duration, seed=seed, prompt_tokens=512, output_tokens=output)
    out = list(generate("no-sharing", spec))
    for request in out:
        request.arrival += start
    return out


def merged(*parts: list[WorkloadRequest]) -> list[WorkloadRequest]:
    return sorted((r for part in parts for r in part), key=lambda r: r.arrival)


class Scripted:
    """Wants ``plan[t]`` engines from virtual time ``t`` on (times relative to the first evaluation)."""

    interval = 5.0

    def __init__(self, plan: dict[float, int]) -> None:
        self.plan = sorted(plan.items())
        self.seen: list[FleetMetrics] = []

    def desired(self, metrics: FleetMetrics) -> int:
        self.seen.append(metrics)
        elapsed = metrics.now - self.seen[0].now
        return [count for at, count in self.plan if at <= elapsed + 1e-9][-1]


class ApaOnQueue:
    """The controller's APA on the fleet's queue length (waiting + running), decided every 5 s."""

    interval = 5.0

    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy, self.window, self.state = (
            policy,
            MetricWindow(policy.stable_window_seconds),
            ScalerState(),
        )

    def desired(self, metrics: FleetMetrics) -> int:
        self.window.add(metrics.now, metrics.waiting + metrics.running)
        return apa(self.policy, self.window, metrics.replicas, metrics.now, self.state).desired


def first_arrival_on(result: FleetResult, pod: str) -> float:
    return min(o.arrival for o in result.outcomes if o.pod == pod)


def test_scales_up_under_a_step_and_back_down_after_it() -> None:
    base = requests(4.0, 360.0)
    step = requests(110.0, 80.0, start=60.0, seed=2)  # over twice what one engine sustains
    workload = merged(base, step)
    policy = ScalingPolicy(
        min_replicas=1,
        max_replicas=8,
        target_value=40.0,
        stable_window_seconds=60.0,
        panic_window_seconds=20.0,
        scale_down_cooldown_seconds=30.0,
    )
    sim = FleetSimulator(
        FleetSpec(engines=1, cold_start=20.0, metrics_interval=0), autoscaler=ApaOnQueue(policy)
    )
    result = sim.run(workload)

    assert len(result.outcomes) == len(workload) and result.rejected == 0
    timeline = result.timeline
    assert timeline[0].ready == 1 and timeline[0].provisioned == 1
    during = [p for p in timeline if 60.0 <= p.time <= 140.0]
    assert max(p.ready for p in during) >= 3  # grew under the step
    assert any(p.starting for p in during)  # through cold starts
    assert timeline[-1].ready == 1 and timeline[-1].provisioned == 1  # and shrank after it
    assert max(p.provisioned for p in timeline if p.time >= 300.0) == 1
    busy = {o.pod for o in result.outcomes if 60.0 <= o.arrival <= 140.0}
    assert len(busy) >= 3  # new engines took requests
    # Provisioned engine-time exceeds one engine's but stays below the peak fleet's for the whole run.
    end = workload[-1].arrival
    peak = max(p.provisioned for p in timeline)
    assert end < result.engine_seconds(end) < peak * end


def test_new_engines_are_routable_only_after_the_cold_start() -> None:
    workload = requests(20.0, 60.0)
    scaler = Scripted({0.0: 1, 10.0: 2})
    result = FleetSimulator(FleetSpec(engines=1, cold_start=25.0, metrics_interval=0), autoscaler=scaler).run(
        workload
    )
    created = next(p.time for p in result.timeline if p.starting == 1)
    ready = next(p.time for p in result.timeline if p.ready == 2)
    assert ready - created == pytest.approx(25.0)
    assert first_arrival_on(result, "engine-1") >= ready
    assert scaler.seen[3].starting == 1 and scaler.seen[3].ready == 1  # what the scaler saw meanwhile
    assert scaler.seen[3].replicas == 2
    assert result.engine_seconds(60.0) == pytest.approx(60.0 + (60.0 - created))  # cold starts are paid for


def test_removed_engines_drain_their_requests_and_take_no_new_ones() -> None:
    workload = requests(60.0, 60.0, output=400)  # long replies: every engine holds requests at the cut
    sim = FleetSimulator(FleetSpec(engines=3, metrics_interval=0), autoscaler=Scripted({0.0: 3, 30.0: 1}))
    result = sim.run(workload)

    assert len(result.outcomes) == len(workload) and result.rejected == 0
    cut = next(p.time for p in result.timeline if p.draining)
    assert next(p for p in result.timeline if p.time == cut).draining == 2
    remaining = {pod.name for pod in sim.router.registry.ready_pods(sim.spec.model)}
    drained = {"engine-0", "engine-1", "engine-2"} - remaining
    assert len(remaining) == 1 and len(drained) == 2
    on_drained = [o for o in result.outcomes if o.pod in drained]
    assert all(o.arrival < cut for o in on_drained)  # no new requests after the cut
    in_flight = [o for o in on_drained if o.arrival + o.e2e > cut]
    assert len(in_flight) >= 20  # requests in flight at the cut finished on their engines
    assert all(o.output_tokens >= 1 for o in in_flight)
    last = max(o.arrival + o.e2e for o in in_flight)
    stopped = next(p for p in result.timeline if p.time > cut and p.draining == 0)
    assert stopped.time >= last - 1e-9  # a draining engine is provisioned until its last request ends
    assert result.timeline[-1].provisioned == 1
    assert all(pod.inflight == 0 for pod in sim.router.registry.states())


def test_scaling_down_cancels_cold_starts_first() -> None:
    workload = requests(10.0, 40.0)
    scaler = Scripted({0.0: 1, 5.0: 3, 10.0: 2})
    result = FleetSimulator(FleetSpec(engines=1, cold_start=30.0, metrics_interval=0), autoscaler=scaler).run(
        workload
    )
    points = {round(p.time - scaler.seen[0].now, 6): p for p in result.timeline}
    assert (points[5.0].starting, points[5.0].ready) == (2, 1)
    assert (points[10.0].starting, points[10.0].ready, points[10.0].draining) == (1, 1, 0)
    assert max(p.provisioned for p in result.timeline) == 3
    assert result.timeline[-1].ready == 2


def test_a_fleet_without_autoscaler_has_no_timeline() -> None:
    result = FleetSimulator(FleetSpec(engines=2, metrics_interval=0)).run(requests(10.0, 10.0))
    assert result.timeline == []
    assert result.engine_seconds(10.0) == 20.0
