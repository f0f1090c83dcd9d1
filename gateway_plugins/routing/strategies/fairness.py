"""Fairness across users: ``vtc-basic``, virtual token counters, so a heavy tenant cannot starve light ones.

Each user (the ``user`` header; requests without one share the anonymous counter, so dropping the
header is no way out) has a counter of the tokens routed for it: the prompt's tokens plus the expected
output (``n`` x ``max_tokens``, else x ``expected_output_tokens``), charged when the request is routed and
halving every ``half_life_seconds``. A user is *active* while it has requests in flight (the
backlogged flows of fair queueing); the requesting user counts as active. The fair share is the
active users' mean counter:

    fair = active users' counters summed / active users

A user at or below it may use every pod (fewest requests in flight wins). A user above it is confined
to ``max(1, ceil(pods x fair / counter))`` pods, chosen by rendezvous hashing of the user over the
pod names (the same pods while the fleet is the same, which keeps its prefix cache warm), plus any
other pod whose latest record shows an empty queue (``waiting == 0``); fewest in flight among those.
So under contention the heavy user's queue builds on its own pods and everyone else finds the rest of
the fleet without a queue, while spare capacity is still used (the rule is work-conserving). A pod
whose record is unknown takes no spill-over; when no pod outside the subset has a known record the
user is held to its subset and the decision is a fallback (``FallbackScores``).

Decay costs nothing per user: counters are kept in units that double every half-life, so tokens
charged at time t are added as tokens x 2^((t - t0) / half_life), and comparisons, all between
counters at the same instant, need no conversion. Every ``_REBASE_HALF_LIVES`` the units are reset to
tokens (one pass over the users) and users with nothing in flight and under one token are forgotten.
Counters are per gateway replica: each sees its share of every user's traffic.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import ClassVar, Self

import xxhash

from gateway_plugins.config import FairnessSettings
from gateway_plugins.routing.strategies.base import FallbackScores, StrategyContext, least_load_scores
from gateway_plugins.routing.strategies.registry import strategy
from gateway_plugins.routing.types import PodState, RoutingRequest

#: Half-lives between two rebases of the counters' units (2^32: far from float overflow).
_REBASE_HALF_LIVES = 32.0


class _Tenant:
    __slots__ = ("inflight", "tokens")

    def __init__(self) -> None:
        self.tokens = 0.0  # in the current units (see the module doc)
        self.inflight = 0


@strategy("vtc-basic")
class VirtualTokenCounterStrategy:
    """Users above the fair share of tokens get a subset of the pods (and idle ones); the others, all."""

    name: ClassVar[str]
    uses_metrics: ClassVar[bool] = True

    def __init__(self, settings: FairnessSettings, clock: Callable[[], float]) -> None:
        if not settings.half_life_seconds > 0:
            raise ValueError("fairness.half_life_seconds must be positive")
        self.half_life = settings.half_life_seconds
        self.expected_output_tokens = settings.expected_output_tokens
        self.clock = clock
        self._tenants: dict[str, _Tenant] = {}
        #: Sum of the active users' counters, and how many they are; kept as requests come and go.
        self._active_tokens = 0.0
        self._active = 0
        self._epoch = 0.0  # the first charge far from it rebases (with nobody to rebase yet)
        #: Per pod, the seed its rendezvous weights are hashed with.
        self._pod_seeds: weakref.WeakKeyDictionary[PodState, int] = weakref.WeakKeyDictionary()

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        return cls(context.settings.fairness, context.clock)

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        scores = least_load_scores(pods)
        user = request.user or ""
        tenant = self._tenants.get(user)
        if tenant is None:
            return scores  # nothing served yet: at or below any fair share
        keep = self._pods_allowed(tenant, len(pods))
        if keep >= len(pods):
            return scores
        weights = self._rendezvous(user, pods)
        cutoff = sorted(weights, reverse=True)[keep - 1]
        known = False
        for i, (pod, weight) in enumerate(zip(pods, weights, strict=True)):
            if weight < cutoff:
                metrics = pod.metrics
                known = known or metrics is not None
                if metrics is None or metrics.waiting:
                    scores[i] = -math.inf
        return scores if known else FallbackScores(scores)

    def _pods_allowed(self, tenant: _Tenant, pods: int) -> int:
        """How many of ``pods`` candidates the tenant's rendezvous subset holds now."""
        active_tokens, active = self._active_tokens, self._active
        if not tenant.inflight:
            active_tokens += tenant.tokens
            active += 1
        fair = active_tokens / active
        if tenant.tokens <= fair:  # includes a user charged nothing yet: no division by zero below
            return pods
        return max(1, math.ceil(pods * fair / tenant.tokens))

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        output = request.output_tokens(self.expected_output_tokens)
        charge = (request.prompt_tokens + output) * self._units(self.clock())
        user = request.user or ""
        tenant = self._tenants.get(user)
        if tenant is None:
            tenant = self._tenants[user] = _Tenant()
        tenant.tokens += charge
        if tenant.inflight:
            self._active_tokens += charge
        else:
            self._active_tokens += tenant.tokens
            self._active += 1
        tenant.inflight += 1

    def on_finished(self, request: RoutingRequest, pod: PodState) -> None:
        tenant = self._tenants[request.user or ""]  # never forgotten while in flight
        tenant.inflight -= 1
        if not tenant.inflight:
            self._active -= 1
            self._active_tokens = self._active_tokens - tenant.tokens if self._active else 0.0

    def counter(self, user: str | None) -> float:
        """The user's decayed token count now (0 for a user never seen or forgotten)."""
        tenant = self._tenants.get(user or "")
        return tenant.tokens / self._units(self.clock()) if tenant is not None else 0.0

    def _units(self, now: float) -> float:
        """Tokens charged at ``now`` in the counters' current units; rebases them when they grow large."""
        exponent = (now - self._epoch) / self.half_life
        if exponent <= _REBASE_HALF_LIVES:
            return 2.0**exponent
        scale = 2.0**-exponent
        active_tokens = 0.0
        for user, tenant in list(self._tenants.items()):
            tenant.tokens *= scale
            if tenant.inflight:
                active_tokens += tenant.tokens
            elif tenant.tokens < 1.0:
                del self._tenants[user]
        self._active_tokens = active_tokens
        self._epoch = now
        return 1.0

    def _rendezvous(self, user: str, pods: Sequence[PodState]) -> list[int]:
        """Each pod's highest-random-weight hash for ``user``: the top k are the user's k pods."""
        key = user.encode()
        seeds = self._pod_seeds
        digest = xxhash.xxh64_intdigest
        weights = []
        for pod in pods:
            seed = seeds.get(pod)
            if seed is None:
                seed = seeds[pod] = digest(pod.name.encode())
            weights.append(digest(key, seed))
        return weights
