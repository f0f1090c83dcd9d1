"""Defaults that more than one component must agree on, stated once.

The settings trees (``gateway_plugins/config.py``, ``runtime_sidecar/config.py``, ``controllers/config.py``)
and the local stack import these; a default only one component uses stays in that component's tree.
"""

from __future__ import annotations

#: The local host: the local stack runs everything there, and a sidecar finds its engine and Redis there
#: unless told otherwise.
LOOPBACK = "127.0.0.1"

#: Namespace of a pod that names none: a sidecar's without ``$POD_NAMESPACE``, the local stack's engines.
NAMESPACE = "default"

#: Redis of a single host: the sidecars write their pod-metrics records there, the controllers read them.
REDIS_URL = f"redis://{LOOPBACK}:6379/0"

#: The runtime sidecar's HTTP API (adapters): the sidecar listens there, the controllers call it there on
#: pods that do not say otherwise.
SIDECAR_PORT = 8090

#: Port of an engine's KV-cache event publisher (vLLM ``--kv-events-config`` endpoint ``tcp://*:5557``):
#: the port vLLM's own examples use.
KV_EVENTS_PORT = 5557

#: Trailing window of the rates and means of a pod-metrics record: the sidecar averages over it, and a record
#: built without one (``brickyard_core.podmetrics.MetricsWindow``) covers the same.
METRICS_WINDOW_SECONDS = 2.0

#: A pod-metrics record older than this is ignored, alike by the gateway (routing) and the controllers
#: (autoscaling), so both see the same pods as alive.
METRICS_STALE_SECONDS = 2.0

# The gateway's ports. Envoy's standalone configs (envoy/*.yaml) and deploy/ (the Deployment, its Service,
# the InferencePool) name them in YAML; tests/deploy checks that they agree with the settings.
#: ext_proc gRPC (the Inference Extension's default endpoint-picker port).
GRPC_PORT = 9002
#: gRPC health checking.
HEALTH_PORT = 9003
#: HTTP /metrics.
METRICS_PORT = 9090
#: The admin API (users, API keys): the gateway serves it, ``brickyard users`` calls it.
ADMIN_PORT = 9091
