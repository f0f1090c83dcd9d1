"""What the emulator's HTTP layer asks of an engine, and the simplest engine that answers.

``Backend`` is the seam between the OpenAI surface (``emulator.server``) and
an engine. ``LiveEngine`` (``emulator.live``) runs the vLLM engine model in real
time; ``InstantBackend`` serves every request at once with a fixed time to
first token and inter-token latency: no queue, no cache, no batching. It is
the engine of the overhead benchmark, where the engine must cost nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from emulator.engine import EngineMetrics, EngineStats


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_tokens: list[int]
    max_tokens: int
    lora: str | None = None  # adapter name, None for the base model
    #: Prompt tokens the engine served from its prefix cache: known once the request is scheduled.
    cached_tokens: int = 0


class Backend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        """Yield the index of each output token as the engine produces it; closing the iterator aborts."""
        ...

    def stats(self) -> EngineStats:
        """What ``/metrics`` shows."""
        ...

    def status(self) -> dict[str, float]:
        """How the emulator itself is doing (e.g. how far behind real time it runs)."""
        ...


class InstantBackend:
    def __init__(self, *, ttft: float = 0.0, inter_token: float = 0.0, max_loras: int = 0) -> None:
        self.ttft = ttft
        self.inter_token = inter_token
        self.max_loras = max_loras
        self.metrics = EngineMetrics()
        self.running = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        metrics = self.metrics
        self.running += 1
        metrics.prompt_tokens += len(request.prompt_tokens)
        try:
            for index in range(request.max_tokens):
                delay = self.ttft if index == 0 else self.inter_token
                if delay:
                    await asyncio.sleep(delay)
                metrics.generation_tokens += 1
                yield index
            metrics.requests_finished["length"] = metrics.requests_finished.get("length", 0) + 1
        finally:
            self.running -= 1

    def status(self) -> dict[str, float]:
        return {}

    def stats(self) -> EngineStats:
        metrics = self.metrics
        return EngineStats(
            num_running=self.running,
            num_waiting=0,
            kv_cache_usage=0.0,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            prompt_tokens=metrics.prompt_tokens,
            generation_tokens=metrics.generation_tokens,
            num_preemptions=0,
            requests_finished=dict(metrics.requests_finished),
            running_lora_adapters=[],
            waiting_lora_adapters=[],
            max_loras=self.max_loras,
            block_size=16,
            num_blocks=0,
            histograms=metrics.histograms(),
        )
