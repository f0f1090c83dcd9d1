"""The routing strategies, registered by name (``registry``): built per gateway (or simulator run).

Each gateway owns its instances, because some strategies learn from their
decisions (prefix index, session table, fairness counters). Presets and
weighted combinations are ``WeightedStrategy`` objects over the same instances.
Importing this package imports every built-in strategy's module, which is what
registers them.
"""

from __future__ import annotations

from gateway_plugins.routing.strategies.affinity import LoraAffinityStrategy, SessionAffinityStrategy
from gateway_plugins.routing.strategies.base import (
    FallbackScores,
    MetricsStrategy,
    Stateless,
    Strategy,
    StrategyContext,
)
from gateway_plugins.routing.strategies.combined import WeightedStrategy, canonical_name, parse_weighted
from gateway_plugins.routing.strategies.fairness import VirtualTokenCounterStrategy
from gateway_plugins.routing.strategies.gpu_type import GpuTypeStrategy
from gateway_plugins.routing.strategies.load import (
    LeastKvCacheStrategy,
    LeastLatencyStrategy,
    LeastQueueStrategy,
    LeastRequestStrategy,
    PowerOfTwoStrategy,
    RandomStrategy,
    RoundRobinStrategy,
    ThroughputStrategy,
)
from gateway_plugins.routing.strategies.prefix import PrefixCacheAndLoadStrategy, PrefixCacheStrategy
from gateway_plugins.routing.strategies.registry import (
    BUILTIN_PRESETS,
    GROUP,
    Registration,
    build_strategies,
    builtin_aliases,
    installed_plugins,
    strategy,
)

__all__ = [
    "ALIASES",
    "BUILTIN_PRESETS",
    "GROUP",
    "FallbackScores",
    "GpuTypeStrategy",
    "LeastKvCacheStrategy",
    "LeastLatencyStrategy",
    "LeastQueueStrategy",
    "LeastRequestStrategy",
    "LoraAffinityStrategy",
    "MetricsStrategy",
    "PowerOfTwoStrategy",
    "PrefixCacheAndLoadStrategy",
    "PrefixCacheStrategy",
    "RandomStrategy",
    "Registration",
    "RoundRobinStrategy",
    "SessionAffinityStrategy",
    "Stateless",
    "Strategy",
    "StrategyContext",
    "ThroughputStrategy",
    "VirtualTokenCounterStrategy",
    "WeightedStrategy",
    "build_strategies",
    "canonical_name",
    "installed_plugins",
    "parse_weighted",
    "strategy",
]

#: Other names clients use for a built-in strategy, and the strategy each one means.
ALIASES = builtin_aliases()
