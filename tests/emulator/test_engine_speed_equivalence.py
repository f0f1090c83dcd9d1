"""The fast engine (decode group, bulk block work, decode jumps, lazy ``new_tokens``) against a plain
reference: the scheduler loop that walks every running request every step, as vLLM does, over the same KV
cache, LoRA slots, metrics and step-time model.

Random workloads (several seeds) mix shared prefixes, exact duplicates, multi-turn continuations (prompts that
hit other requests' replies), LoRA adapters over few slots, KV pressure that preempts, token budgets small
enough to chunk prefills, ``max_tokens`` of 1, and aborts. Driven by repeated ``step``, the engine must
match the reference step for step exactly (times, tokens, finished requests); driven by ``advance`` with
random ``until`` values it must produce the same per-request results and statistics (times up to float
rounding: a decode jump sums its steps in closed form).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import pytest

from emulator import tokens
from emulator.engine import EngineCore, EngineStats, Request, RequestResult
from emulator.engine.kv_cache import KVCacheManager
from emulator.engine.lora import LoraSlots
from emulator.engine.metrics import EngineMetrics
from emulator.engine.request import FINISHED_ABORT, FINISHED_LENGTH, RequestState
from emulator.engine.scheduler import Scheduler
from emulator.profile import Profile, load_profile

H100 = load_profile("llama-3.1-8b_h100")


class ReferenceEngine:
    """One engine step = one walk over every running request, then every waiting one (the plain loop)."""

    def __init__(
        self,
        profile: Profile,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_loras: int,
        enable_prefix_caching: bool,
        num_blocks: int,
    ) -> None:
        self.profile = profile
        self.kv = KVCacheManager(num_blocks, profile.block_size, enable_prefix_caching)
        self.lora_slots = LoraSlots(max_loras)
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.metrics = EngineMetrics()
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request: Request, now: float) -> None:
        state = RequestState.from_request(request, now)
        self.requests[request.request_id] = state
        self.waiting.append(state)

    def abort(self, request_id: str, now: float) -> RequestResult | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        if state in self.waiting:
            self.waiting.remove(state)
        else:
            self.running.remove(state)
            self.kv.free(state)
        self._count(FINISHED_ABORT)
        return RequestResult.of(state, now, FINISHED_ABORT)

    def step(self, now: float) -> tuple[float, dict[str, int], list[RequestResult]]:
        kv, bs, budget = self.kv, self.kv.block_size, self.budget
        scheduled: list[RequestState] = []
        preempted: list[RequestState] = []
        adapters: dict[str, None] = {}
        num_tokens = kv_read = pairs = 0
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            computed = request.num_computed_tokens
            num_new = request.num_tokens - computed
            if num_new == 1 and computed % bs:
                if kv.enable_caching and (computed + 1) % bs == 0:
                    kv.cache_full_blocks(request, computed + 1)
            else:
                num_new = min(num_new, budget)
                if not self._allocate_or_preempt(request, num_new, preempted):
                    break
                if num_new > 1:
                    pairs += num_new * computed + num_new * (num_new + 1) // 2
            request.num_computed_tokens = computed + num_new
            scheduled.append(request)
            budget -= num_new
            num_tokens += num_new
            kv_read += computed + num_new
            if request.lora is not None:
                adapters[request.lora] = None
            index += 1
        if not preempted:
            skipped: list[RequestState] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                lora = request.lora
                if lora is not None and len(adapters) >= self.lora_slots.num_slots and lora not in adapters:
                    skipped.append(self.waiting.popleft())
                    continue
                blocks, computed = kv.get_computed_blocks(request)
                num_new = min(request.num_tokens - computed, budget)
                if not kv.allocate_slots(request, num_new, blocks):
                    break
                self.waiting.popleft()
                self.running.append(request)
                if request.first_scheduled < 0:
                    request.first_scheduled, request.num_cached_tokens = now, computed
                request.num_computed_tokens = computed + num_new
                scheduled.append(request)
                budget -= num_new
                num_tokens += num_new
                kv_read += computed + num_new
                if num_new > 1:
                    pairs += num_new * computed + num_new * (num_new + 1) // 2
                if lora is not None:
                    adapters[lora] = None
            self.waiting.extendleft(reversed(skipped))
        if not scheduled:
            return now, {}, []
        loads = self.lora_slots.activate(list(adapters)) if adapters else 0
        profile, metrics = self.profile, self.metrics
        duration = profile.step_time(num_tokens, kv_read, pairs, bool(adapters))
        end = now + duration + loads * profile.lora_load_s
        metrics.num_preemptions += len(preempted)
        new_tokens: dict[str, int] = {}
        finished: list[RequestState] = []
        for request in scheduled:
            if request.num_computed_tokens < request.num_tokens:
                continue
            request.num_output_tokens += 1
            new_tokens[request.request_id] = 1
            if request.last_token < 0:
                request.first_token = end
                metrics.time_to_first_token.observe(end - request.arrival)
                metrics.prompt_tokens += request.num_prompt_tokens
            else:
                metrics.inter_token_latency.observe(end - request.last_token)
            request.last_token = end
            if request.num_output_tokens >= request.max_tokens:
                finished.append(request)
        metrics.generation_tokens += len(new_tokens)
        results = []
        for request in finished:
            self.running.remove(request)
            kv.free(request)
            del self.requests[request.request_id]
            self._count(FINISHED_LENGTH)
            metrics.e2e_request_latency.observe(end - request.arrival)
            metrics.request_queue_time.observe(request.first_scheduled - request.arrival)
            metrics.request_prefill_time.observe(request.first_token - request.first_scheduled)
            metrics.request_decode_time.observe(end - request.first_token)
            metrics.request_inference_time.observe(end - request.first_scheduled)
            results.append(RequestResult.of(request, end, FINISHED_LENGTH))
        return end, new_tokens, results

    def _allocate_or_preempt(
        self, request: RequestState, num_new: int, preempted: list[RequestState]
    ) -> bool:
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self.kv.free(victim)
            victim.num_computed_tokens = 0
            victim.num_preemptions += 1
            self.waiting.appendleft(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _count(self, reason: str) -> None:
        finished = self.metrics.requests_finished
        finished[reason] = finished.get(reason, 0) + 1


# -- workloads ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    time: float
    request: Request | None = None  # an arrival
    abort: str | None = None  # or an abort of this request id


def workload(seed: int, n: int, max_len: int, max_body: int = 500, rate: float = 8.0) -> list[Event]:
    """Bursty arrivals; shared prefixes, duplicates, continuations of earlier prompts with their replies,
    adapters; some requests aborted later (possibly before they are scheduled, or after they finished)."""
    rng = random.Random(seed)
    shared = [rng.randrange(32_000) for _ in range(rng.choice([16, 40, 64]))]
    events, prompts, now = [], [], 0.0
    for i in range(n):
        now += rng.expovariate(rate) if i % 30 else rng.uniform(0.5, 3.0)  # bursts, then pure decode
        kind = rng.random()
        max_tokens = rng.choice([1, rng.randint(2, 20), rng.randint(20, 250)])
        if prompts and kind < 0.1:
            prompt = rng.choice(prompts)  # the same prompt again: same blocks, same reply
        elif prompts and kind < 0.2:
            earlier, earlier_max = rng.choice(prompts), rng.randint(1, 60)  # a later turn of a chat
            prompt = (
                earlier + tokens.reply(earlier, earlier_max)[0] + [rng.randrange(32_000) for _ in range(8)]
            )
        else:
            body = [rng.randrange(32_000) for _ in range(rng.randint(1, max_body))]
            prompt = (shared if rng.random() < 0.5 else []) + body
        prompt = prompt[: max_len - max_tokens]
        prompts.append(prompt)
        lora = rng.choice([None, None, "a", "b", "c"])
        request = Request(f"r{i}", prompt, max_tokens, lora, now)
        events.append(Event(now, request=request))
        if rng.random() < 0.1:
            events.append(Event(now + rng.choice([0.0, rng.expovariate(2.0)]), abort=request.request_id))
    events.sort(key=lambda event: event.time)
    return events


#: Engine settings, and workload settings (``max_body``, ``rate``) for each.
CONFIGS: dict[str, dict[str, Any]] = {
    # Small budget: chunked prefill, batches cut by the budget; a cache small enough to preempt.
    "tight": {"num_blocks": 120, "max_num_batched_tokens": 256, "max_num_seqs": 24, "max_loras": 2},
    # More running decodes than the token budget: the batch is cut every step, decodes fall out of step.
    "crowded": {
        "num_blocks": 900,
        "max_num_batched_tokens": 48,
        "max_num_seqs": 96,
        "max_loras": 2,
        "workload": {"max_body": 24, "rate": 200.0},
    },
    # Roomy cache, larger budget, one LoRA slot.
    "roomy": {"num_blocks": 4000, "max_num_batched_tokens": 2048, "max_num_seqs": 64, "max_loras": 1},
    # Tight, without prefix caching.
    "no-cache": {
        "num_blocks": 150,
        "max_num_batched_tokens": 512,
        "max_num_seqs": 32,
        "max_loras": 3,
        "enable_prefix_caching": False,
    },
}
MAX_LEN = 1024


def settings(config: str) -> dict[str, Any]:
    return {"enable_prefix_caching": True, **{k: v for k, v in CONFIGS[config].items() if k != "workload"}}


def make_engine(config: str) -> EngineCore:
    return EngineCore(H100, max_model_len=MAX_LEN, **settings(config))


def make_reference(config: str) -> ReferenceEngine:
    return ReferenceEngine(H100, **settings(config))


Engine = EngineCore | ReferenceEngine


def busy(engine: Engine) -> bool:
    return bool(engine.requests) if isinstance(engine, ReferenceEngine) else engine.has_unfinished_requests


def apply(engine: Engine, event: Event, results: dict[str, RequestResult]) -> None:
    if event.request is not None:
        engine.add_request(event.request, event.time)
    else:
        result = engine.abort(event.abort or "", event.time)
        if result is not None:
            results[result.request_id] = result


Trace = list[tuple[float, dict[str, int], list[str]]]


def run_stepped(engine: Engine, events: list[Event]) -> tuple[dict[str, RequestResult], Trace]:
    """Events due by ``now`` are applied before each step; an idle engine waits for the next event."""
    results: dict[str, RequestResult] = {}
    trace: Trace = []
    now, pending = 0.0, deque(events)
    while pending or busy(engine):
        while pending and pending[0].time <= now:
            apply(engine, pending.popleft(), results)
        if not busy(engine):
            if pending:
                now = pending[0].time
            continue
        if isinstance(engine, ReferenceEngine):
            end, new_tokens, finished = engine.step(now)
        else:
            out = engine.step(now)
            end, new_tokens, finished = out.end, out.new_tokens, out.finished
        results.update((r.request_id, r) for r in finished)
        trace.append((end, new_tokens, [r.request_id for r in finished]))
        now = end
    return results, trace


def run_advanced(engine: EngineCore, events: list[Event], rng: random.Random) -> dict[str, RequestResult]:
    """``advance`` to each event, with extra stops at random times in between; ``new_tokens`` must add up."""
    results: dict[str, RequestResult] = {}
    produced: dict[str, int] = {}
    now = 0.0
    stops = sorted(rng.uniform(0, events[-1].time) for _ in range(len(events)))
    marks = sorted([(event.time, 0, i) for i, event in enumerate(events)] + [(t, 1, -1) for t in stops])
    for time, kind, index in [*marks, (math.inf, 1, -1)]:
        out = engine.advance(now, time)
        results.update((r.request_id, r) for r in out.finished)
        for request_id, count in out.new_tokens.items():
            produced[request_id] = produced.get(request_id, 0) + count
        now = max(out.end, time) if time < math.inf else out.end
        if kind == 0:
            apply(engine, events[index], results)
    for request_id, result in results.items():
        assert produced.get(request_id, 0) == result.output_tokens, request_id
    return results


def stats_counts(stats: EngineStats) -> tuple[object, ...]:
    return (
        stats.num_running,
        stats.num_waiting,
        stats.prefix_cache_queries,
        stats.prefix_cache_hits,
        stats.prompt_tokens,
        stats.generation_tokens,
        stats.num_preemptions,
        stats.requests_finished,
        {name: histogram.counts for name, histogram in stats.histograms.items()},
    )


def reference_stats(engine: ReferenceEngine) -> tuple[object, ...]:
    metrics, prefix = engine.metrics, engine.kv.stats
    return (
        len(engine.running),
        len(engine.waiting),
        prefix.queries,
        prefix.hits,
        metrics.prompt_tokens,
        metrics.generation_tokens,
        metrics.num_preemptions,
        metrics.requests_finished,
        {name: histogram.counts for name, histogram in metrics.histograms().items()},
    )


def assert_same_results(got: dict[str, RequestResult], want: dict[str, RequestResult], exact: bool) -> None:
    assert got.keys() == want.keys()
    for request_id, result in got.items():
        expected = want[request_id]
        assert (
            result.output_tokens,
            result.cached_prompt_tokens,
            result.preemptions,
            result.finish_reason,
        ) == (
            expected.output_tokens,
            expected.cached_prompt_tokens,
            expected.preemptions,
            expected.finish_reason,
        ), request_id
        for name in ("arrival", "first_scheduled", "first_token", "finished"):
            a, b = getattr(result, name), getattr(expected, name)
            if exact or a is None or b is None:
                assert a == b, (request_id, name)
            else:
                assert a == pytest.approx(b, rel=1e-9, abs=1e-9), (request_id, name)


#: The fast paths switched off: every step scheduled one by one (the group dissolved), or the group's block
#: work always done in admission order. Their fallbacks must be as exact as the fast paths.
FORCED = {
    "one-by-one": ("_budget_cut_reaches_group", lambda self, budget: bool(self.decoding.members)),
    "ordered": ("_group_blocks_in_bulk", lambda self, step: False),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_step_and_advance_match_the_reference(config: str, seed: int) -> None:
    check_against_reference(config, seed)


@pytest.mark.parametrize("forced", list(FORCED))
@pytest.mark.parametrize("config", ["tight", "roomy"])
def test_fallback_paths_match_the_reference(
    forced: str, config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, replacement = FORCED[forced]
    monkeypatch.setattr(Scheduler, name, replacement)
    check_against_reference(config, seed=5)


def check_against_reference(config: str, seed: int) -> None:
    events = workload(seed, 200, MAX_LEN, **CONFIGS[config].get("workload", {}))
    reference = make_reference(config)
    want, want_trace = run_stepped(reference, events)

    stepped = make_engine(config)
    got, got_trace = run_stepped(stepped, events)
    assert got_trace == want_trace  # step for step: end times, tokens per request, finished requests
    assert_same_results(got, want, exact=True)
    assert stats_counts(stepped.stats()) == reference_stats(reference)

    advanced = make_engine(config)
    got = run_advanced(advanced, events, random.Random(seed))
    assert_same_results(got, want, exact=False)
    assert stats_counts(advanced.stats()) == reference_stats(reference)
    for name, histogram in advanced.stats().histograms.items():
        assert histogram.sum == pytest.approx(reference.metrics.histograms()[name].sum, rel=1e-9), name

    assert advanced.kv.pool.num_free == stepped.kv.pool.num_free == advanced.num_blocks
    if config in ("tight", "no-cache"):
        assert reference.metrics.num_preemptions > 0  # the workload does exercise preemption
    assert reference.metrics.requests_finished.get(FINISHED_ABORT, 0) > 0


def test_inspecting_the_batch_shows_current_counts() -> None:
    """Members of the decode group are written back when someone looks at the running batch."""
    engine = EngineCore(H100)
    for i in range(3):
        engine.add_request(Request(f"r{i}", list(range(i, i + 40)), 50), 0.0)
    now = 0.0
    for _ in range(10):
        now = engine.step(now).end
    running = engine.scheduler.running
    assert [r.num_output_tokens for r in running] == [10, 10, 10]
    assert all(r.num_computed_tokens == 40 + 9 for r in running)
    assert all(r.last_token == now for r in running)


def test_batch_lists_adapters_by_their_earliest_running_request() -> None:
    """The order a batch's adapters are refreshed in decides which one a later load evicts (LRU)."""
    # x's first request finishes early: then y's request is the batch's earliest, so y comes first, x is
    # refreshed last, and loading z evicts y. x's next request finds its adapter still resident.
    requests = [
        Request("x1", list(range(40)), 30, "x", 0.0),
        Request("y1", list(range(100, 140)), 100, "y", 0.0),
        Request("x2", list(range(200, 240)), 100, "x", 0.0),
        Request("z1", list(range(300, 340)), 5, "z", 10.0),
        Request("x3", list(range(400, 440)), 5, "x", 20.0),
        Request("y2", list(range(500, 540)), 5, "y", 30.0),
    ]
    events = [Event(r.arrival or 0.0, request=r) for r in requests]
    kwargs = {"num_blocks": 1000, "max_num_batched_tokens": 2048, "max_num_seqs": 16, "max_loras": 2}
    reference = ReferenceEngine(H100, enable_prefix_caching=True, **kwargs)
    want, want_trace = run_stepped(reference, events)
    engine = EngineCore(H100, max_model_len=MAX_LEN, **kwargs)  # type: ignore[arg-type]
    got, got_trace = run_stepped(engine, events)
    assert got_trace == want_trace
    assert_same_results(got, want, exact=True)
    assert want["x3"].ttft < want["y2"].ttft - H100.lora_load_s / 2  # x stayed resident, y was evicted
    advanced = EngineCore(H100, max_model_len=MAX_LEN, **kwargs)  # type: ignore[arg-type]
    assert_same_results(run_advanced(advanced, events, random.Random(0)), want, exact=False)
