"""Affinity strategies: keep related requests on the pod that already holds their state.

* ``session-affinity``: the turns of one conversation (``x-session-id``) go to the pod that holds its
  history, while that pod is a candidate (ready, in the subset hint) and within the load guard;
  otherwise to the least loaded pod, which the session is then bound to. A request without a session
  id gets a fresh one, bound the same way and returned to the client in ``x-session-id``. The table is
  per gateway replica; it forgets a session ``ttl_seconds`` after its last request and the least
  recently used beyond ``max_sessions``. Ids are kept as 64-bit hashes, so a client's long ids cost
  no more memory than short ones.
* ``lora-affinity``: a LoRA adapter occupies one of the engine's ``max_loras`` GPU slots while a
  batch uses it; a request for an adapter that is not resident waits for a free slot and pays the
  adapter's load time. A request for an adapter goes, in order of preference, to a pod whose running
  batch uses it (``running_adapters``); one with requests for it queued (``waiting_adapters``), or that
  this gateway sent it to since the pod's last record (so a burst follows its first request instead of
  spreading the adapter across pods between two records); one with a free adapter slot (fewer
  distinct adapters running, queued and sent since the record than ``max_loras``); any other. Within a
  tier, fewest requests in flight. A pod the load guard finds far busier than the rest ranks no better
  than a free slot: a popular adapter spreads to idle slots instead of queueing on one pod, but load
  alone never makes a request evict an adapter elsewhere. A request for the base model has no adapter
  to be near: it is routed like ``least-request``. Pods with unknown records follow the rule of ``base``.
"""

from __future__ import annotations

import secrets
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Self

import xxhash

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.config import LoadGuardSettings, SessionAffinitySettings
from gateway_plugins.routing.strategies.base import (
    MetricsStrategy,
    Stateless,
    StrategyContext,
    least_load_scores,
    overloaded,
)
from gateway_plugins.routing.strategies.registry import strategy
from gateway_plugins.routing.types import PodState, RoutingRequest


@strategy("session-affinity")
class SessionAffinityStrategy(Stateless):
    """A conversation's pod while it can take the request; least in-flight requests otherwise."""

    def __init__(
        self, settings: SessionAffinitySettings, guard: LoadGuardSettings, clock: Callable[[], float]
    ) -> None:
        self.ttl = settings.ttl_seconds
        self.max_sessions = settings.max_sessions
        self.guard = guard
        self.clock = clock
        #: Hash of the session id -> (its pod, time of its last request), least recently used first.
        self._sessions: OrderedDict[int, tuple[PodState, float]] = OrderedDict()

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        return cls(context.settings.session_affinity, context.settings.load_guard, context.clock)

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        scores = least_load_scores(pods)  # all <= 0: the bound pod's 1 beats them
        session = request.session_id
        if not session:
            return scores
        entry = self._sessions.get(self._key(request, session))
        if entry is None or entry[1] < self.clock() - self.ttl:
            return scores
        bound = entry[0]
        for i, pod in enumerate(pods):
            if pod is bound:
                # The guard never fires within min_gap of the least loaded: skip its statistics then.
                near_least = pod.load + max(scores) <= self.guard.min_gap
                if near_least or not overloaded(pods, self.guard)[i]:
                    scores[i] = 1.0
                break
        return scores

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        session = request.session_id or secrets.token_hex(16)
        request.bound_session = session
        key = self._key(request, session)
        now = self.clock()
        sessions = self._sessions
        sessions[key] = (pod, now)
        sessions.move_to_end(key)
        if len(sessions) > self.max_sessions:
            sessions.popitem(last=False)
        oldest = now - self.ttl
        while sessions and next(iter(sessions.values()))[1] < oldest:
            sessions.popitem(last=False)

    def size(self) -> int:
        """Sessions remembered (expired ones included until the next routed request sweeps them)."""
        return len(self._sessions)

    def _key(self, request: RoutingRequest, session: str) -> int:
        """The table key of ``session``; hashed once per request (score, then on_routed)."""
        key = request.memo.get(self)
        if key is None:
            key = request.memo[self] = xxhash.xxh64_intdigest(session.encode())
        return key


_RUNNING, _WAITING, _FREE_SLOT, _REST = 3, 2, 1, 0  # lora-affinity's tiers


@strategy("lora-affinity")
class LoraAffinityStrategy(MetricsStrategy):
    """Score = tier + 1 / (1 + requests in flight): tiers never overlap; fewer in flight wins within one."""

    def __init__(self, guard: LoadGuardSettings) -> None:
        self.guard = guard
        #: Per pod: the record it had when this gateway last sent it an adapter request, and the adapters
        #: sent since that record (a newer record replaces both).
        self._sent: weakref.WeakKeyDictionary[PodState, tuple[PodMetrics | None, set[str]]] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        return cls(context.settings.load_guard)

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        adapter = request.model
        if adapter == pods[0].model:
            return least_load_scores(pods)
        hot = overloaded(pods, self.guard)
        scores: list[float | None] = []
        for pod, guarded in zip(pods, hot, strict=True):
            metrics = pod.metrics
            if metrics is None:
                scores.append(None)
                continue
            tier = self.tier(adapter, pod, metrics)
            if guarded:  # as good as a free slot: spread to idle slots, never evict an adapter elsewhere
                tier = min(tier, _FREE_SLOT)
            scores.append(tier + 1.0 / (1 + pod.load))
        return self.with_unknown(scores, pods)

    def tier(self, adapter: str, pod: PodState, metrics: PodMetrics) -> int:
        running, waiting = metrics.running_adapters, metrics.waiting_adapters
        if adapter in running:
            return _RUNNING
        entry = self._sent.get(pod)
        sent = entry[1] if entry is not None and entry[0] is metrics else ()
        if adapter in waiting or adapter in sent:
            return _WAITING
        used = len(running)
        for name in waiting:
            used += name not in running
        for name in sent:
            used += name not in running and name not in waiting
        return _FREE_SLOT if used < metrics.max_loras else _REST

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        if request.model == pod.model:
            return
        entry = self._sent.get(pod)
        if entry is None or entry[0] is not pod.metrics:
            entry = self._sent[pod] = (pod.metrics, set())
        entry[1].add(request.model)
