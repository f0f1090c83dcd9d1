"""What every strategy is: a scoring function over (request, candidate pods), higher is better.

``select.rank`` turns scores into a choice. Strategies that learn from their
decisions (prefix indexes, session tables, fairness counters) also implement
``on_routed`` and ``on_finished``; the router calls them for the strategy that
made the decision.

Metric-reading strategies share one rule for pods whose record is unknown
(``PodState.metrics is None``: none yet, or stale): when some candidates are
known, an unknown pod scores the mean of the known ones (neither preferred as
idle nor avoided as saturated); when none is known, the strategy routes by
in-flight requests (least-request) and counts the decision in ``fallbacks``.
Nothing falls back to random silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.config import LoadGuardSettings
from gateway_plugins.routing.types import PodState, RoutingRequest


class Strategy(Protocol):
    name: ClassVar[str]
    #: Whether ``score`` reads ``PodState.metrics``; the router counts its decisions made while some
    #: candidate's metrics were unknown.
    uses_metrics: ClassVar[bool]
    #: Decisions this strategy made by an explicit fallback rule instead of its own (see the module doc).
    fallbacks: int

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        """One score per pod, higher is better."""
        ...

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        """Called once the router has committed ``request`` to ``pod``."""
        ...

    def on_finished(self, request: RoutingRequest, pod: PodState) -> None:
        """Called once the request ``on_routed`` saw has finished, however it ended."""
        ...


class Stateless:
    """Base for strategies with nothing to learn from their decisions."""

    uses_metrics: ClassVar[bool] = False
    fallbacks: int = 0

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

    def __init__(self) -> None:
        self.fallbacks = 0

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
            self.fallbacks += 1
            return least_load_scores(pods)
        if len(known) < len(scores):
            mean = sum(known) / len(known)
            return [mean if s is None else s for s in scores]
        return known
