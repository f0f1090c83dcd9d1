"""Autoscaling benchmark: a compressed day with bursts on an elastic simulated fleet.

    python -m bench.autoscaling [--workload bursty|diurnal] [--rate 70] [--duration 2400] [--cold-start 60]
        [--target-load 0.4] [--slo 2.0] [--policies static,kpa-queue,...] [--no-write]

Llama-3.1-8B on H100 engines serve a day compressed into ``--duration`` virtual seconds, with least-request
routing: ``bursty`` (the rate follows 0.3x to 1.7x of ``--rate`` over the day and alternates 20 s bursts at
1.8x with 40 s lulls at 0.6x) or ``diurnal`` (0.2x to 1x with flash crowds of 1.3-1.5x lasting 60-150 s).
Policies:

* ``static``: a fixed fleet sized for the workload's highest rate at the per-engine target (below);
* ``static-capacity``: the smallest fixed fleet that sustains the highest rate (no headroom), for reference;
* ``hpa-utilisation``: Kubernetes HPA's rule on a CPU-style utilisation (running sequences over the batch
  slots of every replica, a cold-starting one counting as idle, as HPA counts unready pods);
* ``kpa-*`` / ``apa-*``: AIBrix's KPA and APA (``controllers.autoscaling.algorithms``) on the queue length
  (waiting + running requests) and on KV-cache usage.

Every policy targets the same operating point: one engine loaded at ``--target-load`` of the highest rate
it sustains (``saturation_throughput``). The per-replica target of each metric is that metric's mean on
one engine serving that rate (measured here, in simulation, before the runs). Elastic fleets start with
the engines the first minute's mean rate needs at that target. All scalers sample the fleet every 5
virtual seconds and decide every 15 (HPA's sync period), with AIBrix's default knobs (``ScalingPolicy``)
and the same [1, ``--max-replicas``] bounds.

Writes ``bench/results/autoscaling.json``, the results section of ``docs/benchmarks/autoscaling.md`` and
``docs/benchmarks/autoscaling.png`` (unless ``--no-write``, or without the ``static`` policy).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.routing.report import write_section
from controllers.autoscaling.algorithms import (
    Decision,
    MetricWindow,
    ScalerState,
    ScalingPolicy,
    apa,
    hpa_like,
    kpa,
)
from emulator.capacity import saturation_throughput
from emulator.profile import load_profile
from emulator.results import percentile
from emulator.simulator import FleetMetrics, FleetResult, FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, bursty_rate, diurnal_rate, generate

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "autoscaling.json"
REPORT = REPO / "docs" / "benchmarks" / "autoscaling.md"
PLOT = REPO / "docs" / "benchmarks" / "autoscaling.png"

#: Fleet metrics a scaler can read (per-replica targets are calibrated in these units).
METRICS: dict[str, str] = {
    "queue": "waiting + running requests",
    "kv": "KV-cache usage",
    "utilisation": "running / max_num_seqs",
}
#: name -> (algorithm, metric); the static fleets have neither.
POLICIES: dict[str, tuple[str, str] | None] = {
    "static": None,
    "static-capacity": None,
    "hpa-utilisation": ("hpa", "utilisation"),
    "kpa-queue": ("kpa", "queue"),
    "apa-queue": ("apa", "queue"),
    "kpa-kv": ("kpa", "kv"),
    "apa-kv": ("apa", "kv"),
}
#: Workloads with a known rate curve: name -> (rate function, its maximum) for a spec.
RATE_CURVES = {"bursty": bursty_rate, "diurnal": diurnal_rate}
#: Loads (of capacity) at which one engine's metrics are measured for the report's curve.
CURVE_LOADS = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9)
SAMPLE_SECONDS = 5.0
DECIDE_SECONDS = 15.0


def metric_value(metric: str, fleet: FleetMetrics, seats_per_engine: int) -> float:
    """The fleet-wide value of ``metric`` (a total over the ready engines; utilisation is a mean)."""
    if metric == "queue":
        return float(fleet.waiting + fleet.running)
    if metric == "kv":
        return fleet.kv_usage
    return fleet.running / (seats_per_engine * fleet.replicas) if fleet.replicas else 0.0


class PolicyScaler:
    """One algorithm of ``controllers.autoscaling`` driving the simulated fleet, as the controller would:
    a sample of the fleet's metric every ``interval`` seconds, a decision every ``DECIDE_SECONDS``."""

    interval = SAMPLE_SECONDS

    def __init__(self, algorithm: str, metric: str, policy: ScalingPolicy, *, seats_per_engine: int) -> None:
        self.algorithm, self.metric, self.policy = algorithm, metric, policy
        self.seats = seats_per_engine
        self.window = MetricWindow(policy.stable_window_seconds)
        self.state = ScalerState()
        self.next_decision = -math.inf
        #: Decisions that changed the replica count: time, from, to, reason, panic.
        self.events: list[dict[str, Any]] = []

    def desired(self, metrics: FleetMetrics) -> int:
        now, current = metrics.now, metrics.replicas
        self.window.add(now, metric_value(self.metric, metrics, self.seats))
        if now < self.next_decision:
            return current
        self.next_decision = now + DECIDE_SECONDS
        decision: Decision
        if self.algorithm == "hpa":  # the mean utilisation of the last sync period, as metrics-server's
            utilisation = self.window.average(now, DECIDE_SECONDS) or 0.0
            decision = hpa_like(self.policy, utilisation, current, now, self.state)
        elif self.algorithm == "kpa":
            decision = kpa(self.policy, self.window, current, now, self.state)
        else:
            decision = apa(self.policy, self.window, current, now, self.state)
        if decision.desired != current:
            self.events.append(
                {"time": now, "from": current, "to": decision.desired, "reason": decision.reason,
                 "panic": decision.panic}
            )  # fmt: skip
        return decision.desired


@dataclass(frozen=True)
class Setup:
    """What every run shares: the workload, the per-engine operating point and the fleet sizes."""

    workload: WorkloadSpec
    rate_at: Callable[[float], float]
    peak: float  # highest arrival rate, req/s
    capacity: float  # req/s one engine sustains
    engine_rate: float  # req/s per engine at the target load
    targets: dict[str, float]  # per-replica target of each metric
    static_engines: int
    capacity_engines: int
    initial_engines: int
    seats: int  # max_num_seqs per engine
    #: One engine's metrics at each of ``CURVE_LOADS``: how far from proportional to the load they are.
    curve: list[dict[str, float]]


def calibrate(profile: str, rate: float, spec: WorkloadSpec) -> dict[str, float]:
    """Each metric's mean on one engine serving ``rate`` (Poisson, the workload's lengths), after warm-up."""
    samples: list[FleetMetrics] = []

    class Probe:
        interval = 1.0

        def desired(self, metrics: FleetMetrics) -> int:
            samples.append(metrics)
            return metrics.replicas

    options = {"prompt_tokens": spec.prompt_tokens, "output_tokens": spec.output_tokens}
    trace = generate("no-sharing", WorkloadSpec(rate=rate, duration=360.0, seed=spec.seed + 1, **options))
    FleetSimulator(FleetSpec(engines=1, profile=profile, metrics_interval=0), autoscaler=Probe()).run(trace)
    seats = load_profile(profile).max_num_seqs
    kept = [m for m in samples if 60.0 <= m.now <= 360.0]
    return {metric: sum(metric_value(metric, m, seats) for m in kept) / len(kept) for metric in METRICS}


def prepare(args: argparse.Namespace) -> Setup:
    workload = WorkloadSpec(rate=args.rate, duration=args.duration, seed=args.seed)
    rate_at, peak = RATE_CURVES[args.workload](workload)
    lengths = {"prompt_tokens": workload.prompt_tokens, "output_tokens": workload.output_tokens}
    capacity = saturation_throughput("no-sharing", args.profile, options=lengths)
    engine_rate = args.target_load * capacity
    first_minute = sum(rate_at(t / 10) for t in range(600)) / 600
    curve = [
        {"load": load, "rate": load * capacity, **calibrate(args.profile, load * capacity, workload)}
        for load in CURVE_LOADS
    ]
    return Setup(
        workload=workload,
        rate_at=rate_at,
        peak=peak,
        capacity=capacity,
        engine_rate=engine_rate,
        targets=calibrate(args.profile, engine_rate, workload),
        static_engines=math.ceil(peak / engine_rate),
        capacity_engines=math.ceil(peak / capacity),
        initial_engines=max(1, math.ceil(first_minute / engine_rate)),
        seats=load_profile(args.profile).max_num_seqs,
        curve=curve,
    )


def direction_changes(events: list[dict[str, Any]]) -> int:
    signs = [1 if e["to"] > e["from"] else -1 for e in events]
    return sum(a != b for a, b in itertools.pairwise(signs))


def run_policy(name: str, args: argparse.Namespace, setup: Setup) -> tuple[dict[str, Any], FleetResult]:
    algorithm_metric = POLICIES[name]
    scaler = None
    if algorithm_metric is None:
        engines = setup.static_engines if name == "static" else setup.capacity_engines
    else:
        algorithm, metric = algorithm_metric
        policy = ScalingPolicy(
            min_replicas=1, max_replicas=args.max_replicas, target_value=setup.targets[metric]
        )
        scaler = PolicyScaler(algorithm, metric, policy, seats_per_engine=setup.seats)
        engines = setup.initial_engines
    spec = FleetSpec(engines=engines, profile=args.profile, metrics_interval=0, cold_start=args.cold_start)
    result = FleetSimulator(spec, autoscaler=scaler).run(generate(args.workload, setup.workload))
    ttft = [o.ttft for o in result.outcomes]
    tpot = [o.tpot for o in result.outcomes if o.output_tokens > 1]
    total = len(ttft) + result.rejected
    events = scaler.events if scaler is not None else []
    provisioned = [p.provisioned for p in result.timeline] or [engines]
    row = {
        "policy": name,
        "algorithm": algorithm_metric[0] if algorithm_metric else "static",
        "metric": algorithm_metric[1] if algorithm_metric else None,
        "target_per_replica": setup.targets[algorithm_metric[1]] if algorithm_metric else None,
        "requests": total,
        "rejected": result.rejected,
        "slo_attainment": sum(t <= args.slo for t in ttft) / total if total else math.nan,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
        "tpot_p50_ms": percentile(tpot, 50) * 1000,
        "tpot_p99_ms": percentile(tpot, 99) * 1000,
        "gpu_hours": result.engine_seconds(setup.workload.duration) / 3600,
        "scale_events": len(events),
        "direction_changes": direction_changes(events),
        "panic_decisions": sum(e["panic"] for e in events),
        "max_engines": max(provisioned),
        "wall_seconds": result.wall_seconds,
        "timeline": [[p.time, p.starting, p.ready, p.draining] for p in result.timeline]
        or [[0.0, 0, engines, 0]],
        "events": events,
    }
    return row, result


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(data: dict[str, Any], command: str) -> str:
    rows, setup = data["runs"], data["setup"]
    static = next(r for r in rows if r["policy"] == "static")
    hpa = next((r for r in rows if r["algorithm"] == "hpa"), None)
    lines = [
        f"Command: `{command}` ({setup['wall_minutes']:.0f} minutes on this 2-core machine).",
        "",
        f"Workload `{setup['workload']}`: {setup['requests']:,} requests over {setup['duration_s']:g} "
        f"virtual seconds, highest rate {setup['peak_rate_rps']:.0f} req/s. One engine sustains "
        f"{setup['capacity_rps']:.1f} req/s of these requests; every policy targets "
        f"{setup['target_load']:.0%} of that, {setup['engine_rate_rps']:.1f} req/s per engine. Static fleet "
        f"{setup['static_engines']} engines (`static-capacity`: {setup['capacity_engines']}); elastic fleets "
        f"start at {setup['initial_engines']}, cold start {setup['cold_start_s']:g} s. "
        f"SLO: TTFT <= {setup['slo_s']:g} s.",
        "",
        "| policy | metric (target per replica) | SLO attainment | TTFT p50 / p99 | TPOT p50 / p99 "
        "| GPU-hours | vs static | scale events | direction changes | max engines |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        metric = "—" if r["metric"] is None else f"{METRICS[r['metric']]} ({r['target_per_replica']:.3g})"
        lines.append(
            f"| {r['policy']} | {metric} | {r['slo_attainment']:.2%} "
            f"| {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms "
            f"| {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} ms | {r['gpu_hours']:.2f} "
            f"| {r['gpu_hours'] / static['gpu_hours']:.0%} | {r['scale_events']} | {r['direction_changes']} "
            f"| {r['max_engines']} |"
        )
    if hpa is not None:
        lines += [
            "",
            "Targets of the issue, for KPA and APA: SLO attainment at least the static fleet's, at most 60% "
            "of its GPU-hours, at least 30% fewer direction changes than the HPA-like rule.",
            "",
            "| policy | SLO attainment vs static | GPU-hours vs static | direction changes vs HPA-like |",
            "|---|---|---|---|",
        ]
        for r in rows:
            if r["algorithm"] not in ("kpa", "apa"):
                continue
            gpu = r["gpu_hours"] / static["gpu_hours"]
            ours, theirs = r["direction_changes"], hpa["direction_changes"]
            fewer = f", {1 - ours / theirs:.0%} fewer" if theirs else ""
            lines.append(
                f"| {r['policy']} | {r['slo_attainment'] - static['slo_attainment']:+.2%} "
                f"({_met(r['slo_attainment'] >= static['slo_attainment'])}) | {gpu:.0%} ({_met(gpu <= 0.6)}) "
                f"| {ours} vs {theirs}{fewer} ({_met(ours <= 0.7 * theirs)}) |"
            )
    lines += [
        "",
        "One engine's metrics against its load (the calibration runs; elasticity of the queue length: "
        "d ln(queue) / d ln(rate) from the previous row):",
        "",
        "| load (of capacity) | req/s | waiting + running | KV-cache usage | running / max_num_seqs "
        "| elasticity |",
        "|---|---|---|---|---|---|",
    ]
    previous = None
    for point in setup["metric_curve"]:
        elasticity = (
            f"{math.log(point['queue'] / previous['queue']) / math.log(point['rate'] / previous['rate']):.1f}"
            if previous
            else "—"
        )
        lines.append(
            f"| {point['load']:.0%} | {point['rate']:.1f} | {point['queue']:.1f} | {point['kv']:.3f} "
            f"| {point['utilisation']:.3f} | {elasticity} |"
        )
        previous = point
    lines += ["", "![engines over time per policy](autoscaling.png)"]
    return "\n".join(lines)


def plot(data: dict[str, Any], rate_at: Callable[[float], float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = data["setup"]
    duration = setup["duration_s"]
    fig, (load_ax, fleet_ax) = plt.subplots(
        2, 1, figsize=(11, 7.5), sharex=True, gridspec_kw={"height_ratios": [1, 2.2]}
    )
    times = [duration * i / 4000 for i in range(4001)]
    minutes = [t / 60 for t in times]
    load_ax.plot(minutes, [rate_at(t) for t in times], color="black", linewidth=0.6)
    load_ax.set_ylabel("offered req/s")
    load_ax.set_title(
        f"{setup['workload']} workload (a day in {duration / 60:g} minutes) and provisioned engines"
    )
    fleet_ax.plot(
        minutes, [rate_at(t) / setup["engine_rate_rps"] for t in times], color="0.75", linewidth=0.5,
        label="offered load / per-engine target",
    )  # fmt: skip
    for row in data["runs"]:
        if row["algorithm"] == "static":
            engines = row["max_engines"]
            fleet_ax.axhline(engines, color="grey", linestyle="--" if row["policy"] == "static" else ":",
                             label=f"{row['policy']} ({engines})")  # fmt: skip
            continue
        points = [*row["timeline"], [duration, *row["timeline"][-1][1:]]]
        fleet_ax.step(
            [p[0] / 60 for p in points], [sum(p[1:]) for p in points], where="post", label=row["policy"],
            linewidth=1.3, linestyle="--" if row["metric"] == "kv" else "-",
        )  # fmt: skip
    fleet_ax.set_xlabel("virtual minutes")
    fleet_ax.set_ylabel("provisioned engines (cold-starting and draining included)")
    fleet_ax.set_xlim(0, duration / 60)
    fleet_ax.set_ylim(bottom=0)
    fleet_ax.legend(loc="upper left", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_KNOBS = (
    "workload", "rate", "duration", "cold_start", "slo", "target_load", "max_replicas", "profile", "seed",
    "policies",
)  # fmt: skip


def _flag(args: argparse.Namespace, key: str) -> str:
    value = getattr(args, key)
    return (
        f"--{key.replace('_', '-')} {value:g}"
        if isinstance(value, float)
        else f"--{key.replace('_', '-')} {value}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(RATE_CURVES), default="bursty")
    parser.add_argument("--rate", type=float, default=70.0, help="the workload's rate knob, req/s")
    parser.add_argument("--duration", type=float, default=2400.0, help="virtual seconds of the day")
    parser.add_argument("--cold-start", type=float, default=60.0, help="seconds until a new engine is ready")
    parser.add_argument("--slo", type=float, default=2.0, help="TTFT SLO, seconds")
    parser.add_argument("--target-load", type=float, default=0.4, help="per-engine target, of capacity")
    parser.add_argument("--max-replicas", type=int, default=24)
    parser.add_argument("--profile", default="llama-3.1-8b_h100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    parser.add_argument("--no-write", action="store_true", help="print only: no JSON, report or plot")
    args = parser.parse_args()
    started = time.perf_counter()

    setup = prepare(args)
    print(
        f"capacity {setup.capacity:.1f} req/s per engine, target {setup.engine_rate:.1f}; per-replica "
        f"targets {setup.targets}; static {setup.static_engines}, elastic from {setup.initial_engines}",
        flush=True,
    )
    runs = []
    for name in args.policies.split(","):
        row, _ = run_policy(name, args, setup)
        runs.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("timeline", "events")}), flush=True)

    data = {
        "setup": {
            "profile": args.profile,
            "workload": args.workload,
            "rate_rps": args.rate,
            "duration_s": args.duration,
            "peak_rate_rps": setup.peak,
            "requests": runs[0]["requests"] if runs else 0,
            "capacity_rps": setup.capacity,
            "target_load": args.target_load,
            "engine_rate_rps": setup.engine_rate,
            "targets_per_replica": setup.targets,
            "metric_curve": setup.curve,
            "static_engines": setup.static_engines,
            "capacity_engines": setup.capacity_engines,
            "initial_engines": setup.initial_engines,
            "cold_start_s": args.cold_start,
            "slo_s": args.slo,
            "sample_s": SAMPLE_SECONDS,
            "decide_s": DECIDE_SECONDS,
            "policy_knobs": asdict(ScalingPolicy(max_replicas=args.max_replicas)),
            "wall_minutes": (time.perf_counter() - started) / 60,
        },
        "runs": runs,
    }
    if args.no_write or "static" not in {r["policy"] for r in runs}:
        return
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    changed = [key for key in _KNOBS if getattr(args, key) != parser.get_default(key)]
    command = " ".join(["python -m bench.autoscaling", *(_flag(args, key) for key in changed)])
    write_section("results", report(data, command), REPORT)
    plot(data, setup.rate_at, PLOT)
    print(f"wrote {RESULTS}, {REPORT}, {PLOT}")


if __name__ == "__main__":
    main()
