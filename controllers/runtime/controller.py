"""``Controller``: the reconcile loop, controller-runtime's shape.

Informer changes become keys on a ``WorkQueue``; ``workers`` tasks run ``reconcile(key) -> Result``.
Reconciles are level-triggered: a reconcile reads the world and converges, whatever woke it, so every key
of the primary informer is queued again each ``resync_seconds``. An exception re-queues the key with
backoff; a 409 Conflict is just that (the cache catches up and the next try reads the newer object).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from brickyard_core.kube.client import ApiError, Obj
from brickyard_core.kube.informer import Informer
from brickyard_core.kube.objects import object_key
from controllers.runtime.workqueue import WorkQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for: nothing (wait for a change or the resync), a visit after
    ``requeue_after`` seconds, or (``requeue``) another try with the key's backoff."""

    requeue_after: float | None = None
    requeue: bool = False


Reconcile = Callable[[str], Awaitable[Result]]
KeyMapper = Callable[[Obj], Iterable[str]]
Predicate = Callable[[Obj | None, Obj | None], bool]


def own_key(obj: Obj) -> Iterable[str]:
    return (object_key(obj),)


def generation_changed(old: Obj | None, new: Obj | None) -> bool:
    """controller-runtime's GenerationChangedPredicate, plus deletion marks: a controller's own writes
    (status, finalizers, annotations) do not wake it again; creation, spec changes and deletion do. The
    resync catches anything else."""
    if old is None or new is None:
        return True
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    return any(old_meta.get(k) != new_meta.get(k) for k in ("generation", "deletionTimestamp"))


@dataclass
class ControllerStats:
    reconciles: int = 0
    errors: int = 0
    conflicts: int = 0


class Controller:
    """Reconciles the keys its watches produce on ``workers`` tasks; resyncs every ``resync_seconds``."""

    def __init__(
        self,
        name: str,
        reconcile: Reconcile,
        primary: Informer,
        *,
        primary_keys: KeyMapper = own_key,
        primary_predicate: Predicate | None = None,
        workers: int = 2,
        resync_seconds: float = 10.0,
        backoff_base: float = 0.005,
        backoff_max: float = 60.0,
    ) -> None:
        self.name = name
        self.reconcile = reconcile
        self.primary = primary
        self.primary_keys = primary_keys
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.queue = WorkQueue(backoff_base=backoff_base, backoff_max=backoff_max)
        self.stats = ControllerStats()
        self.watch(primary, primary_keys, primary_predicate)

    def watch(
        self, informer: Informer, to_keys: KeyMapper = own_key, predicate: Predicate | None = None
    ) -> None:
        """Enqueue the keys ``to_keys`` maps each change to (of the old and of the new object)."""

        def handler(old: Obj | None, new: Obj | None) -> None:
            if predicate is not None and not predicate(old, new):
                return
            keys: set[str] = set()
            for obj in (old, new):
                if obj is not None:
                    keys.update(to_keys(obj))
            for key in keys:
                self.queue.add(key)

        informer.add_handler(handler)

    def enqueue_all(self) -> None:
        for obj in list(self.primary.cache.values()):
            for key in self.primary_keys(obj):
                self.queue.add(key)

    async def run(self) -> None:
        """Run the workers and the resync until cancelled (informers must be running and synced)."""
        tasks = [
            asyncio.create_task(self._worker(), name=f"{self.name}-worker-{i}") for i in range(self.workers)
        ]
        try:
            while True:
                self.enqueue_all()
                await asyncio.sleep(self.resync_seconds)
        finally:
            self.queue.shutdown()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                self.stats.reconciles += 1
                result = await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.conflict:
                    self.stats.conflicts += 1
                    log.info("%s %s: conflict, re-queued: %s", self.name, key, exc.message)
                else:
                    self.stats.errors += 1
                    log.warning("%s %s: API error, re-queued with backoff: %s", self.name, key, exc)
                self.queue.add_rate_limited(key)
            except Exception:
                self.stats.errors += 1
                log.exception("%s %s: reconcile failed, re-queued with backoff", self.name, key)
                self.queue.add_rate_limited(key)
            else:
                self.queue.forget(key)
                if result.requeue:
                    self.queue.add_rate_limited(key)
                elif result.requeue_after is not None:
                    self.queue.add_after(key, result.requeue_after)
            finally:
                self.queue.done(key)
