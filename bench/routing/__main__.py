"""``python -m bench.routing``: one workload, one or more strategies, on a simulated or a live fleet."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.routing.runner import plot_ttft, requests, run_live, run_simulated, workload_options, workload_spec
from brickyard_core import logs
from emulator.capacity import saturation_throughput
from emulator.oracle import oracle_hit_rate


def main(args: argparse.Namespace) -> None:
    capacity = saturation_throughput(
        args.workload, args.profile, seed=args.seed, options=workload_options(args.option)
    )
    spec = workload_spec(args, capacity)
    workload = requests(args, spec)
    oracle = oracle_hit_rate(workload)
    print(f"{len(workload)} requests at {spec.rate:.1f} req/s; oracle prefix-cache hit rate {oracle:.3f}")
    run = run_live if args.live else run_simulated
    results: dict[str, dict[str, Any]] = {}
    for strategy in args.strategy or ["least-request"]:
        started = time.perf_counter()
        results[strategy] = run(args, strategy, workload)
        summary = results[strategy]["summary"]
        print(
            f"{strategy:>16}: TTFT p50 {summary['ttft_p50_ms']:8.1f} ms  "
            f"p99 {summary['ttft_p99_ms']:8.1f} ms | "
            f"TPOT p50 {summary['tpot_p50_ms']:6.1f} ms  p99 {summary['tpot_p99_ms']:6.1f} ms | "
            f"{summary['throughput_rps']:7.1f} req/s | prefix hit rate {summary['prefix_hit_rate']:.3f} | "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
    report = {
        "mode": "live" if args.live else "simulation",
        "workload": args.trace or args.workload,
        "engines": args.engines,
        "profile": args.profile,
        "load": args.load,
        "capacity_per_engine_rps": capacity,
        "offered_rps": spec.rate,
        "oracle_hit_rate": oracle,
        "requests": len(workload),
        "workload_spec": asdict(spec),
        "results": {name: result["summary"] for name, result in results.items()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_ttft(results, args.plot, f"{report['workload']}, {args.engines} engines, load {args.load:.0%}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--workload",
        default="shared-prefix",
        help="shared-prefix, multi-turn, no-sharing, lora-mix, bursty or long-document",
    )
    parser.add_argument("--trace", help="JSONL trace to replay instead of a generated workload")
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument(
        "--strategy",
        action="append",
        help="strategy, preset or weighted combination; repeat to compare several (default least-request)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload knob (emulator.workloads.WorkloadSpec), e.g. shared_prefixes=128; repeatable",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (virtual)")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the fleet's capacity")
    parser.add_argument("--profile", default="llama-3.1-8b_h100")
    parser.add_argument("--model", default="llama-3.1-8b-instruct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--live", action="store_true", help="real processes on loopback instead of simulation"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="live: the emulated engines' time speed-up")
    parser.add_argument("--out", type=Path, help="write results as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the TTFT CDF per strategy here")
    return parser


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    logs.setup("bench", arguments.log_level)
    main(arguments)
