"""Routing strategies: pure scoring functions over (request, candidate pods).

A strategy returns one score per candidate, higher is better; ``select.rank``
turns scores into a choice. Strategies that learn from their own decisions
(prefix indexes, fairness counters) also get ``on_routed``. The registry maps
the names clients put in the ``routing-strategy`` header to factories, so each
gateway (or simulator run) owns its strategy instances.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

from gateway_plugins.routing.types import PodState, RoutingRequest


class Strategy(Protocol):
    name: ClassVar[str]
    #: Whether ``score`` reads ``PodState.metrics``; the router counts its decisions made while some
    #: candidate's metrics were unknown (``None``: no record yet, or older than the staleness bound).
    uses_metrics: ClassVar[bool]

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        """One score per pod, higher is better."""
        ...

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        """Called once the router has committed ``request`` to ``pod``."""
        ...


class Stateless:
    """Base for strategies with nothing to learn from their decisions."""

    uses_metrics: ClassVar[bool] = False

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        return None


class RandomStrategy(Stateless):
    """Uniformly random: the baseline every other strategy must beat."""

    name: ClassVar[str] = "random"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        rnd = random.random
        return [rnd() for _ in pods]


class LeastRequestStrategy(Stateless):
    """Fewest requests in flight; ties broken at random.

    Counts this gateway's own requests, which rise at the moment of selection
    (a burst arriving together spreads across pods instead of piling onto the
    one that looked idle), plus what the other gateway replicas last reported.
    """

    name: ClassVar[str] = "least-request"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        return [-(pod.inflight + pod.remote_inflight) for pod in pods]


STRATEGY_FACTORIES: dict[str, Callable[[], Strategy]] = {
    RandomStrategy.name: RandomStrategy,
    LeastRequestStrategy.name: LeastRequestStrategy,
}


def build_strategies() -> dict[str, Strategy]:
    """Fresh instances of every registered strategy, keyed by header name."""
    return {name: factory() for name, factory in STRATEGY_FACTORIES.items()}
