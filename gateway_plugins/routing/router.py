"""The router: which strategy, which candidates, which pod; owns the in-flight counts."""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import (
    FallbackScores,
    Strategy,
    WeightedStrategy,
    canonical_name,
    parse_weighted,
)
from gateway_plugins.routing.types import PodState, PromptTokenizer, RoutingRequest

log = logging.getLogger(__name__)

#: Distinct weighted combinations parsed from headers that are kept (each keeps its parts' state shared).
_MAX_COMBINATIONS = 256


@dataclass(slots=True)
class Decision:
    """A committed routing choice; ``Router.release`` must be called exactly once."""

    pod: PodState
    fallbacks: list[PodState]
    strategy: str
    request: RoutingRequest
    strategy_object: Strategy
    #: ``strategy`` as a metric label (``Router.label``): bounded, whatever the client sent.
    label: str


class Router:
    """Picks a pod for each request with the strategy that applies to it.

    Precedence: the request's ``routing-strategy`` header > the model's profile from its pods'
    ``model.aibrix.ai/config`` annotation (the ``config-profile`` header picks one) > the model's
    setting in the gateway config > the gateway's default. Any of them may name a single strategy,
    a preset, or a weighted combination.

    The router counts what its committed decisions were made on (strategies only score): the decisions
    a strategy's fallback rule made, and those made while a candidate's metrics were unknown.
    ``rng`` breaks ties between equal scores (default: a new, unseeded one; the simulator seeds it).
    ``tokenizers`` holds each base model's own tokenizer: a request is tokenized with that of the model
    its candidates serve (an adapter's requests with their base model's), when a strategy asks.
    """

    def __init__(
        self,
        registry: PodRegistry,
        strategies: Mapping[str, Strategy],
        *,
        default_strategy: str,
        model_strategies: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        tokenizers: Mapping[str, PromptTokenizer] | None = None,
    ) -> None:
        self.registry = registry
        self.tokenizers = dict(tokenizers or {})
        self.strategies = dict(strategies)
        self.rng = rng or random.Random()
        self._combinations: dict[str, Strategy] = {}
        #: A combination a client writes the way a preset is defined is that preset.
        self._presets = {
            canonical_name(s.parts): s for s in self.strategies.values() if isinstance(s, WeightedStrategy)
        }
        try:
            self.default_strategy = self.lookup(default_strategy)
            self.model_strategies = {m: self.lookup(s) for m, s in (model_strategies or {}).items()}
        except ValueError as exc:
            raise ValueError(f"routing strategy in configuration: {exc}") from None
        #: Strategy names that may label metrics: the registered ones and those the configuration names.
        #: A combination made up by a client is labelled ``combination``, so no header creates a series.
        self._labels = frozenset(
            [*self.strategies, self.default_strategy.name, *(s.name for s in self.model_strategies.values())]
        )
        #: Decisions by a metric-reading strategy while some candidate's metrics were unknown.
        self.decisions_with_unknown_metrics = 0
        #: Decisions each strategy's explicit fallback rule made, by strategy label (an alias counts for
        #: its strategy; a combination's part for the part): every strategy's count starts at 0.
        self.fallback_decisions = dict.fromkeys((s.name for s in self.strategies.values()), 0)
        #: Decisions of prefix-aware strategies by the index the chosen pod was matched on: ``exact`` (the
        #: engine's own KV events) or ``approximate`` (what this gateway sent it).
        self.prefix_decisions = {"exact": 0, "approximate": 0}

    def lookup(self, name: str) -> Strategy:
        """A strategy, preset or weighted combination by name; ``ValueError`` if there is none."""
        name = name.strip()
        strategy = self.strategies.get(name) or self._combinations.get(name)
        if strategy is not None:
            return strategy
        if "," not in name and ":" not in name:
            raise ValueError(f"unknown strategy '{name}'; known: {', '.join(sorted(self.strategies))}")
        strategy = parse_weighted(name, self.strategies)
        strategy = self._presets.get(strategy.name, strategy)
        if len(self._combinations) >= _MAX_COMBINATIONS:
            self._combinations.pop(next(iter(self._combinations)))
        self._combinations[name] = strategy
        return strategy

    def label(self, name: str) -> str:
        """``name`` as a metric label: itself when registered or configured, else ``combination``."""
        return name if name in self._labels else "combination"

    def strategy(self, name: str) -> Strategy:
        """The strategy a ``routing-strategy`` header names; 400 if there is none."""
        try:
            return self.lookup(name)
        except ValueError as exc:
            raise GatewayError(
                400,
                f"Invalid routing strategy '{name}': {exc}.",
                cause="invalid-routing-strategy",
                code="invalid_routing_strategy",
            ) from None

    def strategy_for(self, model: str, profile: str | None = None, base: str | None = None) -> Strategy:
        """The strategy for a request that names none: model profile > model setting > default.

        A LoRA adapter without settings of its own takes its base model's.
        """
        for name in (model, base) if base and base != model else (model,):
            named = self.registry.profile_strategy(name, profile)
            if named is not None:
                try:
                    return self.lookup(named)
                except ValueError as exc:
                    log.warning(
                        "model %s: ignoring the routing strategy of its config profile: %s", name, exc
                    )
            strategy = self.model_strategies.get(name)
            if strategy is not None:
                return strategy
        return self.default_strategy

    def candidates(self, model: str, subset: Collection[str] | None = None) -> list[PodState]:
        """The ready pods ``model`` may go to (within the EPP subset hint); 404 or 503 when there are none."""
        pods = self.registry.ready_pods(model)
        if not pods:
            if not self.registry.knows_model(model):
                raise GatewayError(
                    404,
                    f"The model `{model}` does not exist.",
                    cause="model-not-found",
                    code="model_not_found",
                    param="model",
                )
            raise GatewayError(
                503,
                f"No ready pod serves the model `{model}`; retry later.",
                cause="no-model-backends",
                code="no_ready_pods",
            )
        if subset is not None:
            pods = [pod for pod in pods if pod.address in subset]
            if not pods:
                raise GatewayError(
                    503,
                    f"None of the endpoints in the subset hint serves the model `{model}`.",
                    cause="no-model-backends",
                    code="no_ready_pods",
                )
        return pods

    def attach_tokenizer(self, request: RoutingRequest, subset: Collection[str] | None = None) -> bool:
        """Give ``request`` the tokenizer of the base model its candidates serve; whether there is one.
        404/503 (``GatewayError``) when no pod serves the model."""
        if request.tokenizer is None:
            request.tokenizer = self.tokenizers.get(self.candidates(request.model, subset)[0].model)
        return request.tokenizer is not None

    def route(
        self,
        request: RoutingRequest,
        strategy: Strategy | None = None,
        *,
        subset: Collection[str] | None = None,
        fallbacks: int = 0,
        profile: str | None = None,
    ) -> Decision:
        """Pick a pod (and up to ``fallbacks`` alternates) and count the request in flight."""
        pods = self.candidates(request.model, subset)
        if request.tokenizer is None:
            request.tokenizer = self.tokenizers.get(pods[0].model)
        if strategy is None:
            strategy = self.strategy_for(request.model, profile, pods[0].model)
        scores = strategy.score(request, pods)
        order = rank(scores, self.rng, 1 + fallbacks)
        chosen = pods[order[0]]
        # What metric strategies read of the load routed since a record is a length: exact where it can be,
        # while a strategy that reads no metrics does not make this request pay a tokenization for it.
        tokens = request.prompt_tokens if strategy.uses_metrics else request.prompt_tokens_so_far
        strategy.on_routed(request, chosen)
        # Nothing below can fail: only a request that is routed counts, in flight (``release`` undoes it)
        # and in the decision counters.
        chosen.inflight += 1
        chosen.routed_since_record += 1
        chosen.tokens_since_record += tokens
        if request.predicted is not None:
            self.prefix_decisions[request.predicted.index] += 1
        if strategy.uses_metrics and any(pod.metrics is None for pod in pods):
            self.decisions_with_unknown_metrics += 1
        if isinstance(scores, FallbackScores):
            for name in scores.strategies or (strategy.name,):
                label = self.label(name)
                self.fallback_decisions[label] = self.fallback_decisions.get(label, 0) + 1
        return Decision(
            chosen, [pods[i] for i in order[1:]], strategy.name, request, strategy, self.label(strategy.name)
        )

    @staticmethod
    def release(decision: Decision) -> None:
        decision.pod.inflight -= 1
        decision.strategy_object.on_finished(decision.request, decision.pod)
