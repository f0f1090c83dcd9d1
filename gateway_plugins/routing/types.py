"""The plain data strategies read: one request, and the candidate pods' current state.

Both types are built by the gateway from ext_proc messages and by the fleet
simulator from its workload, so a strategy runs unchanged in both places.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from brickyard.podmetrics import PodMetrics


class Endpoint(StrEnum):
    """OpenAI API paths the gateway understands."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MODELS = "/v1/models"


class RoutingRequest:
    """One inference request as a strategy sees it.

    ``prompt_text`` (the text prefix-aware strategies hash) is computed on first
    use, so strategies that never look at it cost nothing.
    """

    __slots__ = (
        "_prompt",
        "_prompt_source",
        "body",
        "endpoint",
        "include_usage",
        "model",
        "session_id",
        "stream",
        "user",
    )

    def __init__(
        self,
        model: str,
        *,
        endpoint: Endpoint = Endpoint.CHAT,
        stream: bool = False,
        include_usage: bool = False,
        user: str | None = None,
        session_id: str | None = None,
        body: Mapping[str, Any] | None = None,
        prompt_text: str | None = None,
        prompt_source: Callable[[RoutingRequest], str] | None = None,
    ) -> None:
        self.model = model
        self.endpoint = endpoint
        self.stream = stream
        self.include_usage = include_usage
        self.user = user
        self.session_id = session_id
        self.body = body or {}
        self._prompt = prompt_text
        self._prompt_source = prompt_source

    @property
    def prompt_text(self) -> str:
        if self._prompt is None:
            self._prompt = self._prompt_source(self) if self._prompt_source is not None else ""
        return self._prompt


@dataclass(slots=True, eq=False)
class PodState:
    """One routable engine pod: identity from discovery, live counters from the gateway, metrics.

    ``inflight`` counts requests this gateway has sent to the pod that have not
    finished yet; the router increments it at the moment of selection.
    """

    name: str
    address: str  # "ip:port", what Envoy connects to
    model: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    inflight: int = 0
    #: In flight to this pod from the other gateway replicas, as they last reported.
    remote_inflight: int = 0
    #: The latest pod-metrics record (sidecar in production, engine model in the simulator); None = unknown.
    metrics: PodMetrics | None = None
    #: Encoded ext_proc replies that only depend on this pod, keyed by the encoder.
    encoded: dict[Any, bytes] = field(default_factory=dict, repr=False)
