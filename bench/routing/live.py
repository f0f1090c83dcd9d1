"""Live, in one run: Brickyard through Envoy vs sglang-router and vllm-router on the same emulated engines.

    python -m bench.routing.live [--engines 4] [--speed 0.25] [--duration 40] [--load 0.8]

Part 1, workloads: for each workload and each router, fresh emulated engines (Llama-3.1-8B on H100,
virtual time at ``--speed``), the router in front of them, and the same requests replayed open loop
by the same client (``emulator.replay``: streamed ``/v1/completions``, timed per token). Load is a
fraction of the engines' capacity for the workload, as in the simulation. Latencies are in the
engines' virtual time; the hit rate is the engines' own prefix-cache counters; the router's CPU per
request is from /proc (Envoy + gateway for Brickyard).

Part 2, CPU per request of the routing path alone: instant engines, a ~1 KB chat body, a fixed open
loop rate, CPU of the router processes per request (and, for vllm-router's cache_aware, the render
calls it makes to every engine per request, counted from the engines' logs).

Writes ``bench/results/routing-live.json``, the ``live`` section of ``docs/benchmarks/routing.md`` and
one TTFT CDF per workload in ``docs/benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.loadgen import open_loop
from bench.peers import PEERS, install_peers, start_peer
from bench.procstat import cpu_seconds
from bench.routing.report import write_section
from bench.routing.runner import RouterStarter, brickyard_router, plot_ttft, run_live_router
from bench.routing.simulation import WORKLOADS
from brickyard.stack import Engine, Stack
from emulator.capacity import saturation_throughput
from emulator.oracle import oracle_hit_rate
from emulator.workloads import WorkloadSpec, generate

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "routing-live.json"
DOCS = REPO / "docs" / "benchmarks"
MODEL = "llama-3.1-8b-instruct"
PROFILE = "llama-3.1-8b_h100"
BRICKYARD = ("least-request", "prefix-cache")
#: ``brickyard-exact``: with the emulated model's tokenizer and the engines' KV events.
ROUTERS = (*(f"brickyard:{s}" for s in BRICKYARD), "brickyard-exact:prefix-cache", *PEERS)
LIVE_WORKLOADS = ("shared-prefix-large", "multi-turn", "no-sharing")
CPU_BODY = json.dumps(
    {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 18},
            {"role": "user", "content": "How does an LLM-aware gateway pick an engine?"},
        ],
    }
).encode()


def peer_router(name: str) -> RouterStarter:
    def start(stack: Stack, engines: list[Engine]) -> tuple[str, list[int]]:
        url = start_peer(stack, name, [e.url for e in engines], MODEL)
        port = url.rpartition(":")[2]
        return url, [next(c.process.pid for c in stack.children if c.name.endswith(f"-{port}"))]

    return start


def router(name: str) -> RouterStarter:
    kind, _, policy = name.partition(":")
    if kind.startswith("brickyard"):
        return brickyard_router(policy, MODEL, exact=kind == "brickyard-exact")
    return peer_router(name)


def workload_runs(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in args.workloads:
        workload = WORKLOADS[name]
        capacity = saturation_throughput(workload.generator, PROFILE, options=workload.options)
        duration = args.duration * (3 if name == "multi-turn" else 1)  # conversations need time to build up
        spec = WorkloadSpec(
            rate=args.load * capacity * args.engines,
            duration=duration,
            seed=1,
            model=MODEL,
            **workload.options,
        )
        requests = list(generate(workload.generator, spec))
        runs = {}
        for name_ in args.routers:
            result = run_live_router(args, router(name_), requests)
            s = result["summary"]
            print(
                f"{name:>20} {name_:>28}: TTFT p50 {s['ttft_p50_ms']:8.1f} p99 {s['ttft_p99_ms']:9.1f} ms, "
                f"hit {s['prefix_hit_rate']:.3f}, errors {s['errors']}, "
                f"router CPU {s['router_cpu_us']:.0f} us/req, engine lag max {s['engine_lag_max_ms']:.0f} ms",
                flush=True,
            )
            runs[name_] = result
        plot_ttft(
            runs,
            DOCS / f"routing-live-{name}.png",
            f"{name}, {args.engines} engines, load {args.load:.0%} (live)",
        )
        out[name] = {
            "note": workload.note,
            "capacity_per_engine_rps": capacity,
            "offered_rps": spec.rate,
            "duration": duration,
            "requests": len(requests),
            "oracle_hit_rate": oracle_hit_rate(requests),
            "results": {r: run["summary"] for r, run in runs.items()},
        }
    return out


def cpu_runs(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per request of each routing path at a fixed rate, on instant engines."""
    out = {}
    for name in args.routers:
        with Stack(Path(tempfile.mkdtemp(prefix="bench-routing-cpu-"))) as stack:
            engines = [
                stack.start_engine(f"engine-{i}", MODEL, None, "--profile", "instant")
                for i in range(args.engines)
            ]
            base_url, pids = router(name)(stack, engines)
            url = f"{base_url}/v1/chat/completions"
            uvloop.run(open_loop([url], CPU_BODY, args.cpu_rate, 2.0))  # warm up connections and caches
            before = [cpu_seconds(pid) for pid in pids]
            result = uvloop.run(open_loop([url], CPU_BODY, args.cpu_rate, args.cpu_seconds))
            per_process = [
                (cpu_seconds(pid) - cpu) / max(result.completed, 1) * 1e6
                for pid, cpu in zip(pids, before, strict=True)
            ]
        row = result.summary()
        row["router_cpu_us"] = sum(per_process)
        # Brickyard's path is two processes: the gateway (first) and Envoy.
        row["gateway_cpu_us"] = per_process[0] if len(per_process) > 1 else None
        out[name] = row
        print(
            f"cpu {name:>28}: {row['router_cpu_us']:6.0f} us/req at {args.cpu_rate:.0f} req/s "
            f"(by process {', '.join(f'{c:.0f}' for c in per_process)}), "
            f"p50 {row['p50_ms']:.2f} ms, errors {row['errors']}",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--speed", type=float, default=0.25, help="virtual time speed of the engines")
    parser.add_argument("--duration", type=float, default=40.0, help="virtual seconds of arrivals")
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--workloads", nargs="*", default=list(LIVE_WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--routers", nargs="*", default=list(ROUTERS), choices=list(ROUTERS))
    parser.add_argument("--cpu-rate", type=float, default=400.0)
    parser.add_argument("--cpu-seconds", type=float, default=15.0)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    args.model, args.profile = MODEL, PROFILE
    install_peers()
    started = time.time()
    # Workloads not run this time keep their last results (a run may cover only some of them).
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    workloads = {**previous.get("workloads", {}), **workload_runs(args)}
    report = {
        "engines": args.engines,
        "speed": args.speed,
        "load": args.load,
        "command": " ".join(["python -m bench.routing.live", *sys.argv[1:]]),
        "workloads": workloads,
        "cpu": previous.get("cpu", {}) if args.skip_cpu else {"rate": args.cpu_rate, "rows": cpu_runs(args)},
        "wall_seconds": time.time() - started,
    }
    RESULTS.write_text(json.dumps(report, indent=1))
    write_section("live", live_tables(report))


def live_tables(report: dict[str, Any]) -> str:
    lines = [
        f"{report['engines']} emulated engines (Llama-3.1-8B on H100) at {report['speed']}x real time, "
        f"load {report['load']:.0%} of their capacity; latencies in the engines' (virtual) time. "
        f"Command: `{report['command']}`.",
        "",
    ]
    for name, data in report["workloads"].items():
        lines += [
            f"#### {name}",
            "",
            f"{data['note']}. {data['requests']} requests at {data['offered_rps']:.1f} req/s (virtual); "
            f"oracle hit rate {data['oracle_hit_rate']:.3f}. ![TTFT CDF](routing-live-{name}.png)",
            "",
            "| router | TTFT p50 ms | TTFT p99 ms | TPOT p99 ms | hit rate | errors | router CPU us/req |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for router_name, s in data["results"].items():
            lines.append(
                f"| {router_name} | {s['ttft_p50_ms']:.1f} | {s['ttft_p99_ms']:.1f} | "
                f"{s['tpot_p99_ms']:.1f} | {s['prefix_hit_rate']:.3f} | {s['errors']} | "
                f"{s['router_cpu_us']:.0f} |"
            )
        lines.append("")
    if report["cpu"]:
        lines += [
            f"#### CPU per request of the routing path ({report['cpu']['rate']:.0f} req/s, ~1 KB chat body, "
            "instant engines)",
            "",
            "| router | CPU us/req | of which the gateway (rest: Envoy) | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for router_name, row in report["cpu"]["rows"].items():
            gateway = "" if row["gateway_cpu_us"] is None else f"{row['gateway_cpu_us']:.0f}"
            lines.append(
                f"| {router_name} | {row['router_cpu_us']:.0f} | {gateway} | {row['p50_ms']:.2f} | "
                f"{row['p99_ms']:.2f} | {row['errors']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
