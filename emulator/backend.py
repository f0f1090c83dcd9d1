"""What the emulator's HTTP layer asks of an engine, and the simplest engine that answers.

``Backend`` is the seam between the OpenAI surface (``emulator.server``) and an
engine model. ``InstantBackend`` serves every request at once with a fixed
time to first token and inter-token latency: no queue, no cache. It is the
trivial engine of the overhead benchmark, where the engine must cost nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    model: str
    prompt_tokens: list[int]
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class EngineCounters:
    """Cumulative numbers behind the vLLM metrics the emulator exports."""

    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0


class Backend(Protocol):
    model: str
    counters: EngineCounters

    def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """Yield the index of each output token as the engine produces it."""
        ...


class InstantBackend:
    def __init__(self, model: str, *, ttft: float = 0.0, inter_token: float = 0.0) -> None:
        self.model = model
        self.ttft = ttft
        self.inter_token = inter_token
        self.counters = EngineCounters()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        counters = self.counters
        counters.running += 1
        counters.prompt_tokens += len(request.prompt_tokens)
        try:
            for index in range(request.max_tokens):
                delay = self.ttft if index == 0 else self.inter_token
                if delay:
                    await asyncio.sleep(delay)
                counters.generation_tokens += 1
                yield index
            counters.requests_finished += 1
        finally:
            counters.running -= 1
