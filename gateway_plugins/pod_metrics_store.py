"""The gateway's copy of every pod's metrics record, and the in-flight counts of the other gateways.

Fed from Redis by subscription: each record a sidecar publishes reaches
``PodState.metrics`` within milliseconds (measured against polling in
bench/freshness). On (re)connection the store reads every stored record once
(``brickyard_core.podmetrics.read_records``, the controllers' reader too), so
nothing published while it was away is missed for long. Records older than
``stale_seconds`` are dropped to ``None``: strategies treat that pod's metrics
as unknown, never as saturated or idle.

Availability: a pod whose sidecar reports its engine unhealthy leaves routing
at once; a pod whose records stop while Redis is reachable (the pod died with
its sidecar) leaves routing when its record goes stale; both come back with
their next healthy record. Pods that never had a sidecar are never excluded.

LoRA adapters: each healthy record's ``adapters`` (those registered with the
engine) go to the registry, which makes them routable model names on that pod;
the registry re-indexes only when a pod's list changed. A record going stale
or unhealthy leaves the pod's adapters as they were: the engine still has them
registered, and whether the pod is routable at all is availability's call
(an adapter whose only pod is out answers 503, not 404).

Gateways behind one Envoy share load through the same connection: each
publishes its own per-pod in-flight counts every ``share_interval`` and adds
up the others' into ``PodState.remote_inflight``. A gateway silent for longer
than ``stale_seconds`` no longer counts.

Redis down: routing goes on with what the store holds and with local counts;
the outage is logged once; the store reconnects with backoff by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import orjson
from redis.exceptions import RedisError

from brickyard_core.credentials import redis_client
from brickyard_core.podmetrics import (
    INFLIGHT_CHANNEL,
    POD_CHANNEL,
    POD_KEY_PREFIX,
    PodMetrics,
    fresh_record,
    pod_key,
    read_records,
)
from gateway_plugins.discovery.registry import PodRegistry

log = logging.getLogger(__name__)
_BACKOFF_MAX = 5.0


class PodMetricsStore:
    def __init__(
        self,
        registry: PodRegistry,
        redis_url: str,
        *,
        stale_seconds: float = 2.0,
        share_interval: float = 0.05,
        gateway_id: str | None = None,
    ) -> None:
        self.registry = registry
        self.redis = redis_client(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.stale_seconds = stale_seconds
        self.share_interval = share_interval
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        #: Other gateways' last report: gateway id -> (time received, {pod key: in flight}).
        self._remote: dict[str, tuple[float, dict[str, int]]] = {}
        self.connected = asyncio.Event()
        self.records_received = 0
        self.redis_errors = 0
        self._down_since: float | None = None

    async def run(self) -> None:
        """Subscribe, share, sweep stale data; reconnect forever until cancelled."""
        sharing = asyncio.create_task(self._share(), name="inflight-share")
        sweeping = asyncio.create_task(self._sweep(), name="metrics-sweep")
        try:
            backoff = 0.2
            while True:
                try:
                    await self._subscribe()
                except (RedisError, OSError) as exc:
                    self._failed(exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                else:
                    backoff = 0.2
        finally:
            for task in (sharing, sweeping):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.redis.aclose()

    async def _subscribe(self) -> None:
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(POD_CHANNEL, INFLIGHT_CHANNEL)
            await self._load_stored()
            self._recovered()
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                if message["channel"] == POD_CHANNEL.encode():
                    self._apply(message["data"])
                else:
                    self._apply_inflight(message["data"])

    async def _load_stored(self) -> None:
        """Every stored record, once: what was published while we were not listening."""
        keys = [key async for key in self.redis.scan_iter(match=f"{POD_KEY_PREFIX}*", count=500)]
        for namespace, name, record in await read_records(self.redis, keys, max_age=self.stale_seconds):
            self._apply_record(namespace, name, record)

    def _apply(self, data: bytes) -> None:
        """A published record."""
        if (decoded := fresh_record(data, max_age=self.stale_seconds)) is not None:
            self._apply_record(*decoded)

    def _apply_record(self, namespace: str, name: str, record: PodMetrics) -> None:
        state = self.registry.state(namespace, name)
        if state is None:
            return
        if state.metrics is None or record.timestamp >= state.metrics.timestamp:
            state.apply_metrics(record)
            self.records_received += 1
            if record.healthy:
                self.registry.set_adapters(namespace, name, record.adapters)
            self.registry.set_available(namespace, name, record.healthy)

    def _apply_inflight(self, data: bytes) -> None:
        try:
            report = orjson.loads(data)
            gateway, counts = report["gateway"], report["inflight"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if gateway != self.gateway_id:
            self._remote[gateway] = (time.monotonic(), counts)
            self._sum_remote()

    def _sum_remote(self) -> None:
        totals: dict[str, int] = {}
        for _, counts in self._remote.values():
            for key, count in counts.items():
                totals[key] = totals.get(key, 0) + count
        for state in self.registry.states():
            state.remote_inflight = totals.get(pod_key(state.namespace, state.name), 0)

    async def _share(self) -> None:
        """Publish this gateway's in-flight counts: on change, and at least every second as a heartbeat."""
        last: dict[str, int] | None = None
        last_sent = 0.0
        while True:
            await asyncio.sleep(self.share_interval)
            counts = {pod_key(s.namespace, s.name): s.inflight for s in self.registry.states() if s.inflight}
            now = time.monotonic()
            if counts == last and now - last_sent < 1.0:
                continue
            try:
                await self.redis.publish(
                    INFLIGHT_CHANNEL, orjson.dumps({"gateway": self.gateway_id, "inflight": counts})
                )
            except (RedisError, OSError) as exc:
                self._failed(exc)
                continue
            last, last_sent = counts, now

    async def _sweep(self) -> None:
        """Drop records and gateway reports that are too old to trust."""
        while True:
            await asyncio.sleep(min(0.25, self.stale_seconds / 4))
            oldest = time.time() - self.stale_seconds
            for state in self.registry.states():
                if state.metrics is not None and state.metrics.timestamp < oldest:
                    state.apply_metrics(None)
                    if self.connected.is_set():  # Redis works, the pod went silent: it is gone
                        self.registry.set_available(state.namespace, state.name, False)
            silent = time.monotonic() - self.stale_seconds
            gone = [gateway for gateway, (seen, _) in self._remote.items() if seen < silent]
            if gone:
                for gateway in gone:
                    del self._remote[gateway]
                self._sum_remote()

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        self.connected.clear()
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Redis unavailable, routing on what the gateway holds: %s", exc)

    def _recovered(self) -> None:
        self.connected.set()
        if self._down_since is not None:
            log.info("Redis available again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
