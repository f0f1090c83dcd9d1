"""Requests as the engine sees them: what a caller submits, the scheduler's state for it, and its result."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cache

from emulator import tokens

FINISHED_LENGTH = "length"
FINISHED_ABORT = "abort"


@dataclass(slots=True)
class Request:
    """A generation request: the prompt's token ids and how many tokens to generate (no EOS, as with
    vLLM's ``ignore_eos``). The generated tokens are ``tokens.reply(prompt_token_ids, max_tokens)``."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    lora: str | None = None
    arrival: float | None = None


#: ``tokens.reply`` walks the one-token vocabulary with this stride from a seed taken from the prompt. The
#: engine needs the same ids block by block, cheaply; tests check the two agree.
_REPLY_STRIDE = 7919


def reply_seed(prompt_ids: list[int]) -> int:
    return zlib.crc32(str(prompt_ids[-32:]).encode()) + len(prompt_ids)


def reply_ids(seed: int, start: int, count: int) -> tuple[int, ...]:
    """Generated tokens ``start .. start+count-1`` of a prompt with ``reply_seed`` ``seed``."""
    if count > _vocabulary_size():  # longer than the vocabulary: not one window
        ids = tokens.vocabulary().ids
        return tuple(ids[(seed + i * _REPLY_STRIDE) % len(ids)] for i in range(start, start + count))
    return reply_window(reply_phase(seed) + start, count)


def reply_phase(seed: int) -> int:
    """Where the reply of ``seed`` starts in the reply ordering (``_reply_ordering``).

    Token i of a reply is ``ids[(seed + i * stride) % size]``. The stride is prime, so coprime with the
    vocabulary size, and ``ids[k * stride % size]`` for k = 0, 1, ... visits every id once: token i is entry
    ``seed / stride + i (mod size)`` of that ordering, so any run of a reply is one slice of it.
    """
    return seed * _stride_inverse() % _vocabulary_size()


def reply_window(phase: int, count: int) -> tuple[int, ...]:
    """Entries ``phase .. phase+count-1`` (cyclically) of the reply ordering; ``count`` <= the vocabulary."""
    ordering = _reply_ordering()
    first = phase % _vocabulary_size()
    return tuple(ordering[first : first + count])


@cache
def reply_windows(count: int) -> list[tuple[int, ...]]:
    """``reply_window(phase, count)`` for every phase: one block of a reply is a list lookup."""
    return [reply_window(phase, count) for phase in range(_vocabulary_size())]


@cache
def _vocabulary_size() -> int:
    return len(tokens.vocabulary().ids)


@cache
def _stride_inverse() -> int:
    return pow(_REPLY_STRIDE, -1, _vocabulary_size())


@cache
def _reply_ordering() -> list[int]:
    """The vocabulary in the order replies walk it, twice over so that every window is one slice."""
    ids = tokens.vocabulary().ids
    ordering = [ids[k * _REPLY_STRIDE % len(ids)] for k in range(len(ids))]
    return ordering + ordering


def lora_id(name: str | None) -> int:
    """A stable integer for an adapter name: part of every block hash, like vLLM's ``lora_int_id``."""
    return 0 if name is None else zlib.crc32(name.encode()) + 1


@dataclass(slots=True, eq=False)
class RequestState:
    """The scheduler's view of one request (vLLM's ``Request``); compared by identity."""

    request_id: str
    prompt: list[int]
    num_prompt_tokens: int
    max_tokens: int
    lora: str | None
    lora_id: int
    #: Seed of the generated tokens (``tokens.reply``), fixed by the prompt, and where it puts the reply in
    #: the reply ordering (generated token i is entry ``reply_phase + i``; see ``reply_phase``).
    reply_seed: int
    reply_phase: int
    arrival: float
    #: Tokens whose KV is (or is being) computed; reset to 0 by a preemption (recompute mode).
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    #: The request's block table, in token order.
    block_ids: list[int] = field(default_factory=list)
    #: Chain hashes of the full blocks of its tokens computed so far (kept across preemptions).
    block_hashes: list[int] = field(default_factory=list)
    #: How many leading entries of ``block_ids`` are registered in the prefix cache.
    num_cached_blocks: int = 0
    #: Prompt tokens found in the prefix cache when first scheduled; -1 before.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    first_scheduled: float = -1.0
    first_token: float = -1.0
    last_token: float = -1.0
    #: Position in the running batch (a counter taken at each admission): the scheduler's order.
    seq: int = -1
    #: In the decode group: ``num_computed_tokens - group.steps`` when it joined (see ``engine/decode.py``).
    decode_offset: int = 0

    @classmethod
    def from_request(cls, request: Request, now: float) -> RequestState:
        seed = reply_seed(request.prompt_token_ids)
        return cls(
            request_id=request.request_id,
            prompt=list(request.prompt_token_ids),
            num_prompt_tokens=len(request.prompt_token_ids),
            max_tokens=request.max_tokens,
            lora=request.lora,
            lora_id=lora_id(request.lora),
            reply_seed=seed,
            reply_phase=reply_phase(seed),
            arrival=now if request.arrival is None else request.arrival,
        )

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a recomputation after preemption must rebuild."""
        return self.num_prompt_tokens + self.num_output_tokens

    def token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens ``start .. end-1`` of prompt + output, for hashing a block."""
        prompt_len = self.num_prompt_tokens
        if end <= prompt_len:
            return tuple(self.prompt[start:end])
        if start >= prompt_len:
            return reply_window(self.reply_phase + start - prompt_len, end - start)
        return tuple(self.prompt[start:]) + reply_window(self.reply_phase, end - prompt_len)


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What happened to a request; times are engine times (seconds), ``None`` when it never got there."""

    request_id: str
    lora: str | None
    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float
    prompt_tokens: int
    cached_prompt_tokens: int
    output_tokens: int
    preemptions: int
    finish_reason: str

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def mean_itl(self) -> float | None:
        """Mean time between output tokens (vLLM's TPOT)."""
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)

    @staticmethod
    def of(state: RequestState, now: float, reason: str) -> RequestResult:
        return RequestResult(
            request_id=state.request_id,
            lora=state.lora,
            arrival=state.arrival,
            first_scheduled=state.first_scheduled if state.first_scheduled >= 0 else None,
            first_token=state.first_token if state.first_token >= 0 else None,
            finished=now,
            prompt_tokens=state.num_prompt_tokens,
            cached_prompt_tokens=max(state.num_cached_tokens, 0),
            output_tokens=state.num_output_tokens,
            preemptions=state.num_preemptions,
            finish_reason=reason,
        )
