"""Every gateway setting, with its default, in one place (documented in docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Contract = Literal["aibrix", "epp"]


@dataclass
class DiscoverySettings:
    """Where the gateway learns which engine pods exist."""

    #: ``static``: a YAML endpoints file; ``kubernetes``: watch Pods through the API server.
    source: Literal["static", "kubernetes"] = "static"
    #: static: path of the endpoints file (``pods: [{name, address, model, labels}]``).
    endpoints_file: str | None = None
    #: static: seconds between checks of the file for changes.
    reload_seconds: float = 1.0
    #: kubernetes: namespace to watch; unset watches all namespaces.
    namespace: str | None = None
    #: kubernetes: label selector of engine pods.
    label_selector: str = "model.aibrix.ai/name"
    #: kubernetes: server-side timeout of one watch request before it is renewed.
    watch_timeout_seconds: int = 300


@dataclass
class ModelSettings:
    """Per-model overrides."""

    #: Strategy for this model when the request names none.
    routing_strategy: str | None = None


@dataclass
class GatewaySettings:
    #: Wire contract with Envoy: ``aibrix`` (target-pod header, ORIGINAL_DST cluster) or ``epp``
    #: (Gateway API Inference Extension: x-gateway-destination-endpoint header + envoy.lb metadata).
    contract: Contract = "aibrix"
    #: Address the gRPC, health and metrics servers bind to.
    listen_host: str = "0.0.0.0"
    #: ext_proc gRPC port (the Inference Extension's default).
    grpc_port: int = 9002
    #: gRPC health service port (services "", liveness, readiness, the ext_proc service).
    health_port: int = 9003
    #: HTTP port of /metrics.
    metrics_port: int = 9090
    #: Strategy when neither the request nor the model's settings name one.
    default_strategy: str = "least-request"
    #: Per-model settings, keyed by model name.
    models: dict[str, ModelSettings] = field(default_factory=dict)
    #: Largest request body routed; bigger bodies get 413.
    max_body_bytes: int = 8 * 1024 * 1024
    #: EPP contract: alternates listed after the primary endpoint, for Envoy retries.
    epp_fallbacks: int = 2
    #: Seconds to let open streams finish after SIGTERM.
    drain_seconds: float = 20.0
    #: Redis with the sidecars' pod-metrics records and other gateways' in-flight counts; unset: neither.
    redis_url: str | None = None
    #: A pod-metrics record older than this is unknown to routing (never read as saturated).
    metrics_stale_seconds: float = 2.0
    #: Seconds between reports of this gateway's in-flight counts to the other replicas.
    inflight_share_seconds: float = 0.05
    #: Log level; ``debug`` logs one line per request.
    log_level: str = "info"
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
