"""The engine model in real time: the backend of a live emulated vLLM server.

One task runs the scheduler: it takes a step, sleeps until the step's modelled
end (virtual time is wall time since start times ``speed``), then hands each
request its new tokens. Steps that follow each other start at the previous
step's modelled end, so the small lateness of each wake-up does not accumulate;
how late the loop wakes up is recorded, so if the machine cannot keep up the
emulator says so instead of silently running slow.

With a ``KVEventPublisher`` the prefix-cache changes of each step are published as one batch when the step
ends (after its sleep, when its tokens are delivered), as vLLM publishes them after each step's forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from emulator.backend import GenerationRequest
from emulator.engine import EngineCore, EngineStats, Request

if TYPE_CHECKING:  # pyzmq and msgpack are needed only with KV events on
    from emulator.kv_events import KVEventPublisher

#: How far (wall seconds) the engine may run behind real time and still keep its own timeline; beyond it,
#: the next step starts now and the lost time is gone, as when a real GPU stalls.
_MAX_CATCH_UP = 0.05


class LiveEngine:
    def __init__(
        self, core: EngineCore, *, speed: float = 1.0, kv_events: KVEventPublisher | None = None
    ) -> None:
        self.core = core
        self.speed = speed
        self.kv_events = kv_events
        #: From a step's start until its events are published: a reset then waits its turn.
        self._step_in_flight = False
        if kv_events is not None:
            core.enable_kv_events()
        self._start = time.monotonic()
        self._deliveries: dict[str, asyncio.Queue[int]] = {}
        #: Prefix-cache hits of requests that finished in the step just delivered (gone from the core).
        self._cached_at_finish: dict[str, int] = {}
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
                count = await deliveries.get()
                if not produced:  # scheduled: its prefix-cache hits are known (kept if it already finished)
                    cached = self._cached_at_finish.pop(rid, None)
                    request.cached_tokens = self.core.cached_tokens(rid) if cached is None else cached
                for _ in range(count):
                    yield produced
                    produced += 1
        finally:
            del self._deliveries[rid]
            self._cached_at_finish.pop(rid, None)
            if produced < request.max_tokens:  # the client went away: free its slot and blocks
                self.core.abort(rid, self.now())

    async def _run(self) -> None:
        core, speed, publisher = self.core, self.speed, self.kv_events
        timeline = 0.0  # virtual end of the previous step
        while True:
            if not core.has_unfinished_requests:
                self._flush_kv_events()  # a reset during the last step
                self._work.clear()
                await self._work.wait()
                timeline = self.now()
                continue
            # Back-to-back steps follow the model's timeline, so wake-up lag does not add up step after step.
            self._step_in_flight = True
            out = core.step(max(timeline, self.now() - _MAX_CATCH_UP * speed))
            events = core.take_kv_events() if publisher is not None else None
            for result in out.finished:  # gone from the core already; its client may not have asked yet
                if result.request_id in self._deliveries:
                    self._cached_at_finish[result.request_id] = result.cached_prompt_tokens
            timeline = out.end
            if not out.num_steps:  # nothing schedulable (cannot happen with work queued); do not spin
                self._step_in_flight = False
                await asyncio.sleep(0.001)
                continue
            wake = self._start + out.end / speed
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            lag = max(0.0, time.monotonic() - wake)
            self.lag_max = max(self.lag_max, lag)
            self.lag_total += lag
            self.steps += 1
            if publisher is not None and events:
                publisher.publish(events)
            self._step_in_flight = False
            for rid, count in out.new_tokens.items():
                deliveries = self._deliveries.get(rid)
                if deliveries is not None:
                    deliveries.put_nowait(count)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's ``/reset_prefix_cache``. Its ``AllBlocksCleared`` goes out at once if the engine is idle,
        else after the step in flight (with the next step's batch, or alone if none follows); vLLM holds it
        until its next step in both cases, which for an idle engine is the next request."""
        if not self.core.reset_prefix_cache(reset_running_requests):
            return False
        if not self._step_in_flight and not self.core.has_unfinished_requests:
            self._flush_kv_events()
        return True

    def _flush_kv_events(self) -> None:
        """Publish, as a batch of their own, changes made outside a step (a reset while idle)."""
        if self.kv_events is not None:
            events = self.core.take_kv_events()
            if events:
                self.kv_events.publish(events)

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
