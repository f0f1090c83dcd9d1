"""Weighted combinations: ``prefix-cache:3,least-kv-cache:2,least-request`` (AIBrix syntax).

Each part's scores are min-max normalised to [0, 1] over the candidates (1 for
every pod when they are all equal; 0 for a pod a part ruled out with -inf),
multiplied by the part's integer weight (default 1; weight 0 drops the part)
and summed; the highest total wins. A part that fell back (``FallbackScores``)
is counted as that part's fallback, whatever the combination decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

from gateway_plugins.routing.strategies.base import FallbackScores, Strategy
from gateway_plugins.routing.types import PodState, RoutingRequest


class WeightedStrategy:
    uses_metrics: ClassVar[bool] = False  # per instance below: whether any part reads metrics

    def __init__(self, name: str, parts: Sequence[tuple[Strategy, int]]) -> None:
        self.name = name  # type: ignore[misc]
        self.parts = tuple(parts)
        self.uses_metrics = any(part.uses_metrics for part, _ in self.parts)  # type: ignore[misc]

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        totals = [0.0] * len(pods)
        fell_back: tuple[str, ...] = ()
        for part, weight in self.parts:
            scores = part.score(request, pods)
            if isinstance(scores, FallbackScores):
                fell_back += scores.strategies or (part.name,)
            finite = [s for s in scores if math.isfinite(s)]
            low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
            span = high - low
            for i, s in enumerate(scores):
                if math.isfinite(s):
                    totals[i] += weight * ((s - low) / span if span > 0 else 1.0)
        if not fell_back:
            return totals
        scores = FallbackScores(totals)
        scores.strategies = fell_back
        return scores

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        for part, _ in self.parts:
            part.on_routed(request, pod)

    def on_finished(self, request: RoutingRequest, pod: PodState) -> None:
        for part, _ in self.parts:
            part.on_finished(request, pod)


def parse_weighted(spec: str, strategies: Mapping[str, Strategy]) -> WeightedStrategy:
    """``name[:weight],...`` over the given single strategies; ``ValueError`` says what is wrong."""
    parts: list[tuple[Strategy, int]] = []
    seen: set[str] = set()
    for item in spec.split(","):
        name, _, weight_text = item.strip().partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"empty strategy name in '{spec}'")
        if name in seen:
            raise ValueError(f"'{name}' appears twice in '{spec}'")
        seen.add(name)
        strategy = strategies.get(name)
        if strategy is None or isinstance(strategy, WeightedStrategy):
            raise ValueError(f"unknown strategy '{name}' in '{spec}'")
        try:
            weight = int(weight_text) if weight_text.strip() else 1
        except ValueError:
            raise ValueError(f"weight of '{name}' must be a whole number, not '{weight_text}'") from None
        if weight < 0:
            raise ValueError(f"weight of '{name}' must not be negative")
        if weight:
            parts.append((strategy, weight))
    if not parts:
        raise ValueError(f"'{spec}' gives every strategy weight 0")
    return WeightedStrategy(canonical_name(parts), parts)


def canonical_name(parts: Sequence[tuple[Strategy, int]]) -> str:
    """``name:weight,...``: the name of a combination of ``parts`` (a preset has its own as well)."""
    return ",".join(f"{part.name}:{weight}" for part, weight in parts)
