"""An engine's ``/metrics`` text -> one ``EngineSample``, for vLLM (current and older names) and SGLang.

Parsing uses the official Prometheus text parser, fed only the families the
sample needs (an engine exposes dozens more; dropping them first halves the
parse). Series of several engine cores (data parallelism: label ``engine``)
are summed; KV usage is their mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from brickyard_core.podmetrics import EngineSample


@dataclass(frozen=True)
class EngineNames:
    """Metric family names of one engine type; the first present of each tuple is used."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]
    prefix_queries: tuple[str, ...]
    prefix_hits: tuple[str, ...]
    prefix_hit_rate: tuple[str, ...]  # a gauge, for engines without hit/query counters
    prompt_tokens: tuple[str, ...]
    generation_tokens: tuple[str, ...]
    ttft: tuple[str, ...]
    itl: tuple[str, ...]
    queue: tuple[str, ...]
    cache_config: tuple[str, ...]
    lora: tuple[str, ...]

    def all(self) -> set[str]:
        return {name for names in vars(self).values() for name in names}


VLLM = EngineNames(
    waiting=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prefix_queries=("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    prefix_hits=("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    prefix_hit_rate=("vllm:gpu_prefix_cache_hit_rate",),
    prompt_tokens=("vllm:prompt_tokens",),
    generation_tokens=("vllm:generation_tokens",),
    ttft=("vllm:time_to_first_token_seconds",),
    itl=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    queue=("vllm:request_queue_time_seconds",),
    cache_config=("vllm:cache_config_info",),
    lora=("vllm:lora_requests_info",),
)
SGLANG = EngineNames(
    waiting=("sglang:num_queue_reqs",),
    running=("sglang:num_running_reqs",),
    kv_usage=("sglang:token_usage",),
    prefix_queries=(),
    prefix_hits=(),
    prefix_hit_rate=("sglang:cache_hit_rate",),
    prompt_tokens=("sglang:prompt_tokens",),
    generation_tokens=("sglang:generation_tokens",),
    ttft=("sglang:time_to_first_token_seconds",),
    itl=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    queue=("sglang:queue_time_seconds",),
    cache_config=("sglang:cache_config_info",),
    lora=(),
)
ENGINES = {"vllm": VLLM, "sglang": SGLANG}


class ScrapeError(ValueError):
    """The text is not an engine's metrics (wrong endpoint, unknown engine, garbage)."""


def detect_engine(text: str) -> str:
    for engine in ENGINES:
        if f"\n{engine}:" in text or text.startswith(f"{engine}:") or f"# TYPE {engine}:" in text:
            return engine
    raise ScrapeError("no vllm: or sglang: metrics found")


def parse_metrics(text: str, timestamp: float, engine: str | None = None) -> tuple[str, EngineSample]:
    """(engine type, sample) from a ``/metrics`` body."""
    engine = engine or detect_engine(text)
    names = ENGINES[engine]
    wanted = names.all()
    families = {}
    try:
        for family in text_string_to_metric_families(_only(text, wanted)):
            families[family.name] = family
    except ValueError as exc:
        raise ScrapeError(f"unparsable metrics: {exc}") from exc

    def pick(candidates: tuple[str, ...]) -> list:
        for name in candidates:
            if name in families:
                return families[name].samples
        return []

    def total(candidates: tuple[str, ...], suffix: str = "") -> float:
        return sum(s.value for s in pick(candidates) if s.name.endswith(suffix))

    kv = [s.value for s in pick(names.kv_usage)]
    hit_rate = [s.value for s in pick(names.prefix_hit_rate)]
    block_size, num_blocks = _cache_config(pick(names.cache_config))
    running_adapters, waiting_adapters, max_loras = _lora(pick(names.lora))
    sample = EngineSample(
        timestamp=timestamp,
        waiting=int(total(names.waiting)),
        running=int(total(names.running)),
        kv_usage=sum(kv) / len(kv) if kv else 0.0,
        prefix_queries=total(names.prefix_queries, "_total"),
        prefix_hits=total(names.prefix_hits, "_total"),
        prefix_hit_rate=sum(hit_rate) / len(hit_rate) if hit_rate else None,
        prompt_tokens=total(names.prompt_tokens, "_total"),
        generation_tokens=total(names.generation_tokens, "_total"),
        ttft_sum=total(names.ttft, "_sum"),
        ttft_count=total(names.ttft, "_count"),
        itl_sum=total(names.itl, "_sum"),
        itl_count=total(names.itl, "_count"),
        queue_sum=total(names.queue, "_sum"),
        queue_count=total(names.queue, "_count"),
        running_adapters=running_adapters,
        waiting_adapters=waiting_adapters,
        max_loras=max_loras,
        block_size=block_size,
        num_blocks=num_blocks,
    )
    return engine, sample


def _only(text: str, families: set[str]) -> str:
    """The lines of ``text`` that belong to ``families`` (metadata lines included)."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in families or name.removesuffix("_total") in families or _histogram_family(name) in families:
            keep.append(line)
    return "\n".join(keep) + "\n"


def _histogram_family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cache_config(samples: Iterable) -> tuple[int, int]:
    for sample in samples:
        labels = sample.labels
        block_size = _count(labels.get("block_size")) or _count(labels.get("page_size"))
        blocks = _count(labels.get("num_gpu_blocks")) or _count(labels.get("num_pages"))
        if not blocks and block_size:
            blocks = _count(labels.get("kv_cache_size_tokens")) // block_size  # some CPU builds: tokens only
        return block_size, blocks
    return 0, 0


def _count(label: str | None) -> int:
    """A count from an info label; 0 for a missing one or vLLM's ``"None"`` (a setting left unset)."""
    return int(label) if label and label.isdigit() else 0


def _lora(samples: Iterable) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """vLLM reports LoRA state in labels of a gauge valued with a timestamp: the newest sample wins."""
    newest = None
    for sample in samples:
        if sample.labels.get("max_lora") and (newest is None or sample.value > newest.value):
            newest = sample
    if newest is None:
        return (), (), 0
    labels = newest.labels

    def names(key: str) -> tuple[str, ...]:
        return tuple(name for name in labels.get(key, "").split(",") if name)

    return names("running_lora_adapters"), names("waiting_lora_adapters"), int(labels["max_lora"])
