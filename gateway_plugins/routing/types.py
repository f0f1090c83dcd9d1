"""The plain data strategies read: one request, and the candidate pods' current state.

Both types are built by the gateway from ext_proc messages and by the fleet
simulator from its workload, so a strategy runs unchanged in both places.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.errors import bad_request


class Endpoint(StrEnum):
    """OpenAI API paths the gateway understands."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    RESPONSES = "/v1/responses"
    MODELS = "/v1/models"


#: Characters per token when a prompt's length in tokens has to be estimated from its text.
CHARS_PER_TOKEN = 4


class PromptTokenizer(Protocol):
    """A model's own tokenizer and chat template: what turns a request into the engine's token ids.

    Both raise ``ValueError`` for a prompt they cannot render (a chat template's ``raise_exception``)."""

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]: ...


class PrefixPrediction(NamedTuple):
    """What a prefix-aware strategy expects of the pod it chose: ``cached_tokens`` of the prompt that the
    engine will report cached (``usage.prompt_tokens_details.cached_tokens``), per the ``index`` it matched
    on (``exact``: the engine's KV events; ``approximate``: what this gateway sent the pod), and what the
    approximate index alone predicted (equal to ``cached_tokens`` when that is the index used)."""

    index: str
    cached_tokens: int
    approximate_tokens: int


class PromptKind(StrEnum):
    TEXT = "text"  # completions / embeddings text, one entry per prompt of a batch
    TOKENS = "tokens"  # token ids sent by the client, one list per prompt of a batch
    CHAT = "chat"  # chat messages (the Responses API's input, turned into messages)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt as the engine receives it, before tokenization.

    ``media_parts`` counts content parts that are not text (images, audio, files): they are passed
    through to the engine untouched and not counted in the prompt's tokens.
    """

    kind: PromptKind
    texts: tuple[str, ...] = ()
    token_ids: tuple[Sequence[int], ...] = ()
    messages: tuple[Mapping[str, Any], ...] = ()
    tools: Sequence[Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Mapping[str, Any] | None = None
    media_parts: int = 0

    def text(self) -> str:
        """The prompt flattened to one text, for the approximate path (no tokenizer): equal prefixes of
        conversations or prompts give equal text prefixes, which is all prefix matching needs."""
        if self.kind is PromptKind.CHAT:
            return "".join(f"{m.get('role', '')}\n{content_text(m.get('content'))}\n" for m in self.messages)
        if self.kind is PromptKind.TOKENS:
            return "\n".join(" ".join(map(str, ids)) for ids in self.token_ids)
        return "\n".join(self.texts)

    def encode(self, tokenizer: PromptTokenizer) -> list[list[int]]:
        """Each prompt of the request as token ids (one for chat), with ``tokenizer`` where needed."""
        if self.kind is PromptKind.TOKENS:
            return [list(ids) for ids in self.token_ids]
        if self.kind is PromptKind.TEXT:
            return [tokenizer.encode_text(text) for text in self.texts]
        return [
            tokenizer.encode_chat(
                self.messages,
                tools=self.tools,
                add_generation_prompt=self.add_generation_prompt,
                continue_final_message=self.continue_final_message,
                chat_template_kwargs=self.chat_template_kwargs,
            )
        ]


def content_text(content: Any) -> str:
    """A message's text: the content string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


_UNKNOWN: Any = object()


class RoutingRequest:
    """One inference request as a strategy sees it.

    The prompt is tokenized at most once, on first use, and only when a strategy asks: ``prompt_token_ids``
    and ``prompt_tokens`` are exact when the client sent token ids or the model's tokenizer is known
    (``tokenizer``, set by the router from the model's settings), and ``prompt_tokens`` is estimated from
    the text otherwise. ``max_tokens`` and ``n`` are the output budget as the client set it (None: unset).
    ``memo`` holds what strategies derive from the prompt (block hashes) so a weighted combination computes
    it once.
    """

    __slots__ = (
        "_prompt_ids",
        "_prompt_text",
        "_prompt_tokens",
        "body",
        "bound_session",
        "endpoint",
        "include_usage",
        "max_tokens",
        "memo",
        "model",
        "n",
        "predicted",
        "prompt",
        "session_id",
        "stream",
        "tokenizer",
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
        prompt: Prompt | None = None,
        prompt_text: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        n: int = 1,
        tokenizer: PromptTokenizer | None = None,
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
        self.prompt = prompt
        self._prompt_text = prompt_text
        self._prompt_ids: Sequence[int] | None = _UNKNOWN if prompt_token_ids is None else prompt_token_ids
        self._prompt_tokens: int | None = None if prompt_token_ids is None else len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.n = n
        self.tokenizer = tokenizer
        #: Set by a prefix-aware strategy for the chosen pod.
        self.predicted: PrefixPrediction | None = None
        self.memo: dict[object, Any] = {}

    @property
    def prompt_text(self) -> str:
        if self._prompt_text is None:
            self._prompt_text = self.prompt.text() if self.prompt is not None else ""
        return self._prompt_text

    @property
    def prompt_token_ids(self) -> Sequence[int] | None:
        """The (first) prompt's token ids as the engine will see them; None when they cannot be known."""
        if self._prompt_ids is _UNKNOWN:
            self._tokenize()
        return self._prompt_ids

    @property
    def exact(self) -> bool:
        """Whether lengths are exact (token ids sent, or a tokenizer known) rather than estimated."""
        return self.prompt_token_ids is not None

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the whole request (every prompt of a batch): exact when known, else estimated."""
        if self._prompt_tokens is None:
            if self.prompt_token_ids is None:
                self._prompt_tokens = -(-len(self.prompt_text) // CHARS_PER_TOKEN)
            assert self._prompt_tokens is not None
        return self._prompt_tokens

    @property
    def prompt_tokens_so_far(self) -> int:
        """``prompt_tokens`` if a strategy already needed it, else the estimate from the text: for
        bookkeeping that must not tokenize a prompt no strategy looked at."""
        if self._prompt_tokens is None:
            return -(-len(self.prompt_text) // CHARS_PER_TOKEN)
        return self._prompt_tokens

    def output_tokens(self, default: int) -> int:
        """Tokens this request may generate in all: ``n`` x ``max_tokens`` (``default`` where unset)."""
        return self.n * (self.max_tokens if self.max_tokens is not None else default)

    def tokenize(self) -> None:
        """Tokenize now (a worker thread may: nothing else touches the request meanwhile)."""
        if self._prompt_ids is _UNKNOWN:
            self._tokenize()

    def _tokenize(self) -> None:
        prompt = self.prompt
        if (
            prompt is None
            or prompt.media_parts
            or (prompt.kind is not PromptKind.TOKENS and not self.tokenizer)
        ):
            self._prompt_ids = None  # images, audio, files: the engine's tokens for them are not known here
            return
        try:
            prompts = prompt.encode(self.tokenizer)  # type: ignore[arg-type]  # only TOKENS needs none
        except ValueError as exc:
            raise bad_request(
                f"The prompt cannot be rendered with the model's chat template: {exc}",
                cause="invalid-body",
                code="invalid_value",
                param="messages" if prompt.kind is PromptKind.CHAT else None,
            ) from None
        self._prompt_ids = prompts[0] if prompts else []
        self._prompt_tokens = sum(map(len, prompts))


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
