"""The running requests that decode in lockstep, kept as one aggregate instead of one by one.

In a busy engine most running requests are plain decodes: each step they get one token of budget, compute
one token and sample one. Walking all of them every step made a step O(batch). Here they share one step
counter: a member's computed tokens are ``decode_offset + steps``, its output tokens follow from that, and
the batch's KV read is ``offset_sum + size * (steps + 1)``. A step only touches the members that need
something of the KV cache in it, which is periodic: a member whose next token starts a block allocates one
(every ``block_size`` steps), one whose token fills a block names it (the step before). Members are filed by
that phase (``by_phase``), so a step visits two of ``block_size`` classes. Finishing is a heap keyed by the
step of a member's last token.

Invariant that makes the aggregate exact: every member was scheduled in every step since it joined, so all
share the time of their last token (``last``); the scheduler guarantees it (see ``_budget_cut_reaches_group``
in ``engine/scheduler.py``). A request outside the group (a prefill, a recomputation after a preemption) is
scheduled one by one and joins when it samples a token. The group never holds stale state anyone reads:
``leave`` (finish, preemption, abort) writes a member's counts back first; ``sync`` does so for inspection.
"""

from __future__ import annotations

import heapq

from emulator.engine.request import RequestState

#: Heap keys are ``step << SEQ_BITS | seq``: one int compares faster than a tuple, and ties cannot occur.
SEQ_BITS = 40


class DecodeGroup:
    """Running decodes sharing one step counter; see the module docstring."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        #: Steps the group has taken; a member's computed tokens are ``decode_offset + steps``.
        self.steps = 0
        #: When every member's last token was produced.
        self.last = -1.0
        #: Members by admission sequence number (``RequestState.seq``).
        self.members: dict[int, RequestState] = {}
        #: Sum of members' ``decode_offset``: the batch's context length is ``offset_sum + size * steps``.
        self.offset_sum = 0
        #: ``by_phase[p]``: members that allocate a block in the steps where ``steps % block_size == p``.
        self.by_phase: list[dict[int, RequestState]] = [{} for _ in range(block_size)]
        #: Members per LoRA adapter, and per adapter a heap of their ``seq`` (stale entries dropped lazily).
        self.adapters: dict[str, int] = {}
        self._adapter_seqs: dict[str, list[int]] = {}
        self._finishes: list[int] = []
        #: Tokens of the ``StepOutput`` being built that the shared count does not cover (see ``join``).
        self.ledger: dict[str, int] | None = None
        self.ledger_origin = 0

    def __len__(self) -> int:
        return len(self.members)

    # -- membership ---------------------------------------------------------------------------------------

    def join(self, request: RequestState) -> None:
        """Add a request that just sampled a token at ``last`` (``num_computed_tokens == num_tokens - 1``)."""
        offset = request.num_computed_tokens - self.steps
        request.decode_offset = offset
        seq = request.seq
        self.members[seq] = request
        self.by_phase[-offset % self.block_size][seq] = request
        self.offset_sum += offset
        heapq.heappush(self._finishes, self._finish_step(request) << SEQ_BITS | seq)
        if request.lora is not None:
            self.adapters[request.lora] = self.adapters.get(request.lora, 0) + 1
            heapq.heappush(self._adapter_seqs.setdefault(request.lora, []), seq)
        if self.ledger is not None:
            # Members present at the end of an output get ``steps - origin`` tokens: discount the steps
            # before this one joined.
            rid = request.request_id
            self.ledger[rid] = self.ledger.get(rid, 0) - (self.steps - self.ledger_origin)

    def leave(self, request: RequestState) -> None:
        """Remove a member, writing its counts and last token time back into its state."""
        seq, offset = request.seq, request.decode_offset
        del self.members[seq]
        del self.by_phase[-offset % self.block_size][seq]
        self.offset_sum -= offset
        self._write_back(request)
        if request.lora is not None:
            left = self.adapters[request.lora] - 1
            if left:
                self.adapters[request.lora] = left
            else:
                del self.adapters[request.lora]
                del self._adapter_seqs[request.lora]
        if self.ledger is not None:
            rid = request.request_id
            self.ledger[rid] = self.ledger.get(rid, 0) + (self.steps - self.ledger_origin)

    def sync(self) -> None:
        """Write every member's current counts into its state (for callers that inspect the batch)."""
        for request in self.members.values():
            self._write_back(request)

    def _write_back(self, request: RequestState) -> None:
        computed = request.decode_offset + self.steps
        request.num_computed_tokens = computed
        request.num_output_tokens = computed - request.num_prompt_tokens + 1
        request.last_token = self.last

    # -- what the next steps hold -------------------------------------------------------------------------

    def kv_tokens_read(self) -> int:
        """Context length summed over the members after this step's token: what attention reads."""
        return self.offset_sum + len(self.members) * (self.steps + 1)

    def block_events(self, step: int) -> tuple[dict[int, RequestState], dict[int, RequestState]]:
        """Members that allocate a block in ``step``, and those whose token fills their last block."""
        size = self.block_size
        return self.by_phase[step % size], self.by_phase[(step + 1) % size]

    def blocks_needed(self, steps: int) -> int:
        """New blocks the members need for the next ``steps`` steps (one per phase class per period)."""
        size, start, total = self.block_size, self.steps, 0
        for phase, members in enumerate(self.by_phase):
            if members:
                total += len(members) * ((start + steps - 1 - phase) // size - (start - 1 - phase) // size)
        return total

    def steps_to_first_finish(self) -> int:
        """Steps until (and including) the one in which the first member samples its last token."""
        heap, members = self._finishes, self.members
        while heap:
            key = heap[0]
            request = members.get(key & ((1 << SEQ_BITS) - 1))
            if request is not None and self._finish_step(request) == key >> SEQ_BITS:
                return (key >> SEQ_BITS) - self.steps + 1
            heapq.heappop(heap)
        return 1 << 62

    def pop_finishing(self) -> list[RequestState]:
        """Members whose last token is sampled in the current step, in admission order (still members)."""
        heap, members, step = self._finishes, self.members, self.steps
        finishing, previous = [], -1
        while heap and heap[0] >> SEQ_BITS <= step:
            key = heapq.heappop(heap)
            if key == previous:
                continue  # a member that left and rejoined in step has its entry twice
            previous = key
            request = members.get(key & ((1 << SEQ_BITS) - 1))
            if request is not None and self._finish_step(request) == key >> SEQ_BITS == step:
                finishing.append(request)
        return finishing

    def first_seq_by_adapter(self) -> dict[str, int]:
        """Each adapter's earliest admitted member: the batch lists adapters in that order (LRU refresh)."""
        firsts, members = {}, self.members
        for adapter, heap in self._adapter_seqs.items():
            while heap[0] not in members:
                heapq.heappop(heap)
            firsts[adapter] = heap[0]
        return firsts

    def _finish_step(self, request: RequestState) -> int:
        """The step in which a member samples its ``max_tokens``-th token."""
        return request.max_tokens + request.num_prompt_tokens - 2 - request.decode_offset
