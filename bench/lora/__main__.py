"""Adapter density: GPU-hours of a shared LoRA fleet and of one deployment per adapter, sized by simulation.

    python -m bench.lora [--rates low=5,high=800] [--max-loras 8] [--profile llama-3.1-8b_h100]
                         [--out bench/results/lora_density.json] [--plot PNG]

For each total rate: the fewest dense engines (``lora-affinity``, ``--max-loras`` slots each) whose simulated
run meets the SLO, and the fewest engines per adapter deployment (at least one each) meeting it for that
adapter's own traffic. Prints a markdown table; writes JSON. Method: docs/benchmarks/lora.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.lora.density import DedicatedSizer, Setup, Slo, size_dedicated, size_dense
from emulator.profile import load_profile

REPO = Path(__file__).resolve().parents[2]
#: The published ModelAdapter result (AIBrix): cost of one deployment per adapter / dense LoRA serving.
PUBLISHED = {"low": 4.7, "high": 1.5}


def duration_for(rate: float, *, minimum: float, requests: int, maximum: float) -> float:
    """Seconds of arrivals: at least ``minimum``, long enough for about ``requests`` requests, at most
    ``maximum`` (low rates need long runs for a p99 over enough requests)."""
    return min(maximum, max(minimum, requests / rate))


def compare(
    setup: Setup, name: str, total: float, duration: float, sizers: dict[float, DedicatedSizer]
) -> dict[str, Any]:
    started = time.perf_counter()
    sizer = sizers.setdefault(duration, DedicatedSizer(setup, duration))
    dedicated = size_dedicated(setup, total, sizer)
    requests = setup.workload(total, duration)
    dense = size_dense(setup, requests, sizer.fleet_hint(total))
    profile = load_profile(setup.profile)
    gpus, price = profile.tensor_parallel, profile.cost_per_hour
    dedicated_engines = sum(row["engines"] for row in dedicated)
    ratio = dedicated_engines / dense.engines
    target = PUBLISHED.get(name)
    one_fewer = dense.one_fewer
    return {
        "name": name,
        "total_rate": total,
        "duration_s": duration,
        "requests": len(requests),
        "busiest_adapter_rate": dedicated[0]["rate"],
        "dense": {
            "engines": dense.engines,
            "gpu_hours_per_hour": dense.engines * gpus,
            "usd_per_hour": round(dense.engines * price, 2),
            "at_minimum": dense.at.to_json(),
            "one_fewer": one_fewer.to_json() if one_fewer else None,
            "adapter_loads_per_s": round(dense.at.adapter_loads / duration, 3),
            "trials": [dense.trials[n].to_json() for n in sorted(dense.trials)],
        },
        "per_adapter": {
            "engines": dedicated_engines,
            "gpu_hours_per_hour": dedicated_engines * gpus,
            "usd_per_hour": round(dedicated_engines * price, 2),
            "adapters_with_more_than_one_engine": sum(row["engines"] > 1 for row in dedicated),
            "deployments": dedicated,
        },
        "ratio": round(ratio, 3),
        "published_ratio": target,
        "target_met": None if target is None else ratio >= target,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def buckets_json(sizers: dict[float, DedicatedSizer]) -> list[dict[str, Any]]:
    """Every per-adapter sizing search that ran: the bucket's rate, its minimum and the trials."""
    rows = []
    for duration, sizer in sizers.items():
        for bucket in sorted(sizer.buckets):
            sizing = sizer.buckets[bucket]
            one_fewer = sizing.one_fewer
            rows.append(
                {
                    "duration_s": duration,
                    "rate": round(sizer.bucket_rate(bucket), 4),
                    "engines": sizing.engines,
                    "at_minimum": sizing.at.to_json(),
                    "one_fewer": one_fewer.to_json() if one_fewer else None,
                }
            )
    return rows


def table(scenarios: list[dict[str, Any]], setup: Setup) -> str:
    lines = [
        "| traffic | total req/s | busiest adapter req/s (its engines)"
        f" | dense engines (max_loras={setup.max_loras}) | one-deployment-per-adapter engines"
        " | GPU-h per hour: dense / per-adapter | ratio | published | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        dense, per = s["dense"], s["per_adapter"]
        target = "" if s["published_ratio"] is None else f"{s['published_ratio']}x"
        met = {None: "", True: "yes", False: "no"}[s["target_met"]]
        lines.append(
            f"| {s['name']} | {s['total_rate']:g} | {s['busiest_adapter_rate']:.1f}"
            f" ({per['deployments'][0]['engines']}) | {dense['engines']} | {per['engines']}"
            f" | {dense['gpu_hours_per_hour']} / {per['gpu_hours_per_hour']}"
            f" | {s['ratio']:.2f}x | {target} | {met} |"
        )
    lines += [
        "",
        "| traffic | dense at minimum: TTFT p99 / TPOT p99 (ms)"
        " | dense, one engine fewer: TTFT p99 / TPOT p99 (ms) | adapter loads per s (dense)"
        " | requests | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        dense = s["dense"]
        at, fewer = dense["at_minimum"], dense["one_fewer"]
        fewer_text = "n/a (1 engine)"
        if fewer is not None:
            fewer_text = f"{_ms(fewer['ttft_p99_ms'])} / {_ms(fewer['tpot_p99_ms'])}"
        lines.append(
            f"| {s['name']} | {_ms(at['ttft_p99_ms'])} / {_ms(at['tpot_p99_ms'])} | {fewer_text}"
            f" | {dense['adapter_loads_per_s']:.2f} | {s['requests']} | {s['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def plot(scenarios: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [s["total_rate"] for s in scenarios]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(rates, [s["dense"]["engines"] for s in scenarios], "o-", label="dense (lora-affinity)")
    per_adapter = [s["per_adapter"]["engines"] for s in scenarios]
    left.plot(rates, per_adapter, "s-", label="one deployment per adapter")
    left.set(xscale="log", yscale="log", xlabel="total req/s (50 adapters, Zipf)", ylabel="engines (GPUs)")
    left.legend()
    right.plot(rates, [s["ratio"] for s in scenarios], "o-", color="C2", label="simulated")
    for name, value in PUBLISHED.items():
        right.axhline(value, ls="--", color="grey")
        right.annotate(f"published {name}: {value}x", (rates[0], value), va="bottom", fontsize=8)
    right.set(xscale="log", yscale="log", xlabel="total req/s", ylabel="GPU-hours, per-adapter / dense")
    right.set_yticks([1, 1.5, 2, 3, 4.7, 10, 20, 50], ["1", "1.5", "2", "3", "4.7", "10", "20", "50"])
    right.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_rates(text: str) -> list[tuple[str, float]]:
    """``low=5,20,high=800`` -> [("low", 5.0), ("20", 20.0), ("high", 800.0)]."""
    out = []
    for item in text.split(","):
        name, _, value = item.rpartition("=")
        out.append((name or value, float(value)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="low=5,high=800", help="total req/s, optionally named (low, high)")
    parser.add_argument("--profile", default="llama-3.1-8b_h100")
    parser.add_argument("--max-loras", type=int, default=8, help="adapter slots per dense engine")
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--ttft-p99-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-p99-ms", type=float, default=100.0)
    parser.add_argument("--min-duration", type=float, default=120.0)
    parser.add_argument("--requests", type=int, default=18000, help="aim for this many requests per run")
    parser.add_argument("--max-duration", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lora_density.json")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    setup = Setup(
        profile=args.profile,
        adapters=args.adapters,
        zipf_s=args.zipf,
        max_loras=args.max_loras,
        seed=args.seed,
        slo=Slo(args.ttft_p99_ms, args.tpot_p99_ms),
    )
    sizers: dict[float, DedicatedSizer] = {}
    scenarios = []
    for name, rate in parse_rates(args.rates):
        duration = duration_for(
            rate, minimum=args.min_duration, requests=args.requests, maximum=args.max_duration
        )
        scenario = compare(setup, name, rate, duration, sizers)
        scenarios.append(scenario)
        print(
            f"{name}: {rate:g} req/s: dense {scenario['dense']['engines']}, per-adapter"
            f" {scenario['per_adapter']['engines']}, ratio {scenario['ratio']:.2f}"
            f" ({scenario['wall_seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    profile = load_profile(setup.profile)
    report = {
        "command": " ".join(["python -m bench.lora", *(sys.argv[1:] if argv is None else argv)]),
        "setup": {
            "profile": setup.profile,
            "gpu": profile.gpu,
            "gpus_per_engine": profile.tensor_parallel,
            "usd_per_gpu_hour": profile.cost_per_hour / profile.tensor_parallel,
            "lora_load_s": profile.lora_load_s,
            "lora_slowdown": profile.lora_slowdown,
            "adapters": setup.adapters,
            "zipf_s": setup.zipf_s,
            "prompt_tokens_mean": setup.prompt_tokens,
            "output_tokens_mean": setup.output_tokens,
            "dense_max_loras": setup.max_loras,
            "dense_strategy": "lora-affinity",
            "per_adapter_strategy": "least-request",
            "seed": setup.seed,
            "bucket_ratio": setup.bucket_ratio,
        },
        "slo": {"ttft_p99_ms": setup.slo.ttft_p99_ms, "tpot_p99_ms": setup.slo.tpot_p99_ms},
        "scenarios": scenarios,
        "per_adapter_buckets": buckets_json(sizers),
        "table": table(scenarios, setup),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(scenarios, args.plot)
    print(report["table"])


if __name__ == "__main__":
    main()
