"""The fleet simulator: the gateway's own router in virtual time, delayed metrics, complete accounting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, generate
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import LeastRequestStrategy, build_strategies
from gateway_plugins.routing.types import PodState, RoutingRequest


def workload(name: str = "no-sharing", rate: float = 40.0, duration: float = 20.0, seed: int = 1) -> list:
    return list(
        generate(
            name, WorkloadSpec(rate=rate, duration=duration, seed=seed, prompt_tokens=256, output_tokens=64)
        )
    )


def test_every_request_completes_and_counts_are_released() -> None:
    requests = workload()
    sim = FleetSimulator(FleetSpec(engines=3, strategy="least-request"))
    result = sim.run(requests)
    assert isinstance(sim.router, Router)  # the gateway's router, not a copy
    assert len(result.outcomes) == len(requests)
    assert sum(result.routed.values()) == len(requests)
    assert all(pod.inflight == 0 for pod in sim.router.registry.ready_pods(sim.spec.model))
    assert all(o.ttft > 0 and o.e2e >= o.ttft for o in result.outcomes)
    assert sum(s.requests_finished.get("length", 0) for s in result.engine_stats) == len(requests)


def test_runs_are_deterministic() -> None:
    first = FleetSimulator(FleetSpec(engines=3, strategy="random", seed=5)).run(workload())
    second = FleetSimulator(FleetSpec(engines=3, strategy="random", seed=5)).run(workload())
    assert first.routed == second.routed
    assert [o.ttft for o in first.outcomes] == [o.ttft for o in second.outcomes]


class MetricsSpy(LeastRequestStrategy):
    """Least-request that remembers how old each pod's metrics record was when it decided."""

    ages: ClassVar[list[float]] = []
    decisions: ClassVar[int] = 0

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        MetricsSpy.decisions += 1
        for pod in pods:
            if pod.metrics is not None:
                MetricsSpy.ages.append(self.now - pod.metrics.timestamp)
        return super().score(request, pods)

    now = 0.0


def test_metrics_reach_the_router_after_the_configured_delay() -> None:
    requests = workload(rate=30.0, duration=10.0)
    spy = MetricsSpy()
    MetricsSpy.ages, MetricsSpy.decisions = [], 0
    strategies = {**build_strategies(), "spy": spy}
    sim = FleetSimulator(
        FleetSpec(engines=2, strategy="spy", metrics_interval=0.05, metrics_delay=0.1), strategies=strategies
    )

    def timed():
        for request in requests:
            spy.now = request.arrival
            yield request

    sim.run(timed())
    assert MetricsSpy.decisions == len(requests)
    assert MetricsSpy.ages
    assert min(MetricsSpy.ages) >= 0.1 - 1e-9  # never fresher than the pipeline allows
    assert max(MetricsSpy.ages) <= 0.1 + 0.05 + 1e-9  # and refreshed every scrape interval


def test_metric_records_describe_the_engines() -> None:
    sim = FleetSimulator(FleetSpec(engines=2, metrics_interval=0.05, metrics_delay=0.05))
    sim.run(workload("shared-prefix", rate=30.0, duration=10.0))
    records = [pod.metrics for pod in sim.router.registry.ready_pods(sim.spec.model)]
    assert all(r is not None for r in records)
    assert all(r.block_size == 16 and r.num_blocks > 1000 for r in records)  # type: ignore[union-attr]
    assert any(r.prefix_hit_rate > 0.5 for r in records)  # type: ignore[union-attr]


def test_least_request_beats_random_on_tail_latency_under_load() -> None:
    requests = workload(rate=140.0, duration=30.0, seed=3)
    random_p99 = FleetSimulator(FleetSpec(engines=4, strategy="random", seed=1)).run(requests).summary()
    least_p99 = FleetSimulator(FleetSpec(engines=4, strategy="least-request", seed=1)).run(requests).summary()
    assert least_p99["ttft_p99_ms"] < random_p99["ttft_p99_ms"]


def test_kv_events_feed_the_exact_index_and_predictions_hold() -> None:
    """With ``kv_events`` the engines' events (encoded and decoded as on the wire) feed the gateway's exact
    index: prefix-cache decides on it, and what it predicts cached is what the engines serve from cache."""
    requests = list(generate("shared-prefix", WorkloadSpec(rate=60, duration=30, seed=1)))
    simulator = FleetSimulator(FleetSpec(engines=4, strategy="prefix-cache", kv_events=True))
    result = simulator.run(requests)
    agreeing, made = result.predictions["exact"]
    assert made >= 0.99 * len(requests)  # all but each engine's first requests, before its first batch
    assert agreeing >= 0.99 * made
    assert simulator.kv_index is not None and simulator.kv_index.stored_blocks > 0
    plain = FleetSimulator(FleetSpec(engines=4, strategy="prefix-cache")).run(requests)
    assert "exact" not in plain.predictions
