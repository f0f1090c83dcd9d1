"""Scrape the engine on a fixed interval and publish one pod-metrics record per scrape to Redis.

Publishing is one round trip: ``SET key record PX ttl`` and ``PUBLISH channel
record`` in one pipeline. An engine that stops answering is published as
unhealthy at once (and disappears when the record's TTL runs out, should the
sidecar die with it); a Redis outage is logged once, retried with backoff and
does not stop scraping.

Each record also carries the LoRA adapters registered with the engine
(``adapters``), as last listed by the adapter manager (``set_adapters``): that
list changes rarely, so it is read on its own, slower cadence, not per scrape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from brickyard_core.podmetrics import (
    POD_CHANNEL,
    EngineSample,
    MetricsWindow,
    PodMetrics,
    encode_record,
    pod_key,
)
from runtime_sidecar.config import SidecarSettings
from runtime_sidecar.scrape import ScrapeError, parse_metrics

log = logging.getLogger(__name__)
_BACKOFF_MAX = 5.0


class MetricsPublisher:
    def __init__(
        self, settings: SidecarSettings, session: aiohttp.ClientSession, redis: aioredis.Redis | None
    ) -> None:
        self.settings = settings
        self.session = session
        self.redis = redis
        self.window = MetricsWindow(settings.window_seconds, gpu_type=settings.gpu_type)
        self.engine_type = None if settings.engine == "auto" else settings.engine
        self.latest: PodMetrics | None = None
        self.last_sample: EngineSample | None = None
        #: Adapters registered with the engine, as last listed.
        self.adapters: tuple[str, ...] = ()
        self.published = 0
        self._key = pod_key(settings.namespace, settings.pod)
        self._redis_down_since: float | None = None
        self._redis_retry_at = 0.0
        self._backoff = 0.5

    async def run(self) -> None:
        """Scrape and publish every ``interval_seconds`` until cancelled."""
        interval = self.settings.interval_seconds
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            record = await self.scrape()
            await self.publish(record)
            next_tick += interval
            delay = next_tick - loop.time()
            if delay < 0:  # fell behind (a slow scrape): start a fresh schedule rather than burst
                next_tick, delay = loop.time(), 0
            await asyncio.sleep(delay)

    def set_adapters(self, adapters: tuple[str, ...]) -> None:
        """The engine's adapters as just listed: every record from the next scrape on carries them."""
        if adapters != self.adapters:
            log.info("engine adapters changed", extra={"adapters": list(adapters)})
            self.adapters = adapters

    async def scrape(self) -> PodMetrics:
        """One scrape turned into a record; an engine that does not answer yields an unhealthy record."""
        now = time.time()
        timeout = aiohttp.ClientTimeout(total=self.settings.scrape_timeout_seconds)
        try:
            async with self.session.get(f"{self.settings.engine_url}/metrics", timeout=timeout) as response:
                if response.status != 200:
                    raise ScrapeError(f"/metrics answered {response.status}")
                text = await response.text()
            self.engine_type, sample = parse_metrics(text, now, self.engine_type)
            sample = dataclasses.replace(sample, adapters=self.adapters)
        except (aiohttp.ClientError, TimeoutError, ScrapeError) as exc:
            if self.latest is None or self.latest.healthy:
                log.warning("engine not answering its metrics: %s", exc or type(exc).__name__)
            self.latest = self._unhealthy(now)
            return self.latest
        if self.latest is not None and not self.latest.healthy:
            log.info("engine answering its metrics again")
        self.last_sample = sample
        self.window.engine_type = self.engine_type
        self.latest = self.window.update(sample)
        return self.latest

    def _unhealthy(self, now: float) -> PodMetrics:
        last = self.latest
        return PodMetrics(
            timestamp=now,
            healthy=False,
            block_size=last.block_size if last else 0,
            num_blocks=last.num_blocks if last else 0,
            max_loras=last.max_loras if last else 0,
            adapters=self.adapters,
            gpu_type=self.settings.gpu_type,
            engine_type=self.engine_type or "",
        )

    async def publish(self, record: PodMetrics) -> None:
        if self.redis is None or time.monotonic() < self._redis_retry_at:
            return
        data = encode_record(self.settings.namespace, self.settings.pod, record)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(self._key, data, px=int(self.settings.ttl_seconds * 1000))
                pipe.publish(POD_CHANNEL, data)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            if self._redis_down_since is None:
                self._redis_down_since = time.monotonic()
                log.warning("cannot publish to Redis, retrying with backoff: %s", exc)
            self._redis_retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            return
        if self._redis_down_since is not None:
            log.info("publishing to Redis again after %.1f s", time.monotonic() - self._redis_down_since)
            self._redis_down_since = None
        self._backoff = 0.5
        self.published += 1
