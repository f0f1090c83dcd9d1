"""LoRA adapters in the fleet simulator: routed by name through the registry, and ``lora-affinity`` pays."""

from __future__ import annotations

from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadRequest, WorkloadSpec, generate


def lora_mix(rate: float, duration: float = 20.0) -> list[WorkloadRequest]:
    spec = WorkloadSpec(rate=rate, duration=duration, seed=1, prompt_tokens=256, output_tokens=64)
    return list(generate("lora-mix", spec))


def test_adapters_are_routed_by_name_through_the_registry() -> None:
    requests = lora_mix(rate=20.0, duration=5.0)
    sim = FleetSimulator(FleetSpec(engines=3, strategy="lora-affinity", max_loras=2))
    result = sim.run(requests)
    adapters = {r.model for r in requests}
    assert len(adapters) > 5 and sim.spec.model not in adapters
    registry = sim.router.registry
    assert set(registry.serving_models()) == adapters | {sim.spec.model}
    assert all(len(registry.ready_pods(a)) == 3 for a in adapters)  # every engine has every adapter
    assert len(result.outcomes) == len(requests) and result.rejected == 0


def test_lora_affinity_beats_least_request_with_few_adapter_slots() -> None:
    """50 adapters (Zipf), 2 slots per engine: least-request makes every engine juggle every adapter."""
    requests = lora_mix(rate=50.0)
    runs = {
        strategy: FleetSimulator(FleetSpec(engines=8, strategy=strategy, max_loras=2, seed=1))
        .run(requests)
        .summary()
        for strategy in ("least-request", "lora-affinity")
    }
    least, affinity = runs["least-request"], runs["lora-affinity"]
    assert affinity["ttft_p99_ms"] < least["ttft_p99_ms"] / 2
    assert affinity["ttft_p50_ms"] < least["ttft_p50_ms"] / 10
    assert affinity["throughput_rps"] > 1.1 * least["throughput_rps"]
