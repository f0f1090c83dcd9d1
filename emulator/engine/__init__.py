"""A deterministic, pure-Python model of one vLLM V1 engine (scheduler, paged KV cache, step time).

See docs/emulator-model.md for how it works and how faithful it is.
"""

from emulator.engine.core import EngineCore, StepOutput
from emulator.engine.kv_cache import BlockPool, KVCacheManager, PrefixCacheStats, hash_block
from emulator.engine.metrics import EngineMetrics, EngineStats, Histogram
from emulator.engine.request import (
    FINISHED_ABORT,
    FINISHED_LENGTH,
    Request,
    RequestResult,
    lora_id,
)

__all__ = [
    "FINISHED_ABORT",
    "FINISHED_LENGTH",
    "BlockPool",
    "EngineCore",
    "EngineMetrics",
    "EngineStats",
    "Histogram",
    "KVCacheManager",
    "PrefixCacheStats",
    "Request",
    "RequestResult",
    "StepOutput",
    "hash_block",
    "lora_id",
]
