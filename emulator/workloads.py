"""Workloads: named request generators and a JSONL trace format, shared by live and simulated runs.

A request's prompt is built from *segments*: shared ones (a system prompt, a
document, the history of a conversation) and fresh ones (a user's question).
Every segment is drawn as token ids from a vocabulary of words the tokenizer
maps to exactly one token each, so the text is derived from the ids only when
someone asks (``prompt_text``), and ``emulator.tokens.encode(text) == ids``
holds: the live emulator and the simulator see the same tokens, and equal
prefixes are equal.

Generators are deterministic given a seed, lazy (a 10-minute fleet run has
hundreds of thousands of requests) and time-ordered.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from emulator import tokens


@dataclass(slots=True)
class WorkloadRequest:
    arrival: float  # seconds from the start of the run
    prompt_ids: list[int]
    max_tokens: int
    model: str  # base model or LoRA adapter name
    user: str = ""
    session: str = ""
    text: str | None = None  # None: derived from prompt_ids on demand

    @property
    def prompt_text(self) -> str:
        if self.text is None:
            self.text = tokens.vocabulary().text(self.prompt_ids)
        return self.text

    def body(self) -> bytes:
        """The OpenAI completions request a client sends for it (the session travels in a header)."""
        fields: dict[str, object] = {
            "model": self.model,
            "prompt": self.prompt_text,
            "max_tokens": self.max_tokens,
        }
        if self.user:
            fields["user"] = self.user
        return orjson.dumps(fields)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "arrival": round(self.arrival, 6),
                "prompt": self.prompt_text,
                "max_tokens": self.max_tokens,
                "model": self.model,
                "user": self.user,
                "session": self.session,
            }
        )


@dataclass
class WorkloadSpec:
    """Knobs shared by every generator; each generator documents which it uses."""

    rate: float  # mean requests per second
    duration: float  # seconds of arrivals
    model: str = "llama-3.1-8b-instruct"
    seed: int = 0
    prompt_tokens: int = 512  # typical fresh prompt length
    output_tokens: int = 200  # typical output length
    shared_prefixes: int = 8  # shared-prefix: distinct system prompts
    prefix_tokens: int = 1024  # shared-prefix: system prompt length
    users: int = 200
    adapters: int = 50  # lora-mix
    zipf_s: float = 1.1  # lora-mix and shared-prefix popularity
    documents: int = 8  # long-document
    document_tokens: int = 6000
    turns: int = 6  # multi-turn: user turns per conversation
    think_time: float = 5.0  # multi-turn: mean seconds between a reply and the next turn


class _Draw:
    """The random draws every generator makes, from one seed."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self._np = np.random.default_rng(spec.seed)
        self._vocab = tokens.vocabulary()

    def length(self, mean: int) -> int:
        """Lengths vary around the mean (log-normal, like real prompts and replies)."""
        return max(1, int(self.rng.lognormvariate(math.log(mean) - 0.125, 0.5)))

    def segment(self, length: int) -> list[int]:
        return self._vocab.segment(self._np, length)

    def arrivals(
        self, rate_at: Callable[[float], float] | None = None, peak: float | None = None
    ) -> Iterator[float]:
        """Arrival times of a Poisson process at ``spec.rate`` (thinned when the rate varies in time;
        ``peak`` bounds ``rate_at``, else it is its maximum over a grid of 513 points)."""
        spec, rng = self.spec, self.rng
        if peak is None:
            peak = spec.rate if rate_at is None else max(rate_at(spec.duration * i / 512) for i in range(513))
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= spec.duration:
                return
            if rate_at is None or rng.random() * peak < rate_at(t):
                yield t

    def request(
        self,
        arrival: float,
        prompt_ids: list[int],
        *,
        output: int | None = None,
        model: str = "",
        user: str = "",
        session: str = "",
    ) -> WorkloadRequest:
        spec = self.spec
        return WorkloadRequest(
            arrival,
            prompt_ids,
            self.length(output or spec.output_tokens),
            model or spec.model,
            user=user or f"user-{self.rng.randrange(spec.users)}",
            session=session,
        )


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (rank**s) for rank in range(1, n + 1)]


def shared_prefix(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Many users, a few long system prompts (Zipf popularity), a short question each."""
    draw = _Draw(spec)
    prefixes = [draw.segment(spec.prefix_tokens) for _ in range(spec.shared_prefixes)]
    weights = _zipf_weights(spec.shared_prefixes, spec.zipf_s)
    question = max(8, spec.prompt_tokens // 8)
    for t in draw.arrivals():
        prefix = draw.rng.choices(prefixes, weights)[0]
        yield draw.request(t, prefix + draw.segment(draw.length(question)))


def no_sharing(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Unrelated prompts: nothing for a cache to reuse."""
    draw = _Draw(spec)
    for t in draw.arrivals():
        yield draw.request(t, draw.segment(draw.length(spec.prompt_tokens)))


def lora_mix(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Requests for ``adapters`` LoRA adapters of one base model, Zipf popularity."""
    draw = _Draw(spec)
    weights = _zipf_weights(spec.adapters, spec.zipf_s)
    names = [adapter_name(spec.model, i) for i in range(spec.adapters)]
    for t in draw.arrivals():
        model = draw.rng.choices(names, weights)[0]
        yield draw.request(t, draw.segment(draw.length(spec.prompt_tokens)), model=model)


def adapter_name(model: str, index: int) -> str:
    return f"{model}-lora-{index}"


def bursty_rate(spec: WorkloadSpec) -> tuple[Callable[[float], float], float]:
    """The arrival rate of ``bursty`` as a function of time, and its maximum."""

    def day(t: float) -> float:
        return spec.rate * (1 - 0.7 * math.cos(2 * math.pi * t / spec.duration))

    def rate_at(t: float) -> float:
        return day(t) * (1.8 if (t % 60) < 20 else 0.6)

    # The day peaks at mid-run: within a burst, the rate is highest at the point of it closest to mid-run.
    middle = spec.duration / 2
    starts = [60.0 * k for k in range(math.ceil(spec.duration / 60))]
    peak = max([0.6 * day(middle)] + [1.8 * day(min(max(middle, start), start + 20)) for start in starts])
    return rate_at, peak


def bursty(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Unrelated prompts whose rate follows a diurnal ramp with on/off bursts.

    Over the run (one "day") the rate swings between 0.3x and 1.7x of
    ``rate``, and alternates 20 s bursts at 1.8x with 40 s lulls at 0.6x.
    """
    rate_at, _ = bursty_rate(spec)
    draw = _Draw(spec)
    for t in draw.arrivals(rate_at):
        yield draw.request(t, draw.segment(draw.length(spec.prompt_tokens)))


def diurnal_rate(spec: WorkloadSpec) -> tuple[Callable[[float], float], float]:
    """The arrival rate of ``diurnal`` as a function of time, and its maximum.

    A day compressed into ``duration``: a raised cosine from 0.2x of ``rate`` at the start and the end to
    ``rate`` at mid-run, multiplied during flash crowds. Flash crowds start as a Poisson process (one
    every 240 s on average), last 60-150 s and multiply the rate by 1.3-1.5 (uniform draws); they are
    drawn from their own generator (``seed``), so the curve does not depend on the requests.
    """
    rng = random.Random(f"diurnal-bursts-{spec.seed}")
    bursts: list[tuple[float, float, float]] = []  # (start, end, factor)
    t = rng.expovariate(1 / 240)
    while t < spec.duration:
        length = rng.uniform(60, 150)
        bursts.append((t, t + length, rng.uniform(1.3, 1.5)))
        t += length + rng.expovariate(1 / 240)

    def day(t: float) -> float:
        return spec.rate * (0.2 + 0.8 * (1 - math.cos(2 * math.pi * t / spec.duration)) / 2)

    def rate_at(t: float) -> float:
        return day(t) * next((f for start, end, f in bursts if start <= t < end), 1.0)

    # The day peaks at mid-run: within a burst, the rate is highest at the point of it closest to mid-run.
    middle = spec.duration / 2
    peak = max([spec.rate] + [day(min(max(middle, start), end)) * f for start, end, f in bursts])
    return rate_at, peak


def diurnal(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Unrelated prompts whose rate follows a compressed day with flash crowds (``diurnal_rate``)."""
    rate_at, peak = diurnal_rate(spec)
    draw = _Draw(spec)
    for t in draw.arrivals(rate_at, peak):
        yield draw.request(t, draw.segment(draw.length(spec.prompt_tokens)))


def long_document(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Questions over a few large shared documents (Zipf popularity), short answers."""
    draw = _Draw(spec)
    documents = [draw.segment(spec.document_tokens) for _ in range(spec.documents)]
    weights = _zipf_weights(spec.documents, spec.zipf_s)
    for t in draw.arrivals():
        document = draw.rng.choices(documents, weights)[0]
        yield draw.request(t, document + draw.segment(draw.length(48)), output=spec.output_tokens // 2)


def multi_turn(spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    """Conversations whose context grows turn by turn: each prompt repeats the whole history.

    Conversations start as a Poisson process at ``rate / turns``; a turn
    follows the previous one after the reply would have been read (at 30
    tokens/s) plus an exponential think time. The reply in the history is the
    emulator's own deterministic reply (``tokens.reply``), so the history a real
    client would send is the one the engine cached.
    """
    draw = _Draw(WorkloadSpec(**{**spec.__dict__, "rate": spec.rate / spec.turns}))
    system = draw.segment(64)
    pending: list[
        tuple[float, int, list[int], int, str]
    ] = []  # heap: (time, tie-break, history, turn, session)
    starts = draw.arrivals()
    next_start = next(starts, None)
    counter = 0
    while next_start is not None or pending:
        if next_start is not None and (not pending or next_start <= pending[0][0]):
            counter += 1
            heapq.heappush(pending, (next_start, counter, system, 0, f"session-{counter}"))
            next_start = next(starts, None)
            continue
        t, _, history, turn, session = heapq.heappop(pending)
        prompt = history + draw.segment(draw.length(max(8, spec.prompt_tokens // 4)))
        request = draw.request(t, prompt, user=session, session=session)
        yield request
        later = t + request.max_tokens / 30.0 + draw.rng.expovariate(1 / spec.think_time)
        if turn + 1 < spec.turns and later < spec.duration:
            counter += 1
            reply, _ = tokens.reply(prompt, request.max_tokens)
            heapq.heappush(pending, (later, counter, prompt + reply, turn + 1, session))


WORKLOADS: dict[str, Callable[[WorkloadSpec], Iterator[WorkloadRequest]]] = {
    "shared-prefix": shared_prefix,
    "multi-turn": multi_turn,
    "no-sharing": no_sharing,
    "lora-mix": lora_mix,
    "bursty": bursty,
    "diurnal": diurnal,
    "long-document": long_document,
}


def generate(name: str, spec: WorkloadSpec) -> Iterator[WorkloadRequest]:
    try:
        return WORKLOADS[name](spec)
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


def write_trace(requests: Iterator[WorkloadRequest], path: Path) -> int:
    count = 0
    with path.open("wb") as out:
        for request in requests:
            out.write(request.to_json() + b"\n")
            count += 1
    return count


def read_trace(path: Path, *, model: str | None = None) -> Iterator[WorkloadRequest]:
    """A JSONL trace: ``arrival`` (s), ``prompt`` (text) or ``prompt_ids``, ``max_tokens``, ``model``,
    optional ``user`` and ``session``. Arrivals must not decrease."""
    last = 0.0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = orjson.loads(line)
            arrival = float(row["arrival"])
            if arrival < last:
                raise ValueError(f"{path}:{number}: arrivals must not decrease")
            last = arrival
            text = row.get("prompt", "")
            ids = row.get("prompt_ids") or tokens.encode(text)
            yield WorkloadRequest(
                arrival,
                ids,
                int(row["max_tokens"]),
                model or row["model"],
                row.get("user", ""),
                row.get("session", ""),
                text=text or None,
            )
