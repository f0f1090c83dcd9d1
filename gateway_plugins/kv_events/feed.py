"""The gateway's feed of engines' KV-cache events into the exact prefix index.

One subscription per pod discovery reports: a ZMQ SUB socket connected to the engine's event publisher
(vLLM binds ``tcp://*:PORT`` when its ``--kv-events-config`` endpoint has a wildcard), on the pod's IP
and the port of ``kv_events.port`` or the pod's ``brickyard.dev/kv-events-port`` annotation. Every
gateway replica subscribes on its own; a PUB socket serves any number of them.

With a replay port (``kv_events.replay_port`` or the ``brickyard.dev/kv-events-replay-port``
annotation), a new subscription first asks the engine for its buffered history from sequence 0: when
that history starts at 0 the pod's index is complete at once. After a gap in sequence numbers the
missing batches are asked for the same way; a gap no replay closes leaves the pod uncertain in the
index for a while (``KvBlockIndex``). Pods that leave discovery are unsubscribed and forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import zmq.asyncio

from gateway_plugins.config import KvEventSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.kv_events.subscriber import KVEventSubscriber
from gateway_plugins.routing.kv_index import KvBlockIndex, PodKey

log = logging.getLogger(__name__)

PORT_ANNOTATION = "brickyard.dev/kv-events-port"
REPLAY_PORT_ANNOTATION = "brickyard.dev/kv-events-replay-port"


class KvEventFeed:
    """Keeps one subscription per discovered pod and applies what arrives to ``index``."""

    def __init__(self, registry: PodRegistry, index: KvBlockIndex, settings: KvEventSettings) -> None:
        self.registry = registry
        self.index = index
        self.settings = settings
        self.context = zmq.asyncio.Context()
        self._followers: dict[PodKey, tuple[str, asyncio.Task[None]]] = {}
        self._changed = asyncio.Event()
        #: Batches applied, replays asked for, and replays that failed (timeout or malformed).
        self.batches = 0
        self.replays = 0
        self.replay_failures = 0
        self.malformed = 0

    async def run(self) -> None:
        """Follow the registry until cancelled; then close every subscription."""
        self.registry.on_change(self._changed.set)
        try:
            while True:
                self._reconcile()
                await self._changed.wait()
                self._changed.clear()
        finally:
            for _, task in self._followers.values():
                task.cancel()
            for _, task in self._followers.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.context.destroy(linger=0)

    def endpoints(self, pod: PodInfo) -> tuple[str, str | None]:
        """The pod's event endpoint and replay endpoint (None: none)."""
        host = pod.address.rpartition(":")[0] or pod.address
        port = _port(pod, PORT_ANNOTATION, self.settings.port)
        replay = _port(pod, REPLAY_PORT_ANNOTATION, self.settings.replay_port)
        return f"tcp://{host}:{port}", f"tcp://{host}:{replay}" if replay else None

    def _reconcile(self) -> None:
        wanted = {pod.key: pod for pod in self.registry.infos()}
        for key, (endpoint, task) in list(self._followers.items()):
            pod = wanted.get(key)
            if pod is None or self.endpoints(pod)[0] != endpoint:
                task.cancel()
                del self._followers[key]
                self.index.forget(key)
        for key, pod in wanted.items():
            if key not in self._followers:
                endpoint, replay = self.endpoints(pod)
                task = asyncio.create_task(self._follow(key, endpoint, replay), name=f"kv-events-{key[1]}")
                self._followers[key] = (endpoint, task)

    async def _follow(self, key: PodKey, endpoint: str, replay: str | None) -> None:
        subscriber = KVEventSubscriber(endpoint, bind=False, context=self.context).start()
        index = self.index
        try:
            if replay is not None:
                await self._replay(subscriber, key, replay, 0)
            while True:
                batch = await subscriber.recv()
                last = index.last_seq(key)
                expected = 0 if last is None else last + 1
                if replay is not None and batch.seq > expected:
                    await self._replay(subscriber, key, replay, expected)
                index.apply(key, batch.seq, batch.events)
                self.batches += 1
                self.malformed += subscriber.malformed
                subscriber.malformed = 0
        finally:
            subscriber.close()

    async def _replay(self, subscriber: KVEventSubscriber, key: PodKey, endpoint: str, start: int) -> None:
        """Apply the engine's buffered batches from ``start`` on; a history from 0 makes the pod complete."""
        self.replays += 1
        try:
            batches = await subscriber.replay(
                endpoint, start, wait_seconds=self.settings.replay_timeout_seconds
            )
        except (TimeoutError, ValueError, zmq.ZMQError) as exc:
            self.replay_failures += 1
            log.warning("no KV-event replay from %s: %s", endpoint, exc)
            return
        for batch in batches:
            self.index.apply(key, batch.seq, batch.events)
            self.batches += 1
        if start == 0 and batches and batches[0].seq == 0:
            self.index.complete(key)


def _port(pod: PodInfo, annotation: str, default: int) -> int:
    value = pod.annotations.get(annotation)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        log.warning(
            "pod %s/%s: %s=%r is not a port; using %d", pod.namespace, pod.name, annotation, value, default
        )
        return default
