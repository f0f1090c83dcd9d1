"""Qualitative vLLM behaviour that must emerge from the mechanics (scheduler, KV cache, step time),
not be scripted: each test sets up the situation and checks the effect a vLLM operator would see."""

import math
import random
import statistics

import pytest

from emulator.engine import EngineCore, Request, RequestResult
from emulator.profile import load_profile

H100 = load_profile("llama-3.1-8b_h100")
L4 = load_profile("llama-3.1-8b_l4")


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(length)]


def run(engine: EngineCore, requests: list[Request]) -> dict[str, RequestResult]:
    """Serve requests arriving at their ``arrival`` times; results by id."""
    results, now = {}, 0.0
    for request in sorted(requests, key=lambda r: r.arrival or 0.0):
        arrival = request.arrival or 0.0
        out = engine.advance(now, arrival)
        results.update((r.request_id, r) for r in out.finished)
        now = max(out.end, arrival)
        engine.add_request(request, arrival)
    results.update((r.request_id, r) for r in engine.advance(now, math.inf).finished)
    return results


def test_prefix_cache_hit_cuts_ttft() -> None:
    system = prompt(1, 3000)
    results = run(
        EngineCore(H100),
        [
            Request("cold", system + prompt(2, 50), 10, arrival=0.0),
            Request("warm", system + prompt(3, 50), 10, arrival=5.0),
        ],
    )
    cold, warm = results["cold"], results["warm"]
    assert warm.cached_prompt_tokens == 3000 - 3000 % 16
    assert cold.cached_prompt_tokens == 0
    assert warm.ttft < cold.ttft / 5


def test_without_prefix_caching_nothing_is_reused() -> None:
    system = prompt(1, 3000)
    results = run(
        EngineCore(H100, enable_prefix_caching=False),
        [Request("a", system, 10, arrival=0.0), Request("b", system, 10, arrival=5.0)],
    )
    assert results["b"].cached_prompt_tokens == 0
    assert results["b"].ttft == pytest.approx(results["a"].ttft)


def throughput_and_itl(batch: int) -> tuple[float, float]:
    engine = EngineCore(H100)
    results = run(engine, [Request(f"r{i}", prompt(i, 500), 300, arrival=0.0) for i in range(batch)])
    end = max(r.finished for r in results.values())
    return batch * 300 / end, statistics.mean(r.mean_itl for r in results.values())


def test_larger_batches_raise_throughput_and_inter_token_latency() -> None:
    (tp1, itl1), (tp16, itl16), (tp128, itl128) = map(throughput_and_itl, (1, 16, 128))
    assert tp1 < tp16 < tp128
    assert tp16 > 10 * tp1  # decode is memory bound: batching is almost free at first...
    assert itl1 < itl16 < itl128
    assert itl128 > 1.5 * itl1  # ...until the KV reads of many sequences add up


def test_kv_exhaustion_causes_preemption_and_everyone_still_finishes() -> None:
    engine = EngineCore(L4)  # ~32k tokens of KV cache
    requests = [Request(f"r{i}", prompt(i, 2000), 1500, arrival=0.0) for i in range(12)]
    results = run(engine, requests)
    assert engine.stats().num_preemptions > 0
    assert sum(r.preemptions for r in results.values()) == engine.stats().num_preemptions
    assert all(r.output_tokens == 1500 for r in results.values())
    # Under the same load with room to spare nobody is preempted.
    roomy = EngineCore(H100)
    run(roomy, [Request(f"r{i}", prompt(i, 2000), 1500, arrival=0.0) for i in range(12)])
    assert roomy.stats().num_preemptions == 0


def test_kv_usage_rises_with_load() -> None:
    def usage(num_requests: int) -> float:
        engine = EngineCore(H100)
        for i in range(num_requests):
            engine.add_request(Request(f"r{i}", prompt(i, 1000), 200), 0.0)
        engine.advance(0.0, 1.5)
        return engine.stats().kv_cache_usage

    light, heavy = usage(5), usage(50)
    assert heavy > 5 * light
    assert heavy >= 50 * 63 / H100.num_blocks  # 1000 prompt tokens and some output: 63+ blocks each


def test_cold_adapter_costs_its_load_time() -> None:
    engine = EngineCore(H100, max_loras=1)
    results = run(
        engine,
        [
            Request("first", prompt(1, 200), 5, lora="sql", arrival=0.0),
            Request("again", prompt(2, 200), 5, lora="sql", arrival=1.0),
            Request("other", prompt(3, 200), 5, lora="chat", arrival=2.0),
            Request("back", prompt(4, 200), 5, lora="sql", arrival=3.0),  # evicted by "chat": cold again
        ],
    )
    warm = results["again"].ttft
    for cold in ("first", "other", "back"):
        assert abs(results[cold].ttft - warm - H100.lora_load_s) < 1e-3


def test_chunked_prefill_bounds_decode_stalls() -> None:
    def worst_gap(budget: int) -> float:
        """Longest pause between two tokens of a chat stream while a 16k-token document is prefilled."""
        engine = EngineCore(H100, max_num_batched_tokens=budget)
        engine.add_request(Request("chat", prompt(1, 100), 400), 0.0)
        now, last, worst, doc_added = 0.0, None, 0.0, False
        while engine.has_unfinished_requests:
            if not doc_added and now >= 0.5:
                engine.add_request(Request("doc", prompt(2, 16_000), 5), now)
                doc_added = True
            out = engine.step(now)
            if "chat" in out.new_tokens:
                if last is not None:
                    worst = max(worst, out.end - last)
                last = out.end
            now = out.end
        return worst

    unchunked, chunked = worst_gap(16_384), worst_gap(2048)
    # One 16k-token prefill stalls the chat stream for ~0.4 s; 2048-token chunks bound each stall.
    assert unchunked > 0.3
    assert chunked < 0.1
    assert chunked < unchunked / 4
