"""The strategy registry: header names -> strategy instances, built per gateway (or simulator run).

Each gateway owns its instances, because some strategies learn from their
decisions (prefix index, session table, fairness counters). Presets and
weighted combinations are ``WeightedStrategy`` objects over the same instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway_plugins.config import RoutingSettings
from gateway_plugins.routing.strategies.affinity import LoraAffinityStrategy, SessionAffinityStrategy
from gateway_plugins.routing.strategies.base import MetricsStrategy, Stateless, Strategy
from gateway_plugins.routing.strategies.combined import WeightedStrategy, canonical_name, parse_weighted
from gateway_plugins.routing.strategies.fairness import VirtualTokenCounterStrategy
from gateway_plugins.routing.strategies.gpu_type import GpuTypeStrategy
from gateway_plugins.routing.strategies.load import (
    LeastGpuCacheStrategy,
    LeastKvCacheStrategy,
    LeastLatencyStrategy,
    LeastQueueStrategy,
    LeastRequestStrategy,
    PowerOfTwoStrategy,
    RandomStrategy,
    RoundRobinStrategy,
    ThroughputStrategy,
)
from gateway_plugins.routing.strategies.prefix import (
    PrefixCacheAndLoadStrategy,
    PrefixCacheStrategy,
    PrefixIndex,
    load_tokenizer,
)

__all__ = [
    "ALIASES",
    "MetricsStrategy",
    "Stateless",
    "Strategy",
    "WeightedStrategy",
    "build_strategies",
    "canonical_name",
    "parse_weighted",
]

#: Presets every gateway has; ``routing.presets`` adds others (or redefines these).
BUILTIN_PRESETS = {
    # The Gateway API Inference Extension's default scoring: queue 2, KV cache 2, prefix 3.
    "inference-extension": "least-queue:2,least-kv-cache:2,prefix-cache:3",
}
#: Other names clients use for the same strategy.
ALIASES = {"prefix-cache-preble": PrefixCacheAndLoadStrategy.name}


def build_strategies(
    settings: RoutingSettings | None = None, *, clock: Callable[[], float] = time.monotonic
) -> dict[str, Strategy]:
    """Fresh instances of every strategy, alias and preset, keyed by the name a client may send.

    ``clock`` drives expiry (prefix blocks, sessions, fairness decay): the simulator passes its virtual time.
    """
    settings = settings or RoutingSettings()
    prefix = settings.prefix_cache
    index = PrefixIndex(prefix, clock, load_tokenizer(prefix.tokenizer) if prefix.tokenizer else None)
    singles: list[Strategy] = [
        RandomStrategy(),
        RoundRobinStrategy(),
        LeastRequestStrategy(),
        PowerOfTwoStrategy(),
        LeastQueueStrategy(),
        LeastKvCacheStrategy(),
        LeastGpuCacheStrategy(),
        ThroughputStrategy(),
        LeastLatencyStrategy(),
        PrefixCacheStrategy(index, prefix, settings.load_guard),
        PrefixCacheAndLoadStrategy(index, prefix, settings.load_guard),
        LoraAffinityStrategy(settings.load_guard),
        SessionAffinityStrategy(settings.session_affinity, settings.load_guard, clock),
        VirtualTokenCounterStrategy(settings.fairness, clock),
        GpuTypeStrategy(settings.gpu_type),
    ]
    strategies: dict[str, Strategy] = {s.name: s for s in singles}
    for alias, target in ALIASES.items():
        strategies[alias] = strategies[target]
    for name, spec in {**BUILTIN_PRESETS, **settings.presets}.items():
        try:
            preset = parse_weighted(spec, strategies)
        except ValueError as exc:
            raise ValueError(f"routing preset {name!r}: {exc}") from None
        preset.name = name  # type: ignore[misc]
        strategies[name] = preset
    return strategies
