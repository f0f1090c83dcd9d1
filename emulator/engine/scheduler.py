"""One scheduler iteration, shaped like vLLM V1's ``Scheduler.schedule`` and ``update_from_output``.

Each step has a token budget (``max_num_batched_tokens``) and a seat limit (``max_num_seqs``). Running
requests go first, in admission order: one token for a decode, the rest of the prompt (up to the budget) for
a request still in chunked prefill. When the KV cache cannot hold a running request's next tokens, the
lowest-priority running request (the last admitted, FCFS) is preempted in recompute mode. Then, if nothing
was preempted, waiting requests are admitted in FCFS order while budget, seats and blocks last, each after a
prefix-cache lookup; a request whose LoRA adapter would exceed ``max_loras`` is skipped for this step.

Plain decodes live in a ``DecodeGroup`` (``engine/decode.py``). Each of them is scheduled in every step and
samples a token, so the group is scheduled as a whole: one token of budget per member, and only the members
that touch the KV cache in this step (open or fill a block) are visited, in admission order together with
the requests scheduled one by one (prefill chunks, recomputation). When that order cannot matter, the group's
block work is done in bulk (``_group_blocks_in_bulk``). Should the budget ever run out before a member's turn,
the group is dissolved for that step and everyone is scheduled one by one, exactly as above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from emulator.engine.decode import DecodeGroup
from emulator.engine.kv_cache import KVCacheManager
from emulator.engine.lora import LoraSlots
from emulator.engine.request import RequestState


@dataclass(slots=True)
class SchedulerOutput:
    """The batch of one step and what the step-time model needs to price it."""

    #: Requests scheduled one by one (prefill chunks, recomputation, decodes outside the group), in order.
    requests: list[RequestState] = field(default_factory=list)
    #: Decode-group members scheduled (all of them): one token each.
    num_decodes: int = 0
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
        #: Running requests by ``seq``, in admission order (the order they are scheduled and preempted in).
        self._running: dict[int, RequestState] = {}
        #: The running requests outside the decode group, by ``seq``.
        self._individual: dict[int, RequestState] = {}
        self.decoding = DecodeGroup(kv.block_size)
        self._next_seq = 0

    @property
    def running(self) -> list[RequestState]:
        """The running batch in admission order, with up-to-date counts (for inspection: O(batch))."""
        self.decoding.sync()
        return list(self._running.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    def is_running(self, request: RequestState) -> bool:
        return self._running.get(request.seq) is request

    def add_request(self, request: RequestState) -> None:
        self.waiting.append(request)

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        running, individual, group = self._running, self._individual, self.decoding
        budget = self.max_num_batched_tokens
        if individual and self._budget_cut_reaches_group(budget):
            self._dissolve_group()  # schedule everyone one by one, in order, until the budget is spent
        budget -= len(group)
        requests, preempted = out.requests, out.preempted
        num_tokens = kv_read = pairs = 0

        # Running requests first, in admission order: those scheduled one by one, and the group members with
        # a block to allocate or name (the rest of the group needs nothing but its budget, counted above).
        kv, block_size, step = self.kv, self.kv.block_size, group.steps
        caching = kv.enable_caching
        # In bulk when nobody is scheduled one by one and the order cannot matter: nothing left to walk.
        order = [] if not individual and self._group_blocks_in_bulk(step) else self._in_order(step)
        for seq in order:
            request = running.get(seq)
            if request is None:
                continue  # preempted earlier in this step
            if seq not in individual:
                if not self._group_member_blocks(request, step, preempted):
                    break
                continue
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            num_new = request.num_prompt_tokens + request.num_output_tokens - computed
            if num_new == 1 and computed % block_size:
                # A decode inside its last block: nothing to allocate, maybe a block to name.
                if caching and (computed + 1) % block_size == 0:
                    kv.cache_next_block(request)
            else:
                num_new = min(num_new, budget)
                if not self._allocate_or_preempt(request, num_new, preempted):
                    break
                if num_new > 1:
                    pairs += num_new * computed + num_new * (num_new + 1) // 2
            request.num_computed_tokens = computed = computed + num_new
            requests.append(request)
            budget -= num_new
            num_tokens += num_new
            kv_read += computed
        out.num_decodes = len(group)
        num_tokens += out.num_decodes
        kv_read += group.kv_tokens_read()
        adapters = {}
        if group.adapters or any(request.lora is not None for request in requests):
            adapters = self._adapters_in_order(requests)

        # Then waiting requests, unless this step had to preempt.
        if not preempted:
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
                request.seq = seq = self._next_seq
                self._next_seq += 1
                running[seq] = individual[seq] = request
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

    def update_from_output(
        self, out: SchedulerOutput, end: float
    ) -> tuple[list[RequestState], list[RequestState]]:
        """Account the step's forward pass, which ends at ``end``: every group member samples a token, and so
        does every request scheduled one by one whose tokens are now all computed (a prefill chunk that
        leaves part of the prompt produces none); those join the group. Returns the requests sampled one by
        one and the finished ones (both in admission order); the finished are out of the batch, blocks freed.
        """
        group = self.decoding
        finished = group.pop_finishing() if out.num_decodes else []
        group.steps += 1
        group.last = end
        for request in finished:
            group.leave(request)
        sampled = []
        individual_finished = False
        for request in out.requests:
            if request.num_computed_tokens < request.num_prompt_tokens + request.num_output_tokens:
                continue
            request.num_output_tokens += 1
            sampled.append(request)
            if request.num_output_tokens >= request.max_tokens:
                finished.append(request)
                individual_finished = True
        if individual_finished and out.num_decodes:
            finished.sort(key=_seq)  # blocks are freed in admission order (already so under FCFS admission)
        if finished:
            self._remove(finished)
        individual, kv = self._individual, self.kv
        for request in sampled:
            if request.num_output_tokens < request.max_tokens:
                del individual[request.seq]
                group.join(request)
                kv.hash_ahead(request)
        return sampled, finished

    def decode_steps(self, steps: int) -> None:
        """The KV-cache side of ``steps`` decode-only steps of the whole group (the caller checked that the
        free blocks suffice), step by step as ``schedule`` would do it."""
        group, running, preempted = self.decoding, self._running, []
        by_phase, block_size = group.by_phase, group.block_size
        for step in range(group.steps, group.steps + steps):
            if not by_phase[step % block_size] and not by_phase[(step + 1) % block_size]:
                continue  # nobody opens or fills a block in this step
            if not self._group_blocks_in_bulk(step):
                for seq in self._in_order(step):
                    self._group_member_blocks(running[seq], step, preempted)
        assert not preempted, "a decode jump must not need more blocks than are free"

    def _in_order(self, step: int) -> list[int]:
        """Sequence numbers of the requests scheduled one by one and of the group members with a block to
        allocate or name in ``step``: the order their KV-cache operations happen in."""
        allocating, filling = self.decoding.block_events(step)
        order = [*self._individual, *allocating]
        if self.kv.enable_caching and filling is not allocating:
            order += filling
        order.sort()
        return order

    def _group_member_blocks(self, request: RequestState, step: int, preempted: list[RequestState]) -> bool:
        """A group member's KV-cache work in ``step``: a new block for its token (preempting from the end of
        the batch if none is free), and naming the block its token fills. False if it was preempted."""
        kv, block_size = self.kv, self.kv.block_size
        computed = request.decode_offset + step
        if computed % block_size == 0:
            if not kv.pool.free_queue and not self._make_room(request, 1, preempted):
                return False
            request.block_ids.append(kv.pool.allocate_one())
        if kv.enable_caching and (computed + 1) % block_size == 0:
            kv.cache_next_block(request)
        return True

    def _group_blocks_in_bulk(self, step: int) -> bool:
        """Do the group's KV-cache work of ``step`` in bulk if its order cannot matter; else do nothing.

        In admission order, allocations pop the free queue's head and namings add names. Pops commute (which
        request gets which of the popped blocks is only a relabelling), and a naming commutes with the pops
        unless its name is already cached (held by a free block that may be evicted in this step) or named
        twice in the step. So when the free blocks cover the allocations (no preemption) and every new name
        is new, namings then allocations, in any order, is the same as the ordered walk.
        """
        allocating, filling = self.decoding.block_events(step)
        kv = self.kv
        pool = kv.pool
        if len(allocating) > pool.num_free or filling is allocating:
            return False
        if filling and kv.enable_caching:
            fills = list(filling.values())
            names = [request.block_hashes[request.num_cached_blocks] for request in fills]  # hash_ahead
            cached = pool.cached
            if len(set(names)) < len(names) or not cached.keys().isdisjoint(names):
                return False
            block_hash = pool.block_hash
            for request, name in zip(fills, names, strict=True):
                index = request.num_cached_blocks
                block = request.block_ids[index]
                cached[name] = block
                block_hash[block] = name
                request.num_cached_blocks = index + 1
            if pool.events is not None:
                for request in fills:
                    kv.record_stored(request, request.num_cached_blocks - 1, request.num_cached_blocks)
        if allocating:
            for request, block in zip(allocating.values(), pool.allocate(len(allocating)), strict=True):
                request.block_ids.append(block)
        return True

    def remove_running(self, requests: list[RequestState]) -> None:
        """Take requests out of the running batch and free their blocks (abort)."""
        group = self.decoding
        for request in requests:
            if request.seq not in self._individual:
                group.leave(request)
        self._remove(requests)

    def running_adapters(self) -> set[str]:
        adapters = set(self.decoding.adapters)
        adapters.update(r.lora for r in self._individual.values() if r.lora is not None)
        return adapters

    def _remove(self, requests: list[RequestState]) -> None:
        """Drop requests (already out of the group) from the batch and free their blocks, in order."""
        running, individual, kv = self._running, self._individual, self.kv
        for request in requests:
            del running[request.seq]
            individual.pop(request.seq, None)
            kv.free(request)

    def _budget_cut_reaches_group(self, budget: int) -> bool:
        """Whether running out of budget in this step would leave a group member unscheduled.

        The group never exceeds the budget (each member took a token in the step it sampled in), so the
        budget runs out, if at all, at a request scheduled one by one; members admitted before the first of
        those come before the cut. With FCFS admission that is all of them (a prefill that leaves part of its
        prompt used up the budget, so nobody was admitted after it), but a member admitted later would lose
        its token, and then the group is dissolved for the step.
        """
        group, individual = self.decoding, self._individual
        if not group.members:
            return False
        demand = sum(
            r.num_prompt_tokens + r.num_output_tokens - r.num_computed_tokens for r in individual.values()
        )
        return len(group) + demand > budget and max(group.members) > next(iter(individual))

    def _dissolve_group(self) -> None:
        """Schedule every running request one by one this step (they rejoin when they sample)."""
        group = self.decoding
        for request in list(group.members.values()):
            group.leave(request)
        self._individual.clear()
        self._individual.update(self._running)

    def _adapters_in_order(self, scheduled: list[RequestState]) -> dict[str, None]:
        """The adapters of the running requests scheduled so far, in order of first appearance."""
        firsts = self.decoding.first_seq_by_adapter()
        for request in scheduled:
            lora = request.lora
            if lora is not None and (lora not in firsts or request.seq < firsts[lora]):
                firsts[lora] = request.seq
        return dict.fromkeys(sorted(firsts, key=firsts.__getitem__))

    def _allocate_or_preempt(
        self, request: RequestState, num_new: int, preempted: list[RequestState]
    ) -> bool:
        """Allocate, preempting the last admitted running request until the blocks fit; False if the
        victim had to be ``request`` itself."""
        while not self.kv.allocate_slots(request, num_new):
            if not self._preempt_last(request, preempted):
                return False
        return True

    def _make_room(self, request: RequestState, num_blocks: int, preempted: list[RequestState]) -> bool:
        """Preempt from the end of the batch until ``num_blocks`` are free; False if ``request`` went."""
        while self.kv.pool.num_free < num_blocks:
            if not self._preempt_last(request, preempted):
                return False
        return True

    def preempt_all(self) -> list[RequestState]:
        """Preempt every running request, last admitted first, so the waiting queue keeps their order (what
        vLLM's ``reset_prefix_cache(reset_running_requests=True)`` does before resetting)."""
        preempted: list[RequestState] = []
        while self._running:
            self._preempt_last(None, preempted)
        return preempted

    def _preempt_last(self, request: RequestState | None, preempted: list[RequestState]) -> bool:
        """Preempt the last admitted running request (recompute mode); False if that was ``request``."""
        seq, victim = self._running.popitem()
        if self._individual.pop(seq, None) is None:
            self.decoding.leave(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        preempted.append(victim)
        return victim is not request


def _seq(request: RequestState) -> int:
    return request.seq
