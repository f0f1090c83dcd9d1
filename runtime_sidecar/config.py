"""Every runtime sidecar setting, with its default, in one place (documented in docs/configuration.md)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Literal

from brickyard_core import defaults


@dataclass
class ArtifactSettings:
    """Where the adapter API may fetch adapters from: its callers name URLs and paths, so the sidecar must
    not become a way into the cluster network or the pod's file system (docs/security.md)."""

    #: URL schemes of remote artifacts (of ``http``, ``https``, ``s3``, ``hf``).
    schemes: list[str] = field(default_factory=lambda: ["https", "s3", "hf"])
    #: Hosts remote artifacts may come from (exact names, or ``*.example.com``); empty: any host.
    hosts: list[str] = field(default_factory=list)
    #: Fetch from private, loopback and link-local addresses (an artifact store inside the cluster).
    allow_private_networks: bool = False
    #: Directories adapters may be loaded from in place (``lora_path``, ``file://``, an artifact URL that is
    #: a path); empty: none, every adapter is fetched into ``adapter_dir``.
    local_roots: list[str] = field(default_factory=list)


@dataclass
class SidecarSettings:
    #: Base URL of the engine this sidecar runs beside.
    engine_url: str = f"http://{defaults.LOOPBACK}:8000"
    #: Engine type; ``auto`` detects it from the metric names.
    engine: Literal["auto", "vllm", "sglang"] = "auto"
    #: Identity of the pod, as discovery knows it (Kubernetes: the downward API's POD_NAME / POD_NAMESPACE).
    pod: str = field(default_factory=lambda: os.environ.get("POD_NAME") or socket.gethostname())
    namespace: str = field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or defaults.NAMESPACE)
    #: Model the engine serves (informational; routing keys on the pod).
    model: str = ""
    #: GPU type published with every record (heterogeneous fleets route on it).
    gpu_type: str = ""
    #: Where records go; unset runs without publishing (local /metrics only).
    redis_url: str | None = defaults.REDIS_URL
    #: Seconds between scrapes, one record published per scrape.
    interval_seconds: float = 0.05
    #: Seconds a record lives in Redis without being refreshed.
    ttl_seconds: float = 10.0
    #: Trailing window of the rates and means in each record.
    window_seconds: float = defaults.METRICS_WINDOW_SECONDS
    #: A scrape slower than this counts as a failure (the engine is marked unhealthy).
    scrape_timeout_seconds: float = 1.0
    #: Address and port of the sidecar's HTTP API (adapters; also /healthz, /ready, /metrics). Loopback
    #: unless a token is set: the adapter API never listens on the network unauthenticated.
    listen_host: str = defaults.LOOPBACK
    port: int = defaults.SIDECAR_PORT
    #: File holding the adapter API's bearer token (or env ``BRICKYARD_SIDECAR_TOKEN``); required when
    #: ``listen_host`` is not a loopback address.
    api_token_file: str | None = None
    #: A second port (same address) serving only /metrics, /healthz and /ready, without a token, so that a
    #: network policy can open metrics alone to the monitoring namespace; unset: they stay on ``port``.
    metrics_port: int | None = None
    #: What the adapter API may fetch.
    artifacts: ArtifactSettings = field(default_factory=ArtifactSettings)
    #: Where downloaded adapters are kept.
    adapter_dir: str = "/var/lib/brickyard/adapters"
    #: Adapters this engine may hold at once; unset uses the engine's own max LoRAs (from its metrics).
    max_adapters: int | None = None
    #: Seconds between reads of the adapters registered with the engine (its ``/v1/models``), which every
    #: record carries; the sidecar's own load and unload re-read them at once.
    adapters_refresh_seconds: float = 1.0
    log_level: str = "info"
