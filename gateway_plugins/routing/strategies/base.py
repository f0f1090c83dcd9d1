"""What every strategy is: a scoring function over (request, candidate pods), higher is better.

``select.rank`` turns scores into a choice. Strategies that learn from their
decisions (prefix indexes, session tables, fairness counters) also implement
``on_routed`` and ``on_finished``; the router calls them for the strategy that
made the decision, once it is committed. ``score`` itself changes nothing a
decision depends on: it may be called for a request that is never routed. A
strategy is built from a ``StrategyContext`` (the registry calls its factory),
which gives it its settings, its clock and the only random source it may use.

Metric-reading strategies share one rule for pods whose record is unknown
(``PodState.metrics is None``: none yet, or stale): when some candidates are
known, an unknown pod scores the mean of the known ones (neither preferred as
idle nor avoided as saturated); when none is known, the strategy routes by
in-flight requests (least-request) and says so by returning ``FallbackScores``:
the router counts the decision as that strategy's fallback once it commits it.
Nothing falls back to random silently.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, TypeVar

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.config import LoadGuardSettings, RoutingSettings
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.types import PodState, RoutingRequest

T = TypeVar("T")


class Strategy(Protocol):
    name: ClassVar[str]
    #: Whether ``score`` reads ``PodState.metrics``; the router counts its decisions made while some
    #: candidate's metrics were unknown.
    uses_metrics: ClassVar[bool]

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        """One score per pod, higher is better; ``FallbackScores`` when a fallback rule made them."""
        ...

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        """Called once the router has committed ``request`` to ``pod``."""
        ...

    def on_finished(self, request: RoutingRequest, pod: PodState) -> None:
        """Called once the request ``on_routed`` saw has finished, however it ended."""
        ...


@dataclass(frozen=True, slots=True)
class StrategyContext:
    """What a strategy is built from: its settings, and the sources of time and chance it must use."""

    settings: RoutingSettings
    #: Expires learnt state (prefix blocks, sessions, fairness decay): virtual time in the simulator.
    clock: Callable[[], float]
    #: The only random source a strategy may draw from: seeded by the simulator, unseeded in the gateway.
    rng: random.Random
    #: ``routing.plugins.<name>`` of the strategy being built (read-only): a plugin's own settings.
    options: Mapping[str, Any]
    #: The engines' own prefix caches from their KV events; None where no engine's events are read.
    kv_index: KvBlockIndex | None = None
    #: Objects the strategies of one build share, by key (``shared``); ``replace`` keeps the same dict.
    _shared: dict[object, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: object, make: Callable[[], T]) -> T:
        """The one object every strategy of this build gets for ``key``, made by ``make`` on first use."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]  # type: ignore[no-any-return]


class FallbackScores(list[float]):
    """Scores made by a strategy's explicit fallback rule, not its own (see the module doc).

    A list like any other scores, so only the fallback path pays for the type (one copy); the router
    counts a committed decision made on them as a fallback of the strategy that returned them.
    """

    #: Set by a weighted combination: its parts that fell back, which the router counts instead.
    strategies: tuple[str, ...] = ()


class Stateless:
    """Base for strategies with nothing to learn from their decisions."""

    name: ClassVar[str]
    uses_metrics: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        """The registry's factory (see ``registry``); a strategy without settings needs nothing."""
        return cls()

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        return None

    def on_finished(self, request: RoutingRequest, pod: PodState) -> None:
        return None


def least_load_scores(pods: Sequence[PodState]) -> list[float]:
    """Fewer requests in flight (from every gateway replica) is better."""
    return [-float(pod.load) for pod in pods]


def overloaded(pods: Sequence[PodState], guard: LoadGuardSettings) -> list[bool]:
    """The load guard: pods far busier than the rest must not take more work for the sake of affinity.

    A pod is overloaded when its in-flight count exceeds both ``guard.ratio`` x the candidates' mean
    and the least loaded candidate's count + ``guard.min_gap``.
    """
    loads = [pod.load for pod in pods]
    threshold = max(guard.ratio * sum(loads) / len(loads), min(loads) + guard.min_gap)
    return [load > threshold for load in loads]


class MetricsStrategy(Stateless):
    """A strategy whose score of a pod is a function of its metrics record (see the module doc)."""

    uses_metrics: ClassVar[bool] = True

    def pod_score(self, request: RoutingRequest, pod: PodState, metrics: PodMetrics) -> float:
        raise NotImplementedError

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        return self.with_unknown(
            [None if pod.metrics is None else self.pod_score(request, pod, pod.metrics) for pod in pods], pods
        )

    def with_unknown(self, scores: list[float | None], pods: Sequence[PodState]) -> Sequence[float]:
        """Per-pod scores, ``None`` where the pod's metrics are unknown, completed by the module's rule."""
        known = [s for s in scores if s is not None]
        if not known:
            return FallbackScores(least_load_scores(pods))
        if len(known) < len(scores):
            mean = sum(known) / len(known)
            return [mean if s is None else s for s in scores]
        return known
