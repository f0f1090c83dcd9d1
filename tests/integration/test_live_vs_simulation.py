"""The same workload on live emulated engines (behind Envoy and the gateway) and in the simulator.

Live mode runs the engines at a quarter of real time so that the HTTP path (client, Envoy, gateway,
the engines' own HTTP layer), which the simulator does not model, weighs a quarter as much in virtual
time. The tests compare what the engines measure (TTFT, TPOT, cache hits, in virtual time) and the
throughput; the client-side TTFT, which adds the HTTP path and so the machine's load, is a benchmark
figure (``python -m bench.routing --live``, docs/emulator.md), not a test.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench.routing.runner import requests, run_live, run_simulated, workload_spec
from emulator.capacity import saturation_throughput

pytestmark = pytest.mark.slow


def both_modes(workload: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    args = argparse.Namespace(
        workload=workload,
        trace=None,
        engines=2,
        strategy=["least-request"],
        option=[],
        duration=5.0,
        load=0.5,
        profile="llama-3.1-8b_h100",
        model="bench-model",
        seed=0,
        speed=0.25,
    )
    trace = requests(args, workload_spec(args, saturation_throughput(args.workload, args.profile)))
    simulated = run_simulated(args, "least-request", trace)["summary"]
    live = run_live(args, "least-request", trace)["summary"]
    assert live["errors"] == 0
    assert live["requests"] == simulated["requests"] == len(trace)
    return simulated, live, len(trace)


#: The engines measure in virtual time, but requests reach a live engine when the loaded machine lets them,
#: which changes how they batch: margins that hold on a busy 2-core machine, wide enough for that and
#: narrow enough to catch an engine model that drifted (the benchmark reports the measured agreement).
ENGINE_TTFT = 0.15
ENGINE_TPOT = 0.10


def test_no_sharing_agrees_on_ttft_and_throughput() -> None:
    simulated, live, _ = both_modes("no-sharing")
    assert live["engine_ttft_mean_ms"] == pytest.approx(simulated["ttft_mean_ms"], rel=ENGINE_TTFT)
    assert live["tpot_p50_ms"] == pytest.approx(simulated["tpot_p50_ms"], rel=ENGINE_TPOT)
    assert live["throughput_rps"] == pytest.approx(simulated["throughput_rps"], rel=0.15)


def test_shared_prefix_agrees_on_cache_hits() -> None:
    simulated, live, _ = both_modes("shared-prefix")
    assert simulated["prefix_hit_rate"] > 0.5
    assert live["prefix_hit_rate"] == pytest.approx(simulated["prefix_hit_rate"], abs=0.02)
    assert live["engine_ttft_mean_ms"] == pytest.approx(simulated["ttft_mean_ms"], rel=ENGINE_TTFT)
