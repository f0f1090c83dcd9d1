"""The scheduler: token budget, chunked prefill, seats, preemption, LoRA slots, FCFS; and ``advance``,
which must do exactly what repeated ``step`` calls do."""

import math
import random

import pytest

from emulator import tokens
from emulator.engine import EngineCore, Request, RequestResult
from emulator.engine.core import StepOutput
from emulator.engine.request import reply_ids, reply_seed
from emulator.profile import load_profile

H100 = load_profile("llama-3.1-8b_h100")


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32_000) for _ in range(length)]


def drain(engine: EngineCore, now: float = 0.0) -> tuple[float, list[StepOutput]]:
    outs = []
    while engine.has_unfinished_requests:
        out = engine.step(now)
        outs.append(out)
        now = out.end
    return now, outs


def test_token_budget_chunks_the_last_prompt_that_does_not_fit() -> None:
    engine = EngineCore(H100, max_num_batched_tokens=2048)
    for i in range(3):
        engine.add_request(Request(f"r{i}", prompt(i, 1000), 5), 0.0)
    out = engine.step(0.0)
    assert out.new_tokens == {"r0": 1, "r1": 1}  # r2 got the last 48 tokens of the budget: no token yet
    r2 = engine.scheduler.running[2]
    assert r2.num_computed_tokens == 48
    assert out.duration == pytest.approx(H100.step_time(2048, 2048, 2 * (1000 * 1001 // 2) + 48 * 49 // 2))
    assert engine.step(out.end).new_tokens == {"r0": 1, "r1": 1, "r2": 1}


def test_chunked_prefill_of_a_long_prompt_takes_several_steps() -> None:
    engine = EngineCore(H100, max_num_batched_tokens=2048)
    engine.add_request(Request("long", prompt(1, 5000), 3), 0.0)
    outs = [engine.step(0.0)]
    while not outs[-1].new_tokens:
        outs.append(engine.step(outs[-1].end))
    assert len(outs) == 3  # 2048 + 2048 + 904 tokens
    assert engine.scheduler.running[0].num_computed_tokens == 5000


def test_max_num_seqs_limits_the_running_batch() -> None:
    engine = EngineCore(H100, max_num_seqs=2)
    for i in range(5):
        engine.add_request(Request(f"r{i}", prompt(i, 50), 4), 0.0)
    out = engine.step(0.0)
    assert set(out.new_tokens) == {"r0", "r1"}
    assert engine.stats().num_running == 2 and engine.stats().num_waiting == 3


def test_waiting_requests_are_admitted_first_come_first_served() -> None:
    # The head needs more blocks than are free: nobody behind it may overtake (FCFS head-of-line blocking).
    engine = EngineCore(H100, num_blocks=40, max_model_len=640)
    engine.add_request(Request("running", prompt(0, 320), 200), 0.0)
    now = engine.step(0.0).end
    engine.add_request(Request("big", prompt(1, 400), 10), now)
    engine.add_request(Request("small", prompt(2, 20), 10), now)
    out = engine.step(now)
    assert set(out.new_tokens) == {"running"}
    assert [r.request_id for r in engine.scheduler.waiting] == ["big", "small"]


def test_running_out_of_blocks_preempts_the_last_admitted_request() -> None:
    engine = EngineCore(H100, num_blocks=24, max_model_len=384)
    for i in range(3):
        engine.add_request(Request(f"r{i}", prompt(i, 100), 200), 0.0)  # 3 x 7 blocks now, 19 each at the end
    _, outs = drain(engine)
    results = {r.request_id: r for out in outs for r in out.finished}
    assert all(r.output_tokens == 200 for r in results.values())
    assert results["r2"].preemptions >= 1 and results["r0"].preemptions == 0
    assert engine.stats().num_preemptions == sum(r.preemptions for r in results.values())
    # The victim resumes on its own cached blocks: recomputing costs little, the lookup is counted apart.
    assert engine.kv.stats.preempted_hits > 0


def test_preempted_request_keeps_its_output_and_recomputes_the_rest() -> None:
    engine = EngineCore(H100, num_blocks=24, max_model_len=384)
    for i in range(3):
        engine.add_request(Request(f"r{i}", prompt(i, 100), 200), 0.0)
    now = 0.0
    while not engine.metrics.num_preemptions:
        now = engine.step(now).end
    victim = engine.scheduler.waiting[0]
    assert victim.num_computed_tokens == 0 and victim.block_ids == [] and victim.num_output_tokens > 0


def test_lora_slot_limit_skips_a_third_adapter_but_not_later_requests() -> None:
    engine = EngineCore(H100, max_loras=1)
    engine.add_request(Request("a1", prompt(1, 40), 3, lora="a"), 0.0)
    engine.add_request(Request("b1", prompt(2, 40), 3, lora="b"), 0.0)
    engine.add_request(Request("a2", prompt(3, 40), 3, lora="a"), 0.0)
    engine.add_request(Request("base", prompt(4, 40), 3), 0.0)
    out = engine.step(0.0)
    assert set(out.new_tokens) == {"a1", "a2", "base"}
    assert engine.stats().waiting_lora_adapters == ["b"]
    assert out.duration == pytest.approx(
        H100.step_time(120, 120, 3 * (40 * 41 // 2), lora=True) + H100.lora_load_s
    )


def test_adapter_slots_are_least_recently_used() -> None:
    engine = EngineCore(H100, max_loras=2)
    now = 0.0
    for name in ("a", "b", "a", "c"):
        engine.add_request(Request(f"{name}-{now}", prompt(0, 20), 1, lora=name), now)
        now = engine.step(now).end
    assert engine.lora_slots.resident == ["a", "c"]  # b was the least recently used


def test_abort_frees_blocks_and_reports() -> None:
    engine = EngineCore(H100)
    engine.add_request(Request("gone", prompt(1, 100), 50), 0.0)
    engine.add_request(Request("queued", prompt(2, 100), 50), 0.0)
    engine.step(0.0)
    result = engine.abort("gone", 1.0)
    assert result is not None and result.finish_reason == "abort" and result.output_tokens == 1
    assert engine.abort("queued", 1.0) is not None
    assert engine.abort("unknown", 1.0) is None
    assert engine.kv.usage == 0.0 and not engine.has_unfinished_requests
    assert engine.stats().requests_finished == {"abort": 2}


def test_rejects_requests_vllm_would_reject() -> None:
    engine = EngineCore(H100, max_model_len=1000)
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request(Request("long", prompt(0, 900), 200), 0.0)
    engine.add_request(Request("ok", prompt(0, 10), 1), 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request(Request("ok", prompt(0, 10), 1), 0.0)
    with pytest.raises(ValueError, match="KV cache"):
        EngineCore(H100, num_blocks=10, max_model_len=1000)


def test_generated_tokens_are_the_shared_deterministic_reply() -> None:
    for length in (1, 17, 100, 700):
        ids = prompt(length, length)
        reply, _ = tokens.reply(ids, 50)
        assert list(reply_ids(reply_seed(ids), 0, 50)) == reply
        assert list(reply_ids(reply_seed(ids), 20, 16)) == reply[20:36]


def test_reply_tokens_are_cached_for_the_next_turn() -> None:
    engine = EngineCore(H100)
    first = prompt(1, 100)
    engine.add_request(Request("turn1", first, 40), 0.0)
    now, _ = drain(engine)
    follow_up = first + tokens.reply(first, 40)[0] + prompt(2, 30)
    engine.add_request(Request("turn2", follow_up, 5), now)
    _, outs = drain(engine, now)
    # The prompt and reply: 140 tokens, of which the last generated one was never computed: 8 full blocks.
    assert outs[-1].finished[0].cached_prompt_tokens == 128


# -- advance() == repeated step() ----------------------------------------------------------------------------


def workload(seed: int, n: int) -> list[Request]:
    rng = random.Random(seed)
    shared = prompt(99, 64)
    requests, now = [], 0.0
    for i in range(n):
        now += rng.expovariate(6.0) if i % 40 else 3.0  # bursts, then quiet stretches of pure decode
        body = prompt(rng.randrange(10**6), rng.randint(20, 600))
        lora = rng.choice([None, None, "a", "b", "c"])
        requests.append(
            Request(f"r{i}", (shared if rng.random() < 0.5 else []) + body, rng.randint(5, 250), lora, now)
        )
    return requests


def run_by_step(engine: EngineCore, requests: list[Request]) -> list[RequestResult]:
    results, now, index = [], 0.0, 0
    while index < len(requests) or engine.has_unfinished_requests:
        while index < len(requests) and requests[index].arrival <= now:
            engine.add_request(requests[index], requests[index].arrival)
            index += 1
        if not engine.has_unfinished_requests:
            now = requests[index].arrival
            continue
        out = engine.step(now)
        results.extend(out.finished)
        now = out.end
    return results


def run_by_advance(engine: EngineCore, requests: list[Request]) -> list[RequestResult]:
    results, now = [], 0.0
    for request in requests:
        out = engine.advance(now, request.arrival)
        results.extend(out.finished)
        now = max(out.end, request.arrival)
        engine.add_request(request, request.arrival)
    results.extend(engine.advance(now, math.inf).finished)
    return results


@pytest.mark.parametrize("num_blocks", [None, 120])  # roomy, and tight enough to preempt
def test_advance_equals_repeated_step(num_blocks: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = workload(seed=5, n=160)
    kwargs = {"num_blocks": num_blocks, "max_model_len": 1024, "max_num_batched_tokens": 512, "max_loras": 2}
    stepped, advanced = EngineCore(H100, **kwargs), EngineCore(H100, **kwargs)
    jumps = []
    original = EngineCore._jump
    monkeypatch.setattr(
        EngineCore,
        "_jump",
        lambda self, out, steps, *a: jumps.append(steps) or original(self, out, steps, *a),
    )
    expected = sorted(run_by_step(stepped, requests), key=lambda r: r.request_id)
    assert not jumps
    actual = sorted(run_by_advance(advanced, requests), key=lambda r: r.request_id)
    assert sum(jumps) > 300  # many decode steps were collapsed

    assert len(actual) == len(expected) == len(requests)
    for got, want in zip(actual, expected, strict=True):
        assert (got.request_id, got.output_tokens, got.cached_prompt_tokens, got.preemptions) == (
            want.request_id, want.output_tokens, want.cached_prompt_tokens, want.preemptions
        )  # fmt: skip
        for name in ("first_scheduled", "first_token", "finished"):
            assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-9, abs=1e-9), name
    if num_blocks:
        assert stepped.metrics.num_preemptions > 0

    a, b = advanced.stats(), stepped.stats()
    for field in (
        "prefix_cache_queries",
        "prefix_cache_hits",
        "prompt_tokens",
        "generation_tokens",
        "num_preemptions",
    ):
        assert getattr(a, field) == getattr(b, field), field
    for name, histogram in a.histograms.items():
        other = b.histograms[name]
        assert histogram.counts == other.counts, name
        assert histogram.sum == pytest.approx(other.sum, rel=1e-9), name
