"""Decision cost in-process: time per routing decision and memory of the prefix index.

    python -m bench.routing.decision_cost [--pods 64] [--prompt-tokens 8192] [--decisions 3000] [--no-exact]

Each decision parses a chat request body whose prompt is ``--prompt-tokens`` tokens of text (one
shared system prompt of a few hundred per tenant, then a long user document), routes it with the
gateway's own ``Router`` and releases it, as the ext_proc stream does. Before the clock starts the
index is filled to every pod's capacity (31,250 blocks, the default), so lookups run against a
full index. Memory is the index's allocation as measured by ``tracemalloc``.

Exact rows (unless ``--no-exact``; they need the tiny model of ``bench/real_vllm``, built with the vLLM
environment): the same decisions with the model's own tokenizer and chat template (``ModelTokenizer``,
prompts made of words the tiny tokenizer has as one token each) and the exact index fed with every pod's
KV events (a full engine cache of 16-token blocks per pod, every pod live). ``fresh``: each request is a
new document (nothing of it was tokenized before); ``conversation``: each request continues the same
long conversation with a new question (what the tokenizer's piece cache serves).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from bench.real_vllm import vllm_python
from bench.real_vllm.tiny_model import WORDS, built_model
from bench.routing.report import write_section
from emulator import tokens
from gateway_plugins.config import PrefixCacheSettings, RoutingSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.kv_events import BlockStored
from gateway_plugins.request_parsing import parse_body
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import build_strategies
from gateway_plugins.routing.types import Endpoint
from gateway_plugins.tokenization import ModelTokenizer

REPO = Path(__file__).resolve().parents[2]
STRATEGIES = ("least-request", "prefix-cache", "prefix-cache-and-load", "inference-extension")


def bodies(count: int, prompt_tokens: int, tenants: int, seed: int) -> list[bytes]:
    """Chat bodies: a per-tenant system prompt (256 tokens) and a fresh document filling the rest."""
    rng = random.Random(seed)
    vocab = tokens.vocabulary()
    systems = [" ".join(rng.choices(vocab.words, k=256)) for _ in range(tenants)]
    out = []
    for _ in range(count):
        document = " ".join(rng.choices(vocab.words, k=prompt_tokens - 256))
        body = {
            "model": "m",
            "messages": [
                {"role": "system", "content": rng.choice(systems)},
                {"role": "user", "content": document},
            ],
        }
        out.append(orjson.dumps(body))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def measure(args: argparse.Namespace, strategy: str, max_blocks: int) -> dict[str, float]:
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"p{i}", f"10.0.{i // 256}.{i % 256}:8000", "m") for i in range(args.pods))
    settings = RoutingSettings(prefix_cache=PrefixCacheSettings(max_blocks=max_blocks))
    strategies = build_strategies(settings)
    router = Router(registry, strategies, default_strategy=strategy)
    chosen = router.lookup(strategy)
    index = strategies["prefix-cache"].index  # type: ignore[attr-defined]
    # Fill every pod's LRU to capacity with chains of random block hashes, as after hours of traffic.
    rng = random.Random(0)
    capacity = PrefixCacheSettings().capacity_blocks
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for pod in registry.ready_pods("m"):
        for _ in range(0, capacity, max_blocks):
            index.record([rng.getrandbits(64) for _ in range(max_blocks)], pod)
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    timed = bodies(args.decisions, args.prompt_tokens, args.tenants, seed=2)
    parse, total = [], []
    gc.collect()
    for raw in timed:
        started = time.perf_counter()
        request = parse_body(Endpoint.CHAT, raw)
        parsed = time.perf_counter()
        router.release(router.route(request, chosen))
        done = time.perf_counter()
        parse.append(parsed - started)
        total.append(done - started)
    return {
        "parse_p50_us": percentile(parse, 50) * 1e6,
        "decision_p50_us": percentile(total, 50) * 1e6,
        "decision_p99_us": percentile(total, 99) * 1e6,
        "index_blocks": index.size(),
        "index_mib": memory / 2**20,
    }


def measure_exact(
    args: argparse.Namespace, strategy: str, tokenizer: ModelTokenizer, case: str
) -> dict[str, float]:
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"p{i}", f"10.0.{i // 256}.{i % 256}:8000", "m") for i in range(args.pods))
    index = KvBlockIndex(time.monotonic)
    strategies = build_strategies(RoutingSettings(), kv_index=index)
    router = Router(registry, strategies, default_strategy=strategy, tokenizers={"m": tokenizer})
    chosen = router.lookup(strategy)
    rng = random.Random(0)
    block, chain = 16, 512
    capacity = PrefixCacheSettings().capacity_blocks
    for pod in registry.ready_pods("m"):
        events = []
        for first in range(0, capacity, chain):
            ids = [rng.randrange(1024) for _ in range(block * chain)]
            hashes = tuple(range(first, first + chain))
            events.append(BlockStored(hashes, None, tuple(ids), block, medium="GPU"))
        index.apply((pod.namespace, pod.name), 0, events)
    words = rng.choices(WORDS, k=args.prompt_tokens)
    system = " ".join(words[:256])
    timed = []
    for number in range(max(50, args.decisions // 10)):
        if case == "fresh":
            document = " ".join(rng.choices(WORDS, k=args.prompt_tokens - 256))
            messages = [{"role": "system", "content": system}, {"role": "user", "content": document}]
        else:  # the same long history, a new question
            history = " ".join(words[256:-64])
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": history},
                {"role": "assistant", "content": "answer"},
                {"role": "user", "content": f"question {number} " + " ".join(rng.choices(WORDS, k=60))},
            ]
        timed.append(orjson.dumps({"model": "m", "messages": messages}))
    total = []
    tokens_seen = 0
    gc.collect()
    for raw in timed:
        started = time.perf_counter()
        request = parse_body(Endpoint.CHAT, raw)
        decision = router.route(request, chosen)
        total.append(time.perf_counter() - started)
        tokens_seen = request.prompt_tokens
        router.release(decision)
    assert router.prefix_decisions["exact"], "the exact index was not used"
    return {
        "decision_p50_us": percentile(total, 50) * 1e6,
        "decision_p99_us": percentile(total, 99) * 1e6,
        "prompt_tokens": tokens_seen,
        "index_blocks": sum(index.blocks_held(pod) for pod in registry.ready_pods("m")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--tenants", type=int, default=32)
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decision_cost.json")
    parser.add_argument(
        "--no-exact", action="store_true", help="skip the rows with a tokenizer and KV events"
    )
    args = parser.parse_args()
    rows = []
    for max_blocks in (256, 512):
        for strategy in STRATEGIES:
            row = {"strategy": strategy, "max_blocks": max_blocks, **measure(args, strategy, max_blocks)}
            rows.append(row)
            print(
                f"{strategy:>22} max_blocks {max_blocks:3d}: parse p50 {row['parse_p50_us']:6.0f} us, "
                f"parse+decision p50 {row['decision_p50_us']:6.0f} us p99 {row['decision_p99_us']:6.0f} us, "
                f"index {row['index_blocks']:,} blocks {row['index_mib']:.0f} MiB",
                flush=True,
            )
    exact_rows = []
    if not args.no_exact:
        tokenizer = ModelTokenizer.load(str(built_model(vllm_python()) / "model"))
        for case in ("fresh", "conversation"):
            for strategy in STRATEGIES[1:]:
                row = {"strategy": strategy, "case": case, **measure_exact(args, strategy, tokenizer, case)}
                exact_rows.append(row)
                print(
                    f"{strategy:>22} exact, {case:>12}: parse+tokenize+decision "
                    f"p50 {row['decision_p50_us']:6.0f} us p99 {row['decision_p99_us']:6.0f} us "
                    f"({row['prompt_tokens']} tokens)",
                    flush=True,
                )
    args.out.write_text(
        json.dumps(
            {"pods": args.pods, "prompt_tokens": args.prompt_tokens, "rows": rows, "exact_rows": exact_rows},
            indent=1,
        )
    )
    write_section("decision", decision_table(args, rows, exact_rows))


def decision_table(
    args: argparse.Namespace, rows: list[dict[str, Any]], exact_rows: list[dict[str, Any]]
) -> str:
    lines = [
        f"{args.pods} pods, chat prompts of {args.prompt_tokens:,} tokens ({args.tenants} shared system "
        "prompts), every pod's prefix index full. Times include parsing the body. Command: "
        f"`python -m bench.routing.decision_cost --pods {args.pods} --prompt-tokens {args.prompt_tokens}`.",
        "",
        "| strategy | max blocks hashed | parse p50 us | parse + decision p50 us | p99 us | index blocks "
        "| index MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['strategy']} | {r['max_blocks']} | {r['parse_p50_us']:.0f} | {r['decision_p50_us']:.0f} | "
        f"{r['decision_p99_us']:.0f} | {r['index_blocks']:,} | {r['index_mib']:.0f} |"
        for r in rows
    ]
    if exact_rows:
        lines += [
            "",
            "Exact inputs: the model's own tokenizer and chat template (the tiny model of `bench/real_vllm`) "
            "and the exact index fed by every pod's KV events (each pod's engine cache full of 16-token "
            "blocks, every pod live). `fresh`: every request a new document, tokenized from scratch; "
            "`conversation`: the same long history and a new question (the tokenizer's piece cache).",
            "",
            "| strategy | case | prompt tokens | parse + tokenize + decision p50 us | p99 us |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['strategy']} | {r['case']} | {r['prompt_tokens']:,} | {r['decision_p50_us']:.0f} "
            f"| {r['decision_p99_us']:.0f} |"
            for r in exact_rows
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
