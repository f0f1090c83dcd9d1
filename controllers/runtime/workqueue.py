"""``WorkQueue``: client-go's rate-limited work queue, on the event loop.

Reconciles are level-triggered, so a key stands for "look at this object again", not for one change:

* a key queued twice is reconciled once;
* a key is never reconciled by two workers at once (added while being reconciled, it is queued again
  when that ends);
* a delayed add keeps the earliest due time;
* ``add_rate_limited`` waits the key's backoff (``backoff_base x 2^failures``, capped), reset by
  ``forget``.
"""

from __future__ import annotations

import asyncio
import collections


class WorkQueue:
    def __init__(self, *, backoff_base: float = 0.005, backoff_max: float = 60.0) -> None:
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._queue: collections.deque[str] = collections.deque()
        self._dirty: set[str] = set()  # wanted: queued, or to be queued when its reconcile ends
        self._processing: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[str, int] = {}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._ready.set()

    def add_after(self, key: str, delay: float) -> None:
        """Add ``key`` after ``delay`` seconds; an earlier pending add of the same key wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def add_rate_limited(self, key: str) -> None:
        """Add after this key's backoff: ``backoff_base x 2^failures``, capped at ``backoff_max``."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self.add_after(key, min(self.backoff_base * 2**failures, self.backoff_max))

    def forget(self, key: str) -> None:
        """Reset the key's backoff (it reconciled fine)."""
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> str:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._ready.set()

    def shutdown(self) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)
