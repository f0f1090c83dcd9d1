"""Running one workload through strategies, simulated or live: the pieces of ``python -m bench.routing``
and of the routing matrices (``bench.routing.simulation``, ``bench.routing.live``).

Simulation runs the fleet simulator in virtual time. ``--live`` starts real
processes on loopback (emulated engines, the gateway, Envoy) and replays the
same workload through Envoy. Load is a fraction of the fleet's capacity for
that workload: N engines times the highest rate one engine sustains without
its queue growing, measured in simulation.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emulator.results import RequestOutcome, summarize
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadRequest, WorkloadSpec, generate, read_trace

if TYPE_CHECKING:
    from brickyard.stack import Engine, Stack


def workload_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> WorkloadSpec overrides, typed like the fields they set."""
    fields = {f.name: f for f in dataclasses.fields(WorkloadSpec)}
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields or key in ("rate", "duration", "seed", "model"):
            raise SystemExit(f"--option {pair!r}: expected KEY=VALUE with KEY one of the workload knobs")
        options[key] = float(value) if fields[key].type in ("float", float) else int(value)
    return options


def workload_spec(args: argparse.Namespace, capacity: float) -> WorkloadSpec:
    return WorkloadSpec(
        rate=args.load * capacity * args.engines,
        duration=args.duration,
        seed=args.seed,
        model=args.model,
        **workload_options(args.option),
    )


def requests(args: argparse.Namespace, spec: WorkloadSpec) -> list[WorkloadRequest]:
    if args.trace:
        return list(read_trace(Path(args.trace), model=args.model))
    return list(generate(args.workload, spec))


def run_simulated(args: argparse.Namespace, strategy: str, workload: list[WorkloadRequest]) -> dict[str, Any]:
    spec = FleetSpec(
        engines=args.engines, profile=args.profile, model=args.model, strategy=strategy, seed=args.seed
    )
    result = FleetSimulator(spec).run(workload)
    return {"summary": result.summary(), "ttft": sorted(o.ttft for o in result.outcomes)}


#: Starts a router in front of the engines on a stack; returns its base URL and the pids whose CPU it costs.
RouterStarter = Callable[["Stack", list["Engine"]], tuple[str, list[int]]]


def brickyard_router(strategy: str, model: str, *, exact: bool = False) -> RouterStarter:
    """Envoy + the gateway (AIBrix contract) routing ``model`` with ``strategy`` by default; ``exact``: with
    the emulated model's tokenizer and the engines' KV events (``brickyard.stack.exact_inputs_settings``)."""

    def start(stack: Stack, engines: list[Engine]) -> tuple[str, list[int]]:
        from brickyard.stack import exact_inputs_settings

        endpoints = stack.write_endpoints(engines, model, stack.workdir / "endpoints.yaml")
        settings = ["--config", str(exact_inputs_settings(stack.workdir, model))] if exact else []
        gateway = stack.start_gateway(
            "aibrix",
            endpoints,
            "--default-strategy",
            strategy,
            *settings,
            name="gateway",
            log_level="warning",
        )
        port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="envoy")
        return f"http://127.0.0.1:{port}", [stack.pid("gateway"), stack.pid("envoy")]

    return start


def run_live(args: argparse.Namespace, strategy: str, workload: list[WorkloadRequest]) -> dict[str, Any]:
    """``workload`` through Envoy and the gateway routing with ``strategy``, on fresh emulated engines."""
    return run_live_router(args, brickyard_router(strategy, args.model), workload)


def run_live_router(
    args: argparse.Namespace, start_router: RouterStarter, workload: list[WorkloadRequest]
) -> dict[str, Any]:
    """``workload`` through whatever router ``start_router`` puts in front of fresh emulated engines.

    Latencies are reported in the engines' virtual time (real seconds x ``args.speed``), like the
    simulator's; ``router_cpu_us`` is the router processes' CPU time per request, in real time.
    """
    import asyncio

    from bench.procstat import total_cpu
    from brickyard.stack import Stack
    from emulator.replay import replay

    with Stack(Path(tempfile.mkdtemp(prefix="bench-routing-"))) as stack:
        engines = [
            stack.start_engine(
                f"engine-{i}",
                args.model,
                None,
                "--profile",
                args.profile,
                "--speed",
                str(args.speed),
                "--enable-lora",
                kv_events=True,  # for the exact router; every router gets the same engines
            )
            for i in range(args.engines)
        ]
        base_url, pids = start_router(stack, engines)
        urls = [e.url for e in engines]
        before = _engine_counters(urls)
        cpu_before = total_cpu(pids)
        # Virtual time runs ``speed`` times faster on the engines: compress the arrivals to match.
        scaled = [
            WorkloadRequest(
                r.arrival / args.speed, r.prompt_ids, r.max_tokens, r.model, r.user, r.session, r.text
            )
            for r in workload
        ]
        outcomes, wall = asyncio.run(replay(scaled, base_url))
        router_cpu = total_cpu(pids) - cpu_before
        after = _engine_counters(urls)
        lag = max(_get_json(f"{url}/emulator/status")["lag_max_seconds"] for url in urls)
    speed = args.speed
    virtual = [
        RequestOutcome(
            o.arrival * speed, o.ttft * speed, o.e2e * speed, o.output_tokens, o.prompt_tokens, o.pod, ok=o.ok
        )
        for o in outcomes
    ]
    ok = [o for o in virtual if o.ok]
    duration = max((o.arrival + o.e2e for o in ok), default=0.0) - min(
        (o.arrival for o in virtual), default=0.0
    )
    delta = {key: after[key] - before[key] for key in after}
    summary = summarize(
        virtual, duration=duration, prefix_hits=int(delta["hits"]), prefix_queries=int(delta["queries"])
    )
    # The engines' own TTFT (virtual seconds): the client's figure adds HTTP, Envoy and the gateway on top.
    summary["engine_ttft_mean_ms"] = (
        delta["ttft_sum"] / delta["ttft_count"] * 1000 if delta["ttft_count"] else 0.0
    )
    summary["engine_lag_max_ms"] = lag * 1000
    summary["router_cpu_us"] = router_cpu / max(len(outcomes), 1) * 1e6
    summary["wall_seconds"] = wall
    return {"summary": summary, "ttft": sorted(o.ttft for o in ok)}


def _get_json(url: str) -> Any:
    import httpx

    return httpx.get(url).json()


def _engine_counters(urls: list[str]) -> dict[str, float]:
    """Prefix-cache hits and queries, and the engines' own TTFT sum and count, summed over the engines."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys(("hits", "queries", "ttft_sum", "ttft_count"), 0.0)
    names = {
        "vllm:prefix_cache_hits_total": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:time_to_first_token_seconds_sum": "ttft_sum",
        "vllm:time_to_first_token_seconds_count": "ttft_count",
    }
    for url in urls:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for sample in family.samples:
                if sample.name in names:
                    totals[names[sample.name]] += sample.value
    return totals


def plot_ttft(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        ttft = result["ttft"]
        axes.plot([t * 1000 for t in ttft], [(i + 1) / len(ttft) for i in range(len(ttft))], label=name)
    axes.set_xscale("log")
    axes.set_xlabel("TTFT (ms)")
    axes.set_ylabel("fraction of requests")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
