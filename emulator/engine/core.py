"""A deterministic model of one vLLM V1 engine: scheduler + paged KV cache + a step-time model.

No I/O, no clock: callers pass the time. The live emulator calls ``step(now)``, sleeps its duration and then
delivers the tokens; the fleet simulator calls ``advance(now, until)``, which runs whole stretches of steps
and collapses runs of identical decode-only steps into one arithmetic jump.
"""

from __future__ import annotations

import math
from operator import attrgetter

from emulator.engine.kv_cache import KVCacheEvent, KVCacheManager
from emulator.engine.lora import LoraSlots
from emulator.engine.metrics import EngineMetrics, EngineStats
from emulator.engine.request import FINISHED_ABORT, FINISHED_LENGTH, Request, RequestResult, RequestState
from emulator.engine.scheduler import Scheduler
from emulator.profile import Profile

_request_id = attrgetter("request_id")

#: Shorter runs are stepped one by one: a single step gains nothing from the jump arithmetic.
MIN_JUMP_STEPS = 2


class StepOutput:
    """What one ``step`` (or a stretch of steps run by ``advance``) did between ``start`` and ``end``.

    ``new_tokens`` (request id -> output tokens produced; in ``step``: delivered at ``end``) is built when
    first read: most of a busy batch decodes in lockstep, so the engine records one shared count for the
    requests that decoded throughout plus per-request corrections, and a fleet simulator that never reads
    the dict never pays for it.
    """

    __slots__ = ("_adjust", "_members", "_new_tokens", "_shared", "end", "finished", "num_steps", "start")

    def __init__(
        self,
        start: float,
        end: float,
        num_steps: int = 0,
        new_tokens: dict[str, int] | None = None,
        finished: list[RequestResult] | None = None,
    ) -> None:
        self.start = start
        self.end = end
        self.num_steps = num_steps
        self.finished: list[RequestResult] = [] if finished is None else finished
        self._new_tokens = new_tokens
        #: Tokens each request in ``_members`` got, before the corrections in ``_adjust``.
        self._shared = 0
        self._members: tuple[RequestState, ...] = ()
        self._adjust: dict[str, int] = {}

    @property
    def new_tokens(self) -> dict[str, int]:
        """Request id -> output tokens produced (only requests that produced some)."""
        if self._new_tokens is None:
            tokens: dict[str, int] = {}
            if self._shared:
                tokens = dict.fromkeys(map(_request_id, self._members), self._shared)
            for request_id, count in self._adjust.items():
                total = tokens.get(request_id, 0) + count
                if total:
                    tokens[request_id] = total
                else:
                    tokens.pop(request_id, None)
            self._new_tokens = tokens
        return self._new_tokens

    @new_tokens.setter
    def new_tokens(self, tokens: dict[str, int]) -> None:
        self._new_tokens = tokens

    @property
    def duration(self) -> float:
        return self.end - self.start

    def __repr__(self) -> str:
        return (
            f"StepOutput(start={self.start!r}, end={self.end!r}, num_steps={self.num_steps!r}, "
            f"new_tokens={self.new_tokens!r}, finished={self.finished!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepOutput):
            return NotImplemented
        return (self.start, self.end, self.num_steps, self.new_tokens, self.finished) == (
            other.start,
            other.end,
            other.num_steps,
            other.new_tokens,
            other.finished,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces


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
        if scheduler.is_running(state):
            scheduler.remove_running([state])
        else:
            scheduler.waiting.remove(state)
        self._count_finished(FINISHED_ABORT)
        return RequestResult.of(state, now, FINISHED_ABORT)

    def cached_tokens(self, request_id: str) -> int:
        """Prompt tokens of a scheduled, unfinished request that were prefix-cache hits (0 otherwise)."""
        state = self._requests.get(request_id)
        return max(state.num_cached_tokens, 0) if state is not None else 0

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- prefix cache and its events ----------------------------------------------------------------------

    def enable_kv_events(self) -> None:
        """Record every prefix-cache change from now on, for ``take_kv_events`` (vLLM's
        ``enable_kv_cache_events``). Off by default: the fleet simulator pays nothing for it."""
        if self.kv.pool.events is None:
            self.kv.pool.events = []

    def take_kv_events(self) -> list[KVCacheEvent]:
        """The prefix-cache changes since the last call, in the order they happened (empty when disabled).

        The live engine takes them after each ``step``: one step's events are one published batch, as
        vLLM's scheduler publishes them at the end of each step. After ``advance`` they span its steps.
        """
        pool = self.kv.pool
        events = pool.events
        if not events:
            return []
        pool.events = []
        return events

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """Drop every cached prefix, as vLLM's ``/reset_prefix_cache``: refused (False) while requests hold
        blocks, unless ``reset_running_requests``, which first preempts them all (they recompute later; as
        in vLLM, these preemptions are not counted in ``num_preemptions``)."""
        if reset_running_requests:
            self.scheduler.preempt_all()
        return self.kv.reset_prefix_cache()

    # -- stepping -----------------------------------------------------------------------------------------

    def step(self, now: float) -> StepOutput:
        """One scheduler iteration starting at ``now``; its tokens exist at ``out.end``."""
        out = StepOutput(start=now, end=now)
        self._open(out)
        self._run_step(out)
        self._close(out)
        return out

    def advance(self, now: float, until: float) -> StepOutput:
        """Run steps back to back from ``now`` until idle or until the next step would start at or after
        ``until``; the last step may end after ``until``. Equivalent to calling ``step`` repeatedly."""
        out = StepOutput(start=now, end=now)
        self._open(out)
        while self._requests and out.end < until:
            if not self._try_decode_jump(out, until):
                steps = out.num_steps
                self._run_step(out)
                if out.num_steps == steps:
                    break  # nothing could be scheduled (cannot happen with a non-empty engine; be safe)
        self._close(out)
        return out

    def _open(self, out: StepOutput) -> None:
        """Start counting tokens for ``out``: group members get one per group step, the rest are noted."""
        group = self.scheduler.decoding
        group.ledger, group.ledger_origin = out._adjust, group.steps

    def _close(self, out: StepOutput) -> None:
        """Record the group's steps during ``out`` and who was in it at the end (for ``new_tokens``)."""
        group = self.scheduler.decoding
        out._shared = group.steps - group.ledger_origin
        if out._shared:
            out._members = tuple(group.members.values())
        group.ledger = None

    def _run_step(self, out: StepOutput) -> None:
        now = out.end
        scheduler = self.scheduler
        sched = scheduler.schedule(now)
        decodes = sched.num_decodes
        if not sched.requests and not decodes:
            return
        profile = self.profile
        duration = profile.step_time(
            sched.num_tokens, sched.kv_tokens_read, sched.prefill_attention_pairs, bool(sched.lora_adapters)
        )
        end = now + duration + sched.lora_loads * profile.lora_load_s
        metrics = self.metrics
        metrics.num_preemptions += len(sched.preempted)
        itl = metrics.inter_token_latency
        # Decodes whose previous token came at ``now`` share one ITL value; the group shares its last token.
        after_last_step = 0
        if decodes:
            last = scheduler.decoding.last
            if last == now:
                after_last_step = decodes
            else:
                itl.observe(end - last, decodes)
        sampled, finished = scheduler.update_from_output(sched, end)
        ledger = out._adjust
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
            ledger[request.request_id] = ledger.get(request.request_id, 0) + 1
        if after_last_step:
            itl.observe(end - now, after_last_step)
        metrics.generation_tokens += decodes + len(sampled)
        for request in finished:
            out.finished.append(self._finish(request, end))
        out.end = end
        out.num_steps += 1

    def decode_run_end(self, now: float) -> float | None:
        """When the run of identical decode-only steps from ``now`` ends, if the engine is in such a run.

        The run ends with its first finish, or where the free blocks run out. None when the next step is not
        part of such a run (something waits or prefills). Nothing changes: ``run_decodes`` commits the run,
        ``advance`` commits part of it. The fleet simulator plans with this, so an engine nobody sends work
        to costs one event per finish instead of one per step.
        """
        plan = self._decode_run(now, math.inf)
        if plan is None:
            return None
        steps, first, delta, _ = plan
        return now + steps * first + delta * steps * (steps - 1) / 2

    def run_decodes(self, now: float) -> StepOutput:
        """Commit the whole run ``decode_run_end(now)`` announced."""
        plan = self._decode_run(now, math.inf)
        if plan is None:
            raise RuntimeError("no decode run to commit")
        out = StepOutput(start=now, end=now)
        self._open(out)
        self._jump(out, *plan)
        self._close(out)
        return out

    def _try_decode_jump(self, out: StepOutput, until: float) -> bool:
        plan = self._decode_run(out.end, until)
        if plan is None:
            return False
        self._jump(out, *plan)
        return True

    def _decode_run(self, now: float, until: float) -> tuple[int, float, float, list[str]] | None:
        """The k identical decode-only steps from ``now`` the engine could run at once, if any.

        Conditions: nobody waits, every running request is a decode-group member (one token per step, all
        fitting in the budget), their adapters are resident, and the free blocks cover the next k steps. Step
        j then lasts ``d0 + j * delta`` (each sequence's context grows by one token per step), so the run is
        an arithmetic series. k stops at the first finish, before a step would start at ``until``, and where
        blocks run out. Returns (k, d0, delta, adapters).
        """
        scheduler = self.scheduler
        group = scheduler.decoding
        batch = len(group)
        if (
            not batch
            or scheduler.waiting
            or scheduler.num_running != batch
            or batch > scheduler.max_num_batched_tokens
        ):
            return None
        adapters: list[str] = []
        if group.adapters:
            firsts = group.first_seq_by_adapter()
            adapters = sorted(firsts, key=firsts.__getitem__)
        profile = self.profile
        first = profile.step_time(batch, group.kv_tokens_read(), 0, bool(adapters))
        if until - now <= first:
            return None  # the second step would not start before ``until``
        if adapters and not self.lora_slots.all_resident(adapters):
            return None
        steps = group.steps_to_first_finish()
        if steps < MIN_JUMP_STEPS:
            return None
        delta = profile.kv_token_s * batch
        steps = min(steps, _steps_starting_before(until - now, first, delta))
        steps = self._steps_with_free_blocks(steps)
        if steps < MIN_JUMP_STEPS:
            return None
        return steps, first, delta, adapters

    def _steps_with_free_blocks(self, steps: int) -> int:
        """The largest k <= ``steps`` whose new blocks fit in the free queue (binary search, monotone)."""
        needed, free = self.scheduler.decoding.blocks_needed, self.kv.pool.num_free
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
        """Apply ``steps`` decode steps to the whole group, as ``step`` would one at a time."""
        scheduler, metrics = self.scheduler, self.metrics
        group = scheduler.decoding
        now, batch = out.end, len(group)
        end = now + steps * first + delta * steps * (steps - 1) / 2
        itl = metrics.inter_token_latency
        if group.last == now:
            itl.observe(first, batch)
        else:
            itl.observe(now + first - group.last, batch)
        # Every member's later gaps are the durations of steps 1..k-1.
        itl.observe_series(first + delta, delta, steps - 1, batch)
        metrics.generation_tokens += steps * batch
        scheduler.decode_steps(steps)
        if adapters:
            self.lora_slots.activate(adapters)
        # The last of the k steps is the first in which anyone finishes.
        group.steps += steps - 1
        finished = group.pop_finishing()
        group.steps += 1
        group.last = end
        if finished:
            scheduler.remove_running(finished)
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
            num_running=scheduler.num_running,
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            prompt_tokens=metrics.prompt_tokens,
            generation_tokens=metrics.generation_tokens,
            num_preemptions=metrics.num_preemptions,
            requests_finished=dict(metrics.requests_finished),
            running_lora_adapters=sorted(scheduler.running_adapters()),
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
