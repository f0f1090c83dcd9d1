"""``gpu-type``: heterogeneous fleets, each request on the cheapest GPU type whose profile meets the SLOs.

For each GPU type ``t`` with a profile (``GpuTypeSettings.profiles``)::

    ttft_t = prompt_tokens / prefill_tokens_per_second_t
    tpot_t = seconds_per_output_token_t
    t meets the request  <=>  ttft_t <= ttft_slo_seconds  and  tpot_t <= tpot_slo_seconds

The request's preference order of types is: the meeting types by cost (cheapest first), then the other
profiled types fastest first (highest prefill speed), then pods of unknown type. It goes to the least-loaded
pod that is not saturated in the first type of that order that has one: a pod is saturated when its
in-flight count (``PodState.load``) reaches its type's ``max_inflight``, or when its record shows more than
``max_waiting`` requests queued in the engine.

A pod's type is its record's ``gpu_type``, else its label ``GpuTypeSettings.label``. A pod with neither,
or of a type without a profile, is of *unknown type*: neither its speed nor its cost is known, so it is the
last resort, and only its queue can mark it saturated. When every candidate is saturated (the fleet is
over capacity), the pod with the lowest in-flight count relative to its type's ``max_inflight`` wins,
unknown types last; that decision, and any where no candidate has a profiled type (plain least-request
among pods without a queue), is a fallback (``FallbackScores``).

``ttft_t`` grows with the prompt, so type ``t`` meets the TTFT objective for prompts up to
``ttft_slo_seconds x prefill_tokens_per_second_t`` tokens. Those limits cut prompt lengths into buckets
over which the order of types does not change: each bucket's order is computed once, at construction,
and a request costs one bisection plus one pass over the candidates.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Self

from gateway_plugins.config import GpuProfile, GpuTypeSettings
from gateway_plugins.routing.strategies.base import FallbackScores, Stateless, StrategyContext
from gateway_plugins.routing.strategies.registry import strategy
from gateway_plugins.routing.types import PodState, RoutingRequest

log = logging.getLogger(__name__)


def ttft_limit(profile: GpuProfile, settings: GpuTypeSettings) -> float:
    """The longest prompt a pod of this profile prefills within the TTFT objective, tokens."""
    return settings.ttft_slo_seconds * profile.prefill_tokens_per_second


def meets(profile: GpuProfile, prompt_tokens: float, settings: GpuTypeSettings) -> bool:
    """Whether a pod of this profile serves a prompt of this length within both objectives."""
    return (
        prompt_tokens <= ttft_limit(profile, settings)
        and profile.seconds_per_output_token <= settings.tpot_slo_seconds
    )


def preference(settings: GpuTypeSettings, prompt_tokens: float) -> list[str]:
    """The profiled types in the order a request of ``prompt_tokens`` tries them (see the module doc)."""
    profiles = settings.profiles
    meeting = sorted(
        (t for t, p in profiles.items() if meets(p, prompt_tokens, settings)),
        key=lambda t: (profiles[t].cost, -profiles[t].prefill_tokens_per_second, t),
    )
    others = sorted(
        profiles.keys() - set(meeting),
        key=lambda t: (-profiles[t].prefill_tokens_per_second, profiles[t].seconds_per_output_token, t),
    )
    return meeting + others


@strategy("gpu-type")
class GpuTypeStrategy(Stateless):
    """The cheapest GPU type that meets the request's SLOs and has a pod with room; spill-over beyond."""

    uses_metrics: ClassVar[bool] = True

    def __init__(self, settings: GpuTypeSettings) -> None:
        self.settings = settings
        profiles = settings.profiles
        for gpu, profile in profiles.items():
            if profile.prefill_tokens_per_second <= 0 or profile.max_inflight <= 0:
                raise ValueError(f"gpu-type profile {gpu!r}: prefill speed and max_inflight must be positive")
        #: Longest prompt each type serving within the TPOT objective prefills within the TTFT objective;
        #: bucket i holds the prompts longer than limit i-1 and not longer than limit i.
        self._limits = sorted(
            {
                ttft_limit(p, settings)
                for p in profiles.values()
                if p.seconds_per_output_token <= settings.tpot_slo_seconds
            }
        )
        #: Per bucket: type -> position in its preference order (the same for every prompt in the bucket).
        self._positions: list[Mapping[str, int]] = [
            {gpu: i for i, gpu in enumerate(preference(settings, limit))}
            for limit in (*self._limits, math.inf)
        ]
        self._capacity = {gpu: p.max_inflight for gpu, p in profiles.items()}
        self._unknown = len(profiles)  # the position of pods of unknown type
        self._warned: set[str] = set()

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        return cls(context.settings.gpu_type)

    def bucket(self, prompt_tokens: int) -> int:
        """The prompt-length bucket a request falls in; its order of types is ``preference`` at its limit."""
        return bisect.bisect_left(self._limits, prompt_tokens)

    def gpu_type(self, pod: PodState) -> str:
        """The pod's type: from its record, else its label; empty when neither says."""
        metrics = pod.metrics
        if metrics is not None and metrics.gpu_type:
            return metrics.gpu_type
        return pod.labels.get(self.settings.label, "")

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        positions = self._positions[self.bucket(request.prompt_tokens)]
        unknown, capacity, max_waiting = self._unknown, self._capacity, self.settings.max_waiting
        tiers = unknown + 1
        # Per pod: its type's position, plus ``tiers`` when saturated, so free pods of any type come first.
        ranks: list[int] = []
        loads: list[int] = []
        known = free = False
        for pod in pods:
            gpu = self.gpu_type(pod)
            position = positions.get(gpu, unknown)
            load = pod.load
            metrics = pod.metrics
            saturated = metrics is not None and metrics.waiting > max_waiting
            if position == unknown:
                self._warn(gpu)
            else:
                known = True
                saturated = saturated or load >= capacity[gpu]
            free = free or not saturated
            ranks.append(position + tiers if saturated else position)
            loads.append(load)
        if not free:
            return self._overloaded(pods)
        span = max(loads) + 1
        scores = [-float(rank * span + load) for rank, load in zip(ranks, loads, strict=True)]
        return scores if known else FallbackScores(scores)

    def _overloaded(self, pods: Sequence[PodState]) -> FallbackScores:
        """Every candidate saturated: least in-flight relative to the type's capacity; unknown types last."""
        capacity = self._capacity
        relative = [pod.load / size if (size := capacity.get(self.gpu_type(pod))) else None for pod in pods]
        worst = max((r for r in relative if r is not None), default=0.0)
        return FallbackScores(
            -r if r is not None else -(worst + 1 + pod.load) for r, pod in zip(relative, pods, strict=True)
        )

    def _warn(self, gpu: str) -> None:
        if gpu not in self._warned:
            self._warned.add(gpu)
            if gpu:
                log.warning("gpu-type: no profile for GPU type %r; its pods are served last", gpu)
            else:
                log.warning(
                    "gpu-type: pods without a GPU type (no gpu_type in their record, no %r label) are served "
                    "last",
                    self.settings.label,
                )
