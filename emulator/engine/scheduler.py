"""One scheduler iteration, shaped like vLLM V1's ``Scheduler.schedule`` and ``update_from_output``.

Each step has a token budget (``max_num_batched_tokens``) and a seat limit (``max_num_seqs``). Running
requests go first, in admission order: one token for a decode, the rest of the prompt (up to the budget) for
a request still in chunked prefill. When the KV cache cannot hold a running request's next tokens, the
lowest-priority running request (the last admitted, FCFS) is preempted in recompute mode. Then, if nothing
was preempted, waiting requests are admitted in FCFS order while budget, seats and blocks last, each after a
prefix-cache lookup; a request whose LoRA adapter would exceed ``max_loras`` is skipped for this step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from emulator.engine.kv_cache import KVCacheManager
from emulator.engine.lora import LoraSlots
from emulator.engine.request import RequestState


@dataclass(slots=True)
class SchedulerOutput:
    """The batch of one step and what the step-time model needs to price it."""

    requests: list[RequestState] = field(default_factory=list)
    #: Tokens scheduled, summed over the batch.
    num_tokens: int = 0
    #: Context length summed over the batch: KV read by attention.
    kv_tokens_read: int = 0
    #: (query, key) pairs of prefill chunks: attention FLOPs that grow with the square of the prompt.
    prefill_attention_pairs: int = 0
    lora_adapters: list[str] = field(default_factory=list)
    #: Adapters that had to be loaded into a GPU slot for this step.
    lora_loads: int = 0
    preempted: list[RequestState] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        lora_slots: LoraSlots,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.kv = kv
        self.lora_slots = lora_slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []

    def add_request(self, request: RequestState) -> None:
        self.waiting.append(request)

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        running, requests = self.running, out.requests
        adapters: dict[str, None] = {}
        num_tokens = kv_read = pairs = 0

        # Running requests first.
        kv, block_size = self.kv, self.kv.block_size
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            computed = request.num_computed_tokens
            num_new = request.num_prompt_tokens + request.num_output_tokens - computed
            if num_new == 1 and computed % block_size:
                # Hot path, a decode inside its last block: nothing to allocate, maybe a block to name.
                if kv.enable_caching and (computed + 1) % block_size == 0:
                    kv.cache_full_blocks(request, computed + 1)
            else:
                num_new = min(num_new, budget)
                if not self._allocate_or_preempt(request, num_new, out.preempted):
                    break
                if num_new > 1:
                    pairs += num_new * computed + num_new * (num_new + 1) // 2
            request.num_computed_tokens = computed = computed + num_new
            requests.append(request)
            budget -= num_new
            num_tokens += num_new
            kv_read += computed
            if request.lora is not None:
                adapters[request.lora] = None
            index += 1

        # Then waiting requests, unless this step had to preempt.
        if not out.preempted:
            waiting, max_loras = self.waiting, self.lora_slots.num_slots
            skipped: list[RequestState] = []
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                request = waiting[0]
                if request.lora is not None and len(adapters) >= max_loras and request.lora not in adapters:
                    skipped.append(waiting.popleft())
                    continue
                computed_blocks, computed = kv.get_computed_blocks(request)
                num_new = request.num_tokens - computed
                num_new = min(num_new, budget)
                if not kv.allocate_slots(request, num_new, computed_blocks):
                    break  # FCFS: the head waits for blocks, nobody overtakes it
                waiting.popleft()
                running.append(request)
                if request.first_scheduled < 0:
                    request.first_scheduled = now
                    request.num_cached_tokens = computed
                request.num_computed_tokens = computed + num_new
                requests.append(request)
                budget -= num_new
                num_tokens += num_new
                kv_read += computed + num_new
                if num_new > 1:
                    pairs += num_new * computed + num_new * (num_new + 1) // 2
                if request.lora is not None:
                    adapters[request.lora] = None
            waiting.extendleft(reversed(skipped))

        out.num_tokens, out.kv_tokens_read, out.prefill_attention_pairs = num_tokens, kv_read, pairs
        if adapters:
            out.lora_adapters = list(adapters)
            out.lora_loads = self.lora_slots.activate(out.lora_adapters)
        return out

    def update_from_output(self, out: SchedulerOutput) -> tuple[list[RequestState], list[RequestState]]:
        """Account the step's forward pass: every request whose tokens are all computed now samples one
        token (a prefill chunk that leaves part of the prompt produces none). Returns (sampled, finished)."""
        sampled, finished = [], []
        for request in out.requests:
            if request.num_computed_tokens < request.num_prompt_tokens + request.num_output_tokens:
                continue
            request.num_output_tokens += 1
            sampled.append(request)
            if request.num_output_tokens >= request.max_tokens:
                finished.append(request)
        if finished:
            self.remove_running(finished)
        return sampled, finished

    def remove_running(self, requests: list[RequestState]) -> None:
        """Take requests out of the running batch and free their blocks (finish or abort)."""
        gone = set(requests)
        self.running = [request for request in self.running if request not in gone]
        for request in requests:
            self.kv.free(request)

    def _allocate_or_preempt(
        self, request: RequestState, num_new: int, preempted: list[RequestState]
    ) -> bool:
        """Allocate, preempting the last admitted running request until the blocks fit; False if the
        victim had to be ``request`` itself."""
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
