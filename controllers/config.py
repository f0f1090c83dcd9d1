"""Every controller setting, with its default, in one place (documented in docs/controllers.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from brickyard_core import defaults

ControllerName = Literal["model-adapter", "pod-autoscaler", "model-routes"]


@dataclass
class ModelAdapterSettings:
    """``ModelAdapter``: LoRA placement through the pods' runtime sidecars."""

    #: Seconds before the second try of a failed load; doubles with each failed try.
    retry_base_seconds: float = 5.0
    #: Longest wait between two tries.
    retry_max_seconds: float = 300.0
    #: Failed tries before the adapter's phase becomes Failed (a spec change starts over).
    max_attempts: int = 5
    #: Sidecar port of pods without a ``brickyard.dev/sidecar-port`` annotation or label.
    sidecar_port: int = defaults.SIDECAR_PORT
    #: File holding the sidecars' adapter API token (or env ``BRICKYARD_SIDECAR_TOKEN``), sent with every
    #: call to a sidecar; unset: none (sidecars listening beyond loopback refuse such calls).
    sidecar_token_file: str | None = None
    #: Seconds a sidecar may take to load an adapter (downloads included).
    load_timeout_seconds: float = 600.0
    #: Seconds for the other calls to engines and sidecars (``/v1/models``, unload).
    http_timeout_seconds: float = 10.0


@dataclass
class PodAutoscalerSettings:
    """``PodAutoscaler``: KPA / APA scaling through the scale subresource, or a native HPA."""

    #: Seconds between two metric samples (and decisions) of each KPA / APA autoscaler.
    sample_seconds: float = 3.0
    #: Seconds to wait for one pod's (or one endpoint's) metrics.
    metrics_timeout_seconds: float = 2.0
    #: A pod-metrics record older than this is ignored.
    metrics_stale_seconds: float = defaults.METRICS_STALE_SECONDS


@dataclass
class ModelRouteSettings:
    """Model routes: one Gateway API ``HTTPRoute`` per model served by labelled Deployments."""

    #: Name of the Envoy Gateway ``Gateway`` every route attaches to.
    gateway_name: str = "brickyard"
    #: Its namespace; unset: the route's own namespace.
    gateway_namespace: str | None = None
    #: ``timeouts.request`` of each route (Gateway API duration, e.g. ``"0s"`` for none); unset: the
    #: gateway implementation's default.
    request_timeout: str | None = None


@dataclass
class ControllerSettings:
    #: Namespace to watch and act in; unset: all namespaces.
    namespace: str | None = None
    #: Redis with the sidecars' pod-metrics records (free LoRA slots, autoscaling metrics); unset: none.
    redis_url: str | None = defaults.REDIS_URL
    #: Controllers to run.
    controllers: list[ControllerName] = field(
        default_factory=lambda: ["model-adapter", "pod-autoscaler", "model-routes"]
    )
    #: Seconds between two reconciles of every object even when nothing changed (level-triggered resync).
    resync_seconds: float = 10.0
    #: First delay after a reconcile error (API failure, conflict); doubles per consecutive error.
    backoff_base_seconds: float = 0.005
    #: Longest delay after reconcile errors.
    backoff_max_seconds: float = 60.0
    #: Reconciles running at once per controller (never two of the same object).
    workers: int = 2
    #: Server-side timeout of one watch request before it is renewed.
    watch_timeout_seconds: int = 300
    #: Seconds one API request may take.
    api_timeout_seconds: float = 30.0
    log_level: str = "info"
    model_adapter: ModelAdapterSettings = field(default_factory=ModelAdapterSettings)
    pod_autoscaler: PodAutoscalerSettings = field(default_factory=PodAutoscalerSettings)
    model_routes: ModelRouteSettings = field(default_factory=ModelRouteSettings)
