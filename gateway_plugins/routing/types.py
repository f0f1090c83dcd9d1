"""The plain data strategies read: one request, and the candidate pods' current state.

Both types are built by the gateway from ext_proc messages and by the fleet
simulator from its workload, so a strategy runs unchanged in both places.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from brickyard_core.podmetrics import PodMetrics


class Endpoint(StrEnum):
    """OpenAI API paths the gateway understands."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MODELS = "/v1/models"


#: Characters per token when a prompt's length in tokens has to be estimated from its text.
CHARS_PER_TOKEN = 4


class RoutingRequest:
    """One inference request as a strategy sees it.

    ``prompt_text`` (the text prefix-aware strategies hash) is computed on first
    use, so strategies that never look at it cost nothing. ``prompt_token_ids``
    is known when the client sent token ids, a local tokenizer is configured, or
    the simulator built the request; ``memo`` holds what strategies derive from
    the prompt (block hashes) so a weighted combination computes it once.
    """

    __slots__ = (
        "_prompt",
        "_prompt_source",
        "_prompt_tokens",
        "body",
        "bound_session",
        "endpoint",
        "include_usage",
        "max_tokens",
        "memo",
        "model",
        "prompt_token_ids",
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
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.endpoint = endpoint
        self.stream = stream
        self.include_usage = include_usage
        self.user = user
        self.session_id = session_id
        #: The session a session-keeping strategy bound this request to (the client's, or one it made up):
        #: returned to the client in ``x-session-id``. None when the deciding strategy keeps no sessions.
        self.bound_session: str | None = None
        self.body = body or {}
        self._prompt = prompt_text
        self._prompt_source = prompt_source
        self.prompt_token_ids = prompt_token_ids
        self.max_tokens = max_tokens
        self._prompt_tokens: int | None = None
        self.memo: dict[object, Any] = {}

    @property
    def prompt_text(self) -> str:
        if self._prompt is None:
            self._prompt = self._prompt_source(self) if self._prompt_source is not None else ""
        return self._prompt

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens: exact when the ids are known, else estimated from the text."""
        if self._prompt_tokens is None:
            ids = self.prompt_token_ids
            self._prompt_tokens = (
                len(ids) if ids is not None else -(-len(self.prompt_text) // CHARS_PER_TOKEN)
            )
        return self._prompt_tokens


@dataclass(slots=True, eq=False, weakref_slot=True)
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
    #: Requests (and their prompt tokens) this gateway routed to the pod since ``metrics`` was applied: the
    #: part of the pod's load its record cannot show yet, so metric strategies do not herd between records.
    routed_since_record: int = 0
    tokens_since_record: int = 0

    @property
    def load(self) -> int:
        """Requests in flight to the pod from every gateway replica: always fresh, never unknown."""
        return self.inflight + self.remote_inflight

    def apply_metrics(self, metrics: PodMetrics | None) -> None:
        """A new record (or ``None``: unknown); what was routed since the last one is now in it."""
        self.metrics = metrics
        self.routed_since_record = self.tokens_since_record = 0
