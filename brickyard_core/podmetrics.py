"""The pod-metrics record: what an engine pod's sidecar publishes and routers read.

An engine exposes cumulative counters and instantaneous gauges (``EngineSample``);
routers want rates and recent means. ``MetricsWindow`` turns successive samples
into one ``PodMetrics`` record over a short trailing window. The runtime sidecar
feeds it samples parsed from the engine's ``/metrics``; the fleet simulator
feeds it samples read from its engine models: both produce records the same
way, so strategies see the same numbers in production and in simulation.

The bottom of this module is the Redis schema (keys, channels, TTLs, encoding)
that the sidecar writes, and the one reader of stored records (``read_records``)
that the gateway and the controllers share; see docs/pod-metrics.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from brickyard_core.defaults import METRICS_WINDOW_SECONDS

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class EngineSample:
    """One scrape of an engine: gauges now, counters since it started."""

    timestamp: float  # seconds (wall clock in production, virtual in the simulator)
    waiting: int
    running: int
    kv_usage: float
    prefix_queries: float = 0.0  # tokens looked up in the prefix cache
    prefix_hits: float = 0.0  # tokens found
    prefix_hit_rate: float | None = None  # engines that report a rate, not counters (SGLang)
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    ttft_sum: float = 0.0  # histogram sums and counts, seconds
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    queue_sum: float = 0.0
    queue_count: float = 0.0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_loras: int = 0
    block_size: int = 0
    num_blocks: int = 0
    #: LoRA adapters registered with the engine (its ``/v1/models``), whether or not in a GPU slot now.
    adapters: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class PodMetrics:
    """What routers read about a pod. Rates and means cover the trailing window."""

    timestamp: float  # when the engine was scraped, so readers can tell fresh from stale
    healthy: bool = True  # False: the engine stopped answering its /metrics
    waiting: int = 0  # requests queued in the engine
    running: int = 0  # requests in the running batch
    kv_usage: float = 0.0  # KV cache blocks in use, 0..1
    prefix_hit_rate: float = 0.0  # prefix-cache hits / queries (tokens)
    prompt_tps: float = 0.0  # prompt tokens per second
    generation_tps: float = 0.0  # output tokens per second
    ttft_mean: float = 0.0  # seconds
    tpot_mean: float = 0.0  # seconds per output token (inter-token latency)
    queue_mean: float = 0.0  # seconds waiting before scheduling
    prompt_tokens_mean: float = 0.0  # prompt tokens per request that got its first token
    running_adapters: tuple[str, ...] = ()  # LoRA adapters of requests in the running batch
    waiting_adapters: tuple[str, ...] = ()  # ... and of queued requests
    max_loras: int = 0  # LoRA slots on the GPU (0: LoRA disabled or unknown)
    adapters: tuple[str, ...] = ()  # LoRA adapters registered with the engine
    block_size: int = 0  # tokens per KV block
    num_blocks: int = 0  # KV blocks in the GPU cache (0: unknown)
    gpu_type: str = ""
    engine_type: str = "vllm"


class MetricsWindow:
    """Rates and means over the last ``window`` seconds of samples from one engine."""

    def __init__(
        self, window: float = METRICS_WINDOW_SECONDS, *, gpu_type: str = "", engine_type: str = "vllm"
    ) -> None:
        self.window = window
        self.gpu_type = gpu_type
        self.engine_type = engine_type
        self._samples: deque[EngineSample] = deque()

    def update(self, sample: EngineSample) -> PodMetrics:
        samples = self._samples
        if samples and _restarted(samples[-1], sample):
            samples.clear()  # counters began again from zero: a fresh window, not negative rates
        samples.append(sample)
        while len(samples) > 2 and sample.timestamp - samples[1].timestamp >= self.window:
            samples.popleft()
        first = samples[0]
        elapsed = sample.timestamp - first.timestamp

        def rate(name: str) -> float:
            return (getattr(sample, name) - getattr(first, name)) / elapsed if elapsed > 0 else 0.0

        def mean(total: str, count: str) -> float:
            n = getattr(sample, count) - getattr(first, count)
            return (getattr(sample, total) - getattr(first, total)) / n if n > 0 else 0.0

        queries = sample.prefix_queries - first.prefix_queries
        return PodMetrics(
            timestamp=sample.timestamp,
            waiting=sample.waiting,
            running=sample.running,
            kv_usage=sample.kv_usage,
            prefix_hit_rate=(
                sample.prefix_hit_rate
                if sample.prefix_hit_rate is not None
                else (sample.prefix_hits - first.prefix_hits) / queries
                if queries > 0
                else 0.0
            ),
            prompt_tps=rate("prompt_tokens"),
            generation_tps=rate("generation_tokens"),
            ttft_mean=mean("ttft_sum", "ttft_count"),
            tpot_mean=mean("itl_sum", "itl_count"),
            queue_mean=mean("queue_sum", "queue_count"),
            prompt_tokens_mean=mean("prompt_tokens", "ttft_count"),
            running_adapters=sample.running_adapters,
            waiting_adapters=sample.waiting_adapters,
            max_loras=sample.max_loras,
            adapters=sample.adapters,
            block_size=sample.block_size,
            num_blocks=sample.num_blocks,
            gpu_type=self.gpu_type,
            engine_type=self.engine_type,
        )


def _restarted(before: EngineSample, after: EngineSample) -> bool:
    return (
        after.prompt_tokens < before.prompt_tokens
        or after.generation_tokens < before.generation_tokens
        or after.prefix_queries < before.prefix_queries
    )


# -- Redis: the one place producer (sidecar) and consumers (gateway, controllers) agree on --------------

#: ``SET brickyard:pod:<namespace>/<name> <record JSON> PX <ttl>``: the latest record of each pod. A record
#: outlives its pod by at most the TTL, so a dead engine's pod vanishes from Redis on its own.
POD_KEY_PREFIX = "brickyard:pod:"
#: Every record is also ``PUBLISH``ed here, so readers learn of it within a millisecond instead of polling.
POD_CHANNEL = "brickyard:pods"
#: Gateways ``PUBLISH`` their own in-flight counts here (``{"gateway", "ts", "inflight": {pod key: n}}``),
#: so that several gateway replicas behind one Envoy see each other's load.
INFLIGHT_CHANNEL = "brickyard:inflight"
DEFAULT_TTL_SECONDS = 10.0
#: A record older than this is *unknown* to routing: never read as saturated, never read as idle.
DEFAULT_STALE_SECONDS = 2.0

_FIELDS = tuple(PodMetrics.__dataclass_fields__)


def pod_key(namespace: str, name: str) -> str:
    """The Redis key of a pod's record; also the pod's identity inside published messages."""
    return f"{POD_KEY_PREFIX}{namespace}/{name}"


def encode_record(namespace: str, name: str, metrics: PodMetrics) -> bytes:
    """A record as stored and published: the pod's identity plus every ``PodMetrics`` field."""
    return orjson.dumps({"namespace": namespace, "pod": name, **{f: getattr(metrics, f) for f in _FIELDS}})


def decode_record(data: bytes | str) -> tuple[str, str, PodMetrics]:
    """(namespace, pod name, metrics); raises ``ValueError`` on a malformed record."""
    try:
        raw = orjson.loads(data)
        fields = {f: raw[f] for f in _FIELDS if f in raw}
        for name in ("running_adapters", "waiting_adapters", "adapters"):
            fields[name] = tuple(fields.get(name, ()))
        return raw["namespace"], raw["pod"], PodMetrics(**fields)
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed pod-metrics record: {exc}") from exc


def fresh_record(
    data: bytes | str | None, *, max_age: float | None = None, now: float | None = None
) -> tuple[str, str, PodMetrics] | None:
    """A stored or published record, decoded; None when there is none, when it is malformed (logged: a
    sidecar out of step with this schema), or when it is older than ``max_age`` seconds."""
    if data is None:
        return None
    try:
        decoded = decode_record(data)
    except ValueError as exc:
        log.warning("ignoring a malformed pod-metrics record: %s", exc)
        return None
    if max_age is not None and (time.time() if now is None else now) - decoded[2].timestamp > max_age:
        return None
    return decoded


async def read_records(
    redis: Redis, keys: Sequence[str], *, max_age: float | None = None
) -> list[tuple[str, str, PodMetrics]]:
    """The records stored under ``keys`` (one ``MGET``) that ``fresh_record`` keeps, as (namespace, pod
    name, metrics). Redis failures (``RedisError``, ``OSError``) are the caller's to handle."""
    if not keys:
        return []
    now = time.time()
    found = (fresh_record(data, max_age=max_age, now=now) for data in await redis.mget(keys))
    return [record for record in found if record is not None]
