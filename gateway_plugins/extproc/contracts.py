"""The two ways of telling Envoy where a request goes, and the replies that carry the decision.

* AIBrix: request header ``target-pod: ip:port``, read by an ORIGINAL_DST cluster.
* Inference Extension (EPP): ``x-gateway-destination-endpoint: ip:port[,fallback...]``
  as a request header and, identically, in dynamic metadata ``envoy.lb``.

Both also publish the decision as dynamic metadata namespace ``brickyard``
(pod, pod_ip, strategy, and session_id when the strategy bound the request to a
session) so Envoy can copy it into response headers without a response-headers
round trip to the processor.

A contract turns a ``Decision`` into the serialized ext_proc replies that carry
it. Most decisions of one strategy on one pod encode to the same bytes, so a
contract keeps them per pod, for as long as the pod exists.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

from gateway_plugins.extproc import messages
from gateway_plugins.extproc.messages import HeaderChanges
from gateway_plugins.routing.router import Decision
from gateway_plugins.routing.types import PodState

DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
DECISION_NAMESPACE = "brickyard"
#: Headers a client must never choose, and EPP control headers consumed here;
#: removed from every request before it reaches an engine.
STRIPPED_REQUEST_HEADERS = frozenset(
    {
        "target-pod",
        DESTINATION_ENDPOINT,
        f"{DESTINATION_ENDPOINT}-subset",
        f"{DESTINATION_ENDPOINT}-served",
        "x-gateway-inference-fairness-id",
        "x-gateway-inference-objective",
        "x-gateway-model-name-rewrite",
    }
)


#: Response headers of a prefix-aware decision (``PrefixPrediction``): the index the chosen pod was matched
#: on, the prompt tokens the engine is expected to report cached, and the approximate index's guess.
PREFIX_INDEX_HEADER = "x-brickyard-prefix-index"
PREDICTED_CACHED_HEADER = "x-brickyard-predicted-cached-tokens"
APPROXIMATE_CACHED_HEADER = "x-brickyard-approximate-cached-tokens"


def decision_metadata(decision: Decision) -> dict[str, Any]:
    pod = decision.pod
    fields = {"pod": pod.name, "pod_ip": pod.address, "strategy": decision.strategy}
    session = decision.request.bound_session
    if session is not None:
        fields["session_id"] = session
    return {DECISION_NAMESPACE: fields}


class Contract:
    """Encodes decisions for Envoy; a subclass says where the destination goes (``destination``)."""

    name: ClassVar[str]

    def __init__(self) -> None:
        #: BUFFERED body replies per pod and strategy; a pod's entries go with the pod.
        self._replies: weakref.WeakKeyDictionary[PodState, dict[str, bytes]] = weakref.WeakKeyDictionary()

    def destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, Any]]:
        """Request headers to set and dynamic metadata to emit for ``decision``."""
        raise NotImplementedError

    def body_reply(self, decision: Decision, body: bytes | None = None) -> bytes:
        """BUFFERED mode: the destination rides on the reply to the body, which ``body`` replaces if given.

        Cached per (pod, strategy) unless it carries something of this request's own: fallbacks, a session
        id, a rewritten body, or a strategy combination the client made up (those would grow the cache
        without bound).
        """
        if body is not None:
            headers, metadata = self.destination(decision)
            headers["content-length"] = str(len(body))  # Envoy keeps the header; it must match the body
            return messages.reply("request_body", messages.header_mutation(headers), metadata, body=body)
        if (
            decision.fallbacks
            or decision.request.bound_session is not None
            or decision.label != decision.strategy
        ):
            return self._body_reply(decision)
        cached = self._replies.get(decision.pod)
        if cached is None:
            cached = self._replies[decision.pod] = {}
        reply = cached.get(decision.strategy)
        if reply is None:
            reply = cached[decision.strategy] = self._body_reply(decision)
        return reply

    def _body_reply(self, decision: Decision) -> bytes:
        headers, metadata = self.destination(decision)
        return messages.reply("request_body", messages.header_mutation(headers), metadata)

    def headers_reply(self, decision: Decision, changes: HeaderChanges) -> bytes:
        """FULL_DUPLEX_STREAMED mode: the destination rides on the (deferred) request-headers reply."""
        headers, metadata = self.destination(decision)
        add, remove = changes
        return messages.reply(
            "request_headers", messages.header_mutation({**headers, **add}, remove), metadata
        )


class AIBrixContract(Contract):
    name: ClassVar[str] = "aibrix"

    def destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, Any]]:
        return {"target-pod": decision.pod.address}, decision_metadata(decision)


class EppContract(Contract):
    name: ClassVar[str] = "epp"

    def destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, Any]]:
        endpoints = ",".join(pod.address for pod in (decision.pod, *decision.fallbacks))
        metadata = decision_metadata(decision)
        metadata["envoy.lb"] = {DESTINATION_ENDPOINT: endpoints}
        return {DESTINATION_ENDPOINT: endpoints}, metadata


CONTRACTS: Mapping[str, type[Contract]] = {c.name: c for c in (AIBrixContract, EppContract)}


def response_headers_reply(decision: Decision | None, request_id: str, extra: dict[str, str]) -> bytes:
    """Tell the client which pod served it (when Envoy sends the response headers): the AIBrix response
    headers, whatever the contract, plus ``extra`` (the tenant's rate-limit headers). A prefix-aware
    decision adds the index it matched on and the prompt tokens it expects the engine to report cached
    (``usage.prompt_tokens_details.cached_tokens``), so a client can check one against the other."""
    headers = {**extra, "request-id": request_id}
    if decision is not None:
        request = decision.request
        headers["target-pod"] = decision.pod.name
        headers["target-pod-ip"] = decision.pod.address
        headers["routing-strategy"] = decision.strategy
        if request.bound_session is not None:
            headers["x-session-id"] = request.bound_session
        predicted = request.predicted
        if predicted is not None:
            headers[PREFIX_INDEX_HEADER] = predicted.index
            headers[PREDICTED_CACHED_HEADER] = str(predicted.cached_tokens)
            headers[APPROXIMATE_CACHED_HEADER] = str(predicted.approximate_tokens)
    return messages.reply("response_headers", messages.header_mutation(headers))


def subset_hint(filter_metadata: Mapping[str, Any]) -> frozenset[str] | None:
    """Endpoints the proxy allows (EPP subset hint), or None when it sent no hint.

    Proxies send a list of ``ip:port`` or one comma-separated string.
    """
    namespace = filter_metadata.get(SUBSET_NAMESPACE)
    if namespace is None or SUBSET_KEY not in namespace:
        return None
    value = namespace[SUBSET_KEY]
    items = value.split(",") if isinstance(value, str) else list(value)
    return frozenset(item.strip() for item in items if isinstance(item, str) and item.strip())
