"""A deterministic model of one vLLM V1 engine: scheduler + paged KV cache + a step-time model.

No I/O, no clock: callers pass the time. The live emulator calls ``step(now)``, sleeps its duration and then
delivers the tokens; the fleet simulator calls ``advance(now, until)``, which runs whole stretches of steps
and collapses runs of identical decode-only steps into one arithmetic jump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from emulator.engine.kv_cache import KVCacheManager
from emulator.engine.lora import LoraSlots
from emulator.engine.metrics import EngineMetrics, EngineStats
from emulator.engine.request import FINISHED_ABORT, FINISHED_LENGTH, Request, RequestResult, RequestState
from emulator.engine.scheduler import Scheduler
from emulator.profile import Profile

#: Shorter runs are stepped one by one: a single step gains nothing from the jump arithmetic.
MIN_JUMP_STEPS = 2


@dataclass(slots=True)
class StepOutput:
    """What one ``step`` (or a stretch of steps run by ``advance``) did between ``start`` and ``end``."""

    start: float
    end: float
    num_steps: int = 0
    #: request id -> output tokens produced (in ``step``: delivered at ``end``).
    new_tokens: dict[str, int] = field(default_factory=dict)
    finished: list[RequestResult] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start


class EngineCore:
    def __init__(
        self,
        profile: Profile,
        *,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_model_len: int | None = None,
        max_loras: int | None = None,
        enable_prefix_caching: bool = True,
        num_blocks: int | None = None,
    ) -> None:
        """``num_blocks`` overrides the profile's KV capacity (tests use small caches)."""
        self.profile = profile
        self.max_model_len = max_model_len or profile.max_model_len
        self.block_size = profile.block_size
        self.num_blocks = num_blocks or profile.num_blocks
        if self.max_model_len > self.num_blocks * self.block_size:
            # vLLM refuses to start when one max-length request cannot fit in the KV cache.
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV cache "
                f"({self.num_blocks * self.block_size} tokens)"
            )
        self.kv = KVCacheManager(self.num_blocks, self.block_size, enable_prefix_caching)
        self.lora_slots = LoraSlots(max_loras or profile.max_loras)
        self.scheduler = Scheduler(
            self.kv,
            self.lora_slots,
            max_num_seqs=max_num_seqs or profile.max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or profile.max_num_batched_tokens,
        )
        self.metrics = EngineMetrics()
        self._requests: dict[str, RequestState] = {}
        #: Whether every running request decodes in the next step (a cheap pre-check for decode jumps).
        self._all_decoding = False

    # -- requests -----------------------------------------------------------------------------------------

    def add_request(self, request: Request, now: float) -> None:
        """Queue a request (vLLM's ``add_request``); it is scheduled from the next step on."""
        prompt_len = len(request.prompt_token_ids)
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if prompt_len == 0 or request.max_tokens < 1:
            raise ValueError("a request needs a non-empty prompt and max_tokens >= 1")
        if prompt_len + request.max_tokens > self.max_model_len:
            raise ValueError(
                f"maximum context length is {self.max_model_len} tokens, "
                f"requested {prompt_len + request.max_tokens} (prompt + max_tokens)"
            )
        state = RequestState.from_request(request, now)
        self._requests[request.request_id] = state
        self.scheduler.add_request(state)

    def abort(self, request_id: str, now: float) -> RequestResult | None:
        """Drop a request whose client went away, freeing its blocks. None if it is unknown or done."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        scheduler = self.scheduler
        if state in scheduler.waiting:
            scheduler.waiting.remove(state)
        else:
            scheduler.remove_running([state])
        self._count_finished(FINISHED_ABORT)
        return RequestResult.of(state, now, FINISHED_ABORT)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- stepping -----------------------------------------------------------------------------------------

    def step(self, now: float) -> StepOutput:
        """One scheduler iteration starting at ``now``; its tokens exist at ``out.end``."""
        out = StepOutput(start=now, end=now)
        self._run_step(out)
        return out

    def advance(self, now: float, until: float) -> StepOutput:
        """Run steps back to back from ``now`` until idle or until the next step would start at or after
        ``until``; the last step may end after ``until``. Equivalent to calling ``step`` repeatedly."""
        out = StepOutput(start=now, end=now)
        while self._requests and out.end < until:
            if not self._try_decode_jump(out, until):
                steps = out.num_steps
                self._run_step(out)
                if out.num_steps == steps:
                    break  # nothing could be scheduled (cannot happen with a non-empty engine; be safe)
        return out

    def _run_step(self, out: StepOutput) -> None:
        now = out.end
        sched = self.scheduler.schedule(now)
        if not sched.requests:
            return
        profile = self.profile
        duration = profile.step_time(
            sched.num_tokens, sched.kv_tokens_read, sched.prefill_attention_pairs, bool(sched.lora_adapters)
        )
        end = now + duration + sched.lora_loads * profile.lora_load_s
        self.metrics.num_preemptions += len(sched.preempted)
        sampled, finished = self.scheduler.update_from_output(sched)
        metrics, new_tokens = self.metrics, out.new_tokens
        itl = metrics.inter_token_latency
        after_last_step = 0  # decodes whose previous token came at ``now``: they share one ITL value
        for request in sampled:
            last = request.last_token
            if last == now:
                after_last_step += 1
            elif last < 0:
                request.first_token = end
                metrics.time_to_first_token.observe(end - request.arrival)
                metrics.prompt_tokens += request.num_prompt_tokens
            else:
                itl.observe(end - last)
            request.last_token = end
            new_tokens[request.request_id] = new_tokens.get(request.request_id, 0) + 1
        if after_last_step:
            itl.observe(end - now, after_last_step)
        metrics.generation_tokens += len(sampled)
        for request in finished:
            out.finished.append(self._finish(request, end))
        # The next step is decode-only if every request left running sampled a token in this one.
        self._all_decoding = not sched.preempted and len(sampled) == len(sched.requests) == len(
            self.scheduler.running
        ) + len(finished)
        out.end = end
        out.num_steps += 1

    def _try_decode_jump(self, out: StepOutput, until: float) -> bool:
        """Run k identical decode-only steps at once, if the engine is in such a run.

        Conditions: nobody waits, every running request decodes (one token per step, all fitting in the
        budget), their adapters are resident, and the free blocks cover the next k steps. Step j then lasts
        ``d0 + j * delta`` (each sequence's context grows by one token per step), so the run is an arithmetic
        series. k stops at the first finish, before a step would start at ``until``, and where blocks run out.
        """
        scheduler = self.scheduler
        running = scheduler.running
        batch = len(running)
        if (
            not self._all_decoding
            or scheduler.waiting
            or not batch
            or batch > scheduler.max_num_batched_tokens
        ):
            return False
        steps = min(request.max_tokens - request.num_output_tokens for request in running)
        if steps < MIN_JUMP_STEPS:
            return False
        kv_read = 0
        for request in running:
            if request.num_computed_tokens != request.num_prompt_tokens + request.num_output_tokens - 1:
                return False  # still in prefill, or recomputing after preemption
            kv_read += request.num_computed_tokens + 1
        adapters = list(dict.fromkeys(r.lora for r in running if r.lora is not None))
        if adapters and not self.lora_slots.all_resident(adapters):
            return False
        profile, now = self.profile, out.end
        first = profile.step_time(batch, kv_read, 0, bool(adapters))
        delta = profile.kv_token_s * batch
        steps = min(steps, _steps_starting_before(until - now, first, delta))
        steps = self._steps_with_free_blocks(steps)
        if steps < MIN_JUMP_STEPS:
            return False
        self._jump(out, steps, first, delta, adapters)
        return True

    def _steps_with_free_blocks(self, steps: int) -> int:
        """The largest k <= ``steps`` whose new blocks fit in the free queue (binary search, monotone)."""
        kv, running = self.kv, self.scheduler.running
        free = kv.pool.num_free

        def needed(k: int) -> int:
            return sum(kv.blocks_needed(request, k) for request in running)

        if needed(steps) <= free:
            return steps
        low, high = 0, steps  # needed(low) fits, needed(high) does not
        while high - low > 1:
            mid = (low + high) // 2
            if needed(mid) <= free:
                low = mid
            else:
                high = mid
        return low

    def _jump(self, out: StepOutput, steps: int, first: float, delta: float, adapters: list[str]) -> None:
        """Apply ``steps`` decode steps to every running request, as ``step`` would one at a time."""
        kv, metrics, new_tokens = self.kv, self.metrics, out.new_tokens
        now = out.end
        first_end = now + first
        end = now + steps * first + delta * steps * (steps - 1) / 2
        running = self.scheduler.running
        itl = metrics.inter_token_latency
        finished = []
        pool = kv.pool
        after_last_step = 0  # requests whose previous token came at ``now`` share their first gap
        for request in running:
            if request.last_token == now:
                after_last_step += 1
            else:
                itl.observe(first_end - request.last_token)
            needed = kv.blocks_needed(request, steps)
            if needed:
                request.block_ids.extend(pool.allocate(needed))
            request.num_computed_tokens += steps
            request.num_output_tokens += steps
            request.last_token = end
            if kv.enable_caching:
                kv.cache_full_blocks(request, request.num_computed_tokens)
            new_tokens[request.request_id] = new_tokens.get(request.request_id, 0) + steps
            if request.num_output_tokens >= request.max_tokens:
                finished.append(request)
        if after_last_step:
            itl.observe(first, after_last_step)
        # Every request's later gaps are the durations of steps 1..k-1.
        itl.observe_series(first + delta, delta, steps - 1, len(running))
        metrics.generation_tokens += steps * len(running)
        if adapters:
            self.lora_slots.activate(adapters)
        if finished:
            self.scheduler.remove_running(finished)
            for request in finished:
                out.finished.append(self._finish(request, end))
        out.end = end
        out.num_steps += steps

    def _finish(self, request: RequestState, end: float) -> RequestResult:
        del self._requests[request.request_id]
        metrics = self.metrics
        self._count_finished(FINISHED_LENGTH)
        metrics.e2e_request_latency.observe(end - request.arrival)
        metrics.request_queue_time.observe(request.first_scheduled - request.arrival)
        metrics.request_prefill_time.observe(request.first_token - request.first_scheduled)
        metrics.request_decode_time.observe(end - request.first_token)
        metrics.request_inference_time.observe(end - request.first_scheduled)
        return RequestResult.of(request, end, FINISHED_LENGTH)

    def _count_finished(self, reason: str) -> None:
        finished = self.metrics.requests_finished
        finished[reason] = finished.get(reason, 0) + 1

    # -- observability ------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        scheduler, metrics, prefix = self.scheduler, self.metrics, self.kv.stats
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            prompt_tokens=metrics.prompt_tokens,
            generation_tokens=metrics.generation_tokens,
            num_preemptions=metrics.num_preemptions,
            requests_finished=dict(metrics.requests_finished),
            running_lora_adapters=sorted({r.lora for r in scheduler.running if r.lora is not None}),
            waiting_lora_adapters=sorted({r.lora for r in scheduler.waiting if r.lora is not None}),
            max_loras=self.lora_slots.num_slots,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            histograms=metrics.histograms(),
        )


def _steps_starting_before(horizon: float, first: float, delta: float) -> int:
    """How many back-to-back steps of durations ``first + j * delta`` start before ``horizon``.

    Step j starts at ``j * first + delta * j * (j - 1) / 2``; solve that quadratic for the last j < horizon.
    """
    if horizon == math.inf:
        return 1 << 62
    if delta <= 0:
        j = math.ceil(horizon / first) - 1
    else:
        a, b = delta / 2, first - delta / 2
        j = math.ceil((-b + math.sqrt(b * b + 4 * a * horizon)) / (2 * a)) - 1
    j = max(j, 0)
    while j > 0 and j * first + delta * j * (j - 1) / 2 >= horizon:  # float safety
        j -= 1
    return j + 1
