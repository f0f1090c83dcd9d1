"""Every strategy on every workload, simulated: 16 engines (Llama-3.1-8B on H100) at 50/80/95% load.

    python -m bench.routing.simulation [--jobs 2] [--only WORKLOAD ...] [--strategies NAME ...]

Load is a fraction of the fleet's capacity for that workload: 16 x the highest rate one engine
sustains (``emulator.capacity.saturation_throughput``). At 80% every strategy runs; at 50% and
95% the baselines and the prefix-aware ones. The prefix-cache hit rate is compared with the oracle's
(one infinite cache that saw every earlier request, ``emulator.oracle``). ``sglang-cache-aware-model``
is our model of sglang-router's / vllm-router's ``cache_aware`` rule (``bench.routing.peer_models``);
the live benchmark runs the real routers. Every request goes through the gateway's parse path as the
OpenAI body a client sends, and is tokenized with the emulated model's tokenizer; ``NAME+events`` is
strategy NAME with the engines' KV events feeding the gateway's exact prefix index (``kv_events``).

Writes ``bench/results/routing-simulation.json``, the tables in ``docs/benchmarks/routing.md`` (between
the ``simulation`` markers) and one TTFT CDF per workload at 80% load in ``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.routing.peer_models import CacheAwareModel
from bench.routing.report import write_section
from bench.routing.runner import plot_ttft
from emulator.capacity import saturation_throughput
from emulator.oracle import oracle_hit_rate
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, generate
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.strategies import Strategy, build_strategies

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "routing-simulation.json"
DOCS = REPO / "docs" / "benchmarks"
ENGINES = 16
PROFILE = "llama-3.1-8b_h100"
LOADS = (0.5, 0.8, 0.95)
BASELINES = ("random", "round-robin", "least-request")
#: A strategy name with this suffix runs with the engines' KV events feeding the gateway's exact index.
EVENTS = "+events"
PREFIX_AWARE = (
    "prefix-cache",
    "prefix-cache-and-load",
    "inference-extension",
    *(f"{name}{EVENTS}" for name in ("prefix-cache", "prefix-cache-and-load", "inference-extension")),
    CacheAwareModel.name,
)
EVERY = (
    *BASELINES,
    "power-of-two",
    "least-queue",
    "least-kv-cache",
    "throughput",
    "least-latency",
    *PREFIX_AWARE,
    "session-affinity",
    "vtc-basic",
    "gpu-type",
)


@dataclass(frozen=True)
class Workload:
    """A named emulator workload with the knobs and the run length this benchmark uses."""

    generator: str
    options: Mapping[str, Any] = field(default_factory=dict)
    duration: float = 60.0
    #: Strategies added to the 50%/95% rows for this workload.
    specific: tuple[str, ...] = ()
    note: str = ""


WORKLOADS: dict[str, Workload] = {
    "shared-prefix": Workload(
        "shared-prefix", note="8 system prompts of 1,024 tokens: fit in every engine's cache"
    ),
    "shared-prefix-large": Workload(
        "shared-prefix",
        {"shared_prefixes": 128, "prefix_tokens": 4000},
        note="128 system prompts of 4,000 tokens: more than one engine's cache (444k tokens)",
    ),
    "multi-turn": Workload(
        "multi-turn",
        duration=180.0,
        specific=("session-affinity",),
        note="6-turn conversations, history resent each turn; 180 s to reach steady state",
    ),
    "long-document": Workload("long-document", note="questions over 8 documents of 6,000 tokens"),
    "no-sharing": Workload("no-sharing", note="unrelated 512-token prompts: nothing to share"),
    "bursty": Workload("bursty", duration=120.0, note="no sharing; diurnal ramp with 20 s bursts"),
    "lora-mix": Workload(
        "lora-mix", specific=("lora-affinity",), note="50 adapters, Zipf popularity, every engine has all"
    ),
}


def strategies_with_models(
    clock: Callable[[], float], rng: random.Random, kv_index: KvBlockIndex | None
) -> dict[str, Strategy]:
    """The gateway's strategies plus the peers' rule models, on the simulator's clock and random source
    (and, for the ``+events`` runs, the exact index the engines' KV events feed)."""
    strategies = build_strategies(clock=clock, rng=rng, kv_index=kv_index)
    model = CacheAwareModel(clock)
    strategies[model.name] = model
    return strategies


def run_one(job: tuple[str, float, float, str]) -> dict[str, Any]:
    name, load, capacity, strategy = job
    workload = WORKLOADS[name]
    spec = WorkloadSpec(
        rate=load * capacity * ENGINES, duration=workload.duration, seed=1, **workload.options
    )
    requests = list(generate(workload.generator, spec))
    started = time.perf_counter()
    base, events = strategy.removesuffix(EVENTS), strategy.endswith(EVENTS)
    result = FleetSimulator(
        FleetSpec(engines=ENGINES, profile=PROFILE, strategy=base, kv_events=events),
        strategies=strategies_with_models,
    ).run(requests)
    return {
        "workload": name,
        "load": load,
        "strategy": strategy,
        "offered_rps": spec.rate,
        "summary": result.summary(),
        "predictions": result.predictions,
        "ttft": sorted(o.ttft for o in result.outcomes) if load == 0.8 else [],
        "wall_seconds": time.perf_counter() - started,
    }


def workload_facts(name: str) -> dict[str, float]:
    workload = WORKLOADS[name]
    # Over the run's own length: multi-turn histories grow with time, so a shorter run overstates capacity.
    capacity = saturation_throughput(
        workload.generator, PROFILE, duration=workload.duration, options=workload.options
    )
    spec = WorkloadSpec(rate=0.8 * capacity * ENGINES, duration=workload.duration, seed=1, **workload.options)
    return {
        "capacity_per_engine_rps": capacity,
        "oracle_hit_rate": oracle_hit_rate(generate(workload.generator, spec)),
    }


def jobs_for(name: str, capacity: float) -> list[tuple[str, float, float, str]]:
    jobs = [(name, 0.8, capacity, s) for s in dict.fromkeys((*EVERY, *WORKLOADS[name].specific))]
    for load in (0.5, 0.95):
        jobs += [(name, load, capacity, s) for s in (*BASELINES, *PREFIX_AWARE, *WORKLOADS[name].specific)]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    parser.add_argument("--only", nargs="*", choices=list(WORKLOADS), help="workloads to (re)run")
    parser.add_argument(
        "--strategies",
        nargs="*",
        help="(re)run only these strategies, at the loads the matrix runs them; the other runs of each "
        "workload keep their last results",
    )
    args = parser.parse_args()
    report = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"workloads": {}}
    names = args.only or list(WORKLOADS)
    with ProcessPoolExecutor(args.jobs) as pool:
        facts = dict(zip(names, pool.map(workload_facts, names), strict=True))
        jobs = [job for name in names for job in jobs_for(name, facts[name]["capacity_per_engine_rps"])]
        if args.strategies:
            jobs = [job for job in jobs if job[3] in args.strategies]
        runs = {name: [] for name in names}
        for run in pool.map(run_one, jobs):
            s = run["summary"]
            print(
                f"{run['workload']:>20} {run['load']:.0%} {run['strategy']:>26}: "
                f"TTFT p50 {s['ttft_p50_ms']:8.1f} p99 {s['ttft_p99_ms']:9.1f} ms, "
                f"hit {s['prefix_hit_rate']:.3f} ({run['wall_seconds']:.0f} s)",
                flush=True,
            )
            runs[run["workload"]].append(run)
    for name in names:
        workload = WORKLOADS[name]
        if args.strategies:  # keep the runs not redone, from the last report
            redone = {(run["strategy"], run["load"]) for run in runs[name]}
            kept = report["workloads"].get(name, {}).get("runs", [])
            runs[name] = [r for r in kept if (r["strategy"], r["load"]) not in redone] + runs[name]
        if not args.strategies:  # the CDF needs every run's latencies (a report keeps only summaries)
            at_80 = {run["strategy"]: run for run in runs[name] if run["load"] == 0.8}
            plot_ttft(
                at_80, DOCS / f"routing-{name}.png", f"{name}, {ENGINES} engines, load 80% (simulation)"
            )
        report["workloads"][name] = {
            "generator": workload.generator,
            "options": dict(workload.options),
            "duration": workload.duration,
            "note": workload.note,
            **facts[name],
            "runs": [{k: v for k, v in run.items() if k != "ttft"} for run in runs[name]],
        }
    report.update(engines=ENGINES, profile=PROFILE, command="python -m bench.routing.simulation")
    RESULTS.write_text(json.dumps(report, indent=1))
    write_section("simulation", simulation_tables(report))


def simulation_tables(report: dict[str, Any]) -> str:
    """Markdown: per workload, every strategy at 80% and the core ones at 50% and 95%."""
    lines = []
    for name, data in report["workloads"].items():
        oracle = data["oracle_hit_rate"]
        lines += [
            f"#### {name}",
            "",
            f"{data['note']}. Capacity {data['capacity_per_engine_rps']:.1f} req/s per engine; "
            f"oracle hit rate {oracle:.3f}. ![TTFT CDF](routing-{name}.png)",
            "",
            "| load | strategy | TTFT p50 ms | TTFT p99 ms | TPOT p99 ms | req/s | hit rate | of oracle "
            "| cached tokens predicted exactly |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for run in sorted(data["runs"], key=lambda r: (r["load"] != 0.8, r["load"])):
            s = run["summary"]
            lines.append(
                f"| {run['load']:.0%} | {run['strategy']} | {s['ttft_p50_ms']:.1f} | "
                f"{s['ttft_p99_ms']:.1f} | {s['tpot_p99_ms']:.1f} | {s['throughput_rps']:.1f} | "
                f"{s['prefix_hit_rate']:.3f} | "
                f"{s['prefix_hit_rate'] / oracle if oracle else 0:.0%} | {_agreement(run)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _agreement(run: dict[str, Any]) -> str:
    """Share of a prefix-aware run's predictions of cached tokens that the engine met, over all indexes."""
    tallies = run.get("predictions") or {}
    made = sum(total for _, total in tallies.values())
    return f"{sum(hit for hit, _ in tallies.values()) / made:.1%}" if made else "—"


if __name__ == "__main__":
    main()
