"""The engine model in real time: the backend of a live emulated vLLM server.

One task runs the scheduler: it takes a step at the current virtual time,
sleeps for the step's modelled duration (divided by ``speed``), then hands each
request its new tokens. Virtual time is wall time since start times ``speed``,
so a late wake-up makes the next step start later, exactly like a slow GPU
iteration would. How late the loop wakes up is recorded: if the machine cannot
keep up, the emulator says so instead of silently running slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from emulator.backend import GenerationRequest
from emulator.engine import EngineCore, EngineStats, Request


class LiveEngine:
    def __init__(self, core: EngineCore, *, speed: float = 1.0) -> None:
        self.core = core
        self.speed = speed
        self._start = time.monotonic()
        self._deliveries: dict[str, asyncio.Queue[int]] = {}
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        #: Wake-up lag of the step loop (seconds, wall clock): how far behind real time it ran.
        self.lag_max = 0.0
        self.lag_total = 0.0
        self.steps = 0

    def now(self) -> float:
        """Virtual seconds since start."""
        return (time.monotonic() - self._start) * self.speed

    def stats(self) -> EngineStats:
        return self.core.stats()

    def status(self) -> dict[str, float]:
        return {
            "speed": self.speed,
            "steps": self.steps,
            "lag_max_seconds": self.lag_max,
            "lag_mean_seconds": self.lag_total / self.steps if self.steps else 0.0,
        }

    async def generate(self, request: GenerationRequest) -> AsyncIterator[int]:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="engine-steps")
        deliveries: asyncio.Queue[int] = asyncio.Queue()
        rid = request.request_id
        self.core.add_request(
            Request(rid, request.prompt_tokens, request.max_tokens, request.lora, self.now()), self.now()
        )
        self._deliveries[rid] = deliveries
        self._work.set()
        produced = 0
        try:
            while produced < request.max_tokens:
                for _ in range(await deliveries.get()):
                    yield produced
                    produced += 1
        finally:
            del self._deliveries[rid]
            if produced < request.max_tokens:  # the client went away: free its slot and blocks
                self.core.abort(rid, self.now())

    async def _run(self) -> None:
        core, speed = self.core, self.speed
        while True:
            if not core.has_unfinished_requests:
                self._work.clear()
                await self._work.wait()
                continue
            out = core.step(self.now())
            if not out.num_steps:  # nothing schedulable (cannot happen with work queued); do not spin
                await asyncio.sleep(0.001)
                continue
            wake = self._start + out.end / speed
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            lag = max(0.0, time.monotonic() - wake)
            self.lag_max = max(self.lag_max, lag)
            self.lag_total += lag
            self.steps += 1
            for rid, count in out.new_tokens.items():
                deliveries = self._deliveries.get(rid)
                if deliveries is not None:
                    deliveries.put_nowait(count)

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
