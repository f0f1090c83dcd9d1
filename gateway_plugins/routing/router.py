"""The router: which strategy, which candidates, which pod; owns the in-flight counts."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import Strategy
from gateway_plugins.routing.types import PodState, RoutingRequest


@dataclass(slots=True)
class Decision:
    """A committed routing choice; ``Router.release`` must be called exactly once."""

    pod: PodState
    fallbacks: list[PodState]
    strategy: str


class Router:
    """Strategy precedence: request header > the model's default > the server default."""

    def __init__(
        self,
        registry: PodRegistry,
        strategies: Mapping[str, Strategy],
        *,
        default_strategy: str,
        model_strategies: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry
        self.strategies = dict(strategies)
        for name in (default_strategy, *(model_strategies or {}).values()):
            if name not in self.strategies:
                raise ValueError(f"unknown routing strategy {name!r} in configuration")
        self.default_strategy = self.strategies[default_strategy]
        self.model_strategies = {m: self.strategies[s] for m, s in (model_strategies or {}).items()}
        #: Decisions by a metric-reading strategy while some candidate's metrics were unknown.
        self.decisions_with_unknown_metrics = 0

    def strategy(self, name: str) -> Strategy:
        """The strategy a ``routing-strategy`` header names; 400 if there is none."""
        strategy = self.strategies.get(name.strip())
        if strategy is None:
            raise GatewayError(
                400,
                f"Unknown routing strategy '{name}'. Known strategies: {', '.join(sorted(self.strategies))}.",
                cause="invalid-routing-strategy",
                code="invalid_routing_strategy",
            )
        return strategy

    def route(
        self,
        request: RoutingRequest,
        strategy: Strategy | None = None,
        *,
        subset: Collection[str] | None = None,
        fallbacks: int = 0,
    ) -> Decision:
        """Pick a pod (and up to ``fallbacks`` alternates) and count the request in flight."""
        pods = self.registry.ready_pods(request.model)
        if not pods:
            if not self.registry.knows_model(request.model):
                raise GatewayError(
                    404,
                    f"The model `{request.model}` does not exist.",
                    cause="model-not-found",
                    code="model_not_found",
                    param="model",
                )
            raise GatewayError(
                503,
                f"No ready pod serves the model `{request.model}`; retry later.",
                cause="no-model-backends",
                code="no_ready_pods",
            )
        if subset is not None:
            pods = [pod for pod in pods if pod.address in subset]
            if not pods:
                raise GatewayError(
                    503,
                    f"None of the endpoints in the subset hint serves the model `{request.model}`.",
                    cause="no-model-backends",
                    code="no_ready_pods",
                )
        if strategy is None:
            strategy = self.model_strategies.get(request.model, self.default_strategy)
        if strategy.uses_metrics and any(pod.metrics is None for pod in pods):
            self.decisions_with_unknown_metrics += 1
        order = rank(strategy.score(request, pods), 1 + fallbacks)
        chosen = pods[order[0]]
        chosen.inflight += 1
        strategy.on_routed(request, chosen)
        return Decision(chosen, [pods[i] for i in order[1:]], strategy.name)

    @staticmethod
    def release(decision: Decision) -> None:
        decision.pod.inflight -= 1
