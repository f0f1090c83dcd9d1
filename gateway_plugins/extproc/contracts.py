"""The two ways of telling Envoy where a request goes: two encoders over one decision.

* AIBrix: request header ``target-pod: ip:port``, read by an ORIGINAL_DST cluster.
* Inference Extension (EPP): ``x-gateway-destination-endpoint: ip:port[,fallback...]``
  as a request header and, identically, in dynamic metadata ``envoy.lb``.

Both also publish the decision as dynamic metadata namespace ``brickyard``
(pod, pod_ip, strategy, and session_id when the strategy bound the request to a
session) so Envoy can copy it into response headers without a response-headers
round trip to the processor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from gateway_plugins.routing.router import Decision

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


class Contract(Protocol):
    name: ClassVar[str]

    def destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, Any]]:
        """Request headers to set and dynamic metadata to emit for ``decision``."""
        ...


def decision_metadata(decision: Decision) -> dict[str, Any]:
    pod = decision.pod
    fields = {"pod": pod.name, "pod_ip": pod.address, "strategy": decision.strategy}
    session = decision.request.bound_session
    if session is not None:
        fields["session_id"] = session
    return {DECISION_NAMESPACE: fields}


class AIBrixContract:
    name: ClassVar[str] = "aibrix"

    def destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, Any]]:
        return {"target-pod": decision.pod.address}, decision_metadata(decision)


class EppContract:
    name: ClassVar[str] = "epp"

    def destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, Any]]:
        endpoints = ",".join(pod.address for pod in (decision.pod, *decision.fallbacks))
        metadata = decision_metadata(decision)
        metadata["envoy.lb"] = {DESTINATION_ENDPOINT: endpoints}
        return {DESTINATION_ENDPOINT: endpoints}, metadata


CONTRACTS: Mapping[str, Contract] = {c.name: c for c in (AIBrixContract(), EppContract())}


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
