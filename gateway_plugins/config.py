"""Every gateway setting, with its default, in one place (documented in docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from brickyard_core import defaults

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
    #: kubernetes: also watch ModelAdapters (``brickyard.dev/v1alpha1``) and route each adapter only to the
    #: pods in its ``status.instances``; without the CRD this is logged once and records alone decide.
    model_adapters: bool = True


@dataclass
class PrefixCacheSettings:
    """The approximate prefix index behind ``prefix-cache`` and ``prefix-cache-and-load``."""

    #: Tokens per hashed block; vLLM's GPU default block size, so a matched block is a cacheable one.
    block_tokens: int = 16
    #: Only the first this many blocks of a prompt are hashed and matched (4,096 tokens at 16 per block).
    max_blocks: int = 256
    #: Blocks remembered per pod when its record does not report the KV cache size (which sets it otherwise).
    capacity_blocks: int = 31_250
    #: Seconds after which a block the pod was not sent again is forgotten.
    ttl_seconds: float = 600.0
    #: Matches covering less of the prompt than this fraction count as no match (route on load instead).
    min_match_ratio: float = 0.3


@dataclass
class SessionAffinitySettings:
    """``session-affinity``: the ``x-session-id`` -> pod table."""

    #: Seconds a session keeps its pod after its last request.
    ttl_seconds: float = 1800.0
    #: Sessions remembered; the least recently used is forgotten beyond this.
    max_sessions: int = 100_000


@dataclass
class FairnessSettings:
    """``vtc-basic``: virtual token counters per user."""

    #: Half-life, in seconds, of the tokens counted against a user.
    half_life_seconds: float = 60.0
    #: Output tokens counted per request when the response's usage is not reported back.
    expected_output_tokens: int = 128


@dataclass
class GpuProfile:
    """What one GPU type costs and how fast it serves, for ``gpu-type``."""

    #: Relative cost (for instance dollars per hour); cheaper types are preferred.
    cost: float = 1.0
    #: Prefill throughput of one pod, prompt tokens per second.
    prefill_tokens_per_second: float = 10_000.0
    #: Time per output token of one pod with ``max_inflight`` requests in its batch (the slowest a pod that
    #: is not saturated decodes), seconds.
    seconds_per_output_token: float = 0.02
    #: Requests in flight at which a pod of this type counts as saturated (traffic spills over).
    max_inflight: int = 64


@dataclass
class GpuTypeSettings:
    """``gpu-type``: heterogeneous fleets, each request on the cheapest GPU type that meets the SLOs."""

    #: Profiles by GPU type, keyed by the exact string a sidecar reports as ``gpu_type`` (or the label holds);
    #: pods of any other type are served last (see docs/routing.md).
    profiles: dict[str, GpuProfile] = field(default_factory=dict)
    #: Pod label naming the GPU type when the pod's record does not.
    label: str = "nvidia.com/gpu.product"
    #: Time-to-first-token objective a type must meet for a request, seconds.
    ttft_slo_seconds: float = 1.0
    #: Time-per-output-token objective, seconds.
    tpot_slo_seconds: float = 0.05
    #: A pod whose record shows more requests than this waiting in the engine's queue counts as saturated
    #: (a few wait in any busy vLLM engine: new arrivals until the next step, prompts behind a long prefill).
    max_waiting: int = 8


@dataclass
class LoadGuardSettings:
    """The load guard of the affinity strategies (``prefix-cache``, ``prefix-cache-and-load``,
    ``session-affinity``, ``lora-affinity``): a pod far busier than the other candidates takes no more
    requests for the sake of a cache, a session or an adapter, so a hot prefix cannot melt one pod."""

    #: A pod is overloaded when its in-flight count exceeds this multiple of the candidates' mean ...
    ratio: float = 1.5
    #: ... and the least loaded candidate's count by more than this (the ratio alone trips on tiny counts).
    min_gap: int = 8


@dataclass
class RoutingSettings:
    """Knobs of the strategies that have any."""

    prefix_cache: PrefixCacheSettings = field(default_factory=PrefixCacheSettings)
    session_affinity: SessionAffinitySettings = field(default_factory=SessionAffinitySettings)
    fairness: FairnessSettings = field(default_factory=FairnessSettings)
    gpu_type: GpuTypeSettings = field(default_factory=GpuTypeSettings)
    load_guard: LoadGuardSettings = field(default_factory=LoadGuardSettings)
    #: Named weighted combinations, usable wherever a strategy name is (header, defaults), besides the
    #: built-in ``inference-extension`` (``least-queue:2,least-kv-cache:2,prefix-cache:3``).
    presets: dict[str, str] = field(default_factory=dict)
    #: Third-party strategies' own settings (entry points ``brickyard.strategies``), free-form, by name.
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ModelSettings:
    """Per-model overrides."""

    #: Strategy for this model when the request names none.
    routing_strategy: str | None = None
    #: The model's tokenizer, so requests are routed on the token ids vLLM will compute: a folder holding
    #: ``tokenizer.json`` (and the chat template, in ``tokenizer_config.json`` or ``chat_template.jinja``),
    #: or ``hf://org/repo[@revision]`` (tokenizer files only, through the HF cache; ``HF_ENDPOINT`` and
    #: ``HF_HUB_OFFLINE`` apply). Unset: the model is routed on approximate lengths (characters / 4).
    tokenizer: str | None = None


@dataclass
class TenancySettings:
    """Who is calling and how much they may use: API keys, per-user and per-model limits, token usage.

    Users live in Redis (``redis_url``); managed with ``brickyard users`` or the admin API."""

    #: Turn tenancy on (needs ``redis_url``); off, requests are neither identified, limited nor accounted.
    enabled: bool = False
    #: Require ``Authorization: Bearer <key>`` of a known user on every routed request (401 otherwise).
    #: Off: the tenant is the ``user`` header (or the body's ``user`` field), unauthenticated.
    require_api_key: bool = False
    #: Requests per minute of a user whose record does not set ``rpm`` (and of ``user`` headers without
    #: a record); null: unlimited.
    default_rpm: int | None = 100
    #: Tokens per minute of a user whose record does not set ``tpm``; null: ``default_rpm`` x 1000.
    default_tpm: int | None = None
    #: Requests per second per model, whoever sends them; models not listed are unlimited.
    model_rps: dict[str, int] = field(default_factory=dict)
    #: When Redis cannot be reached for a limit check: ``open`` admits (logged once per outage),
    #: ``closed`` answers 503.
    failure_policy: Literal["open", "closed"] = "open"
    #: Seconds a limit check or token charge may wait for Redis before the failure policy applies.
    redis_timeout_seconds: float = 0.25
    #: Seconds between full reloads of the users from Redis (changes also arrive by pub/sub at once).
    users_resync_seconds: float = 30.0
    #: Count the tokens of every request that has a tenant from its response's ``usage`` (TPM limits,
    #: per-user token metrics). Responses of such requests pass through the gateway.
    account_usage: bool = True
    #: HTTP port of the admin API (users and keys); served only when an admin token is set.
    admin_port: int = defaults.ADMIN_PORT
    #: File holding the admin API's bearer token (or env ``BRICKYARD_ADMIN_TOKEN``); unset: no admin API.
    admin_token_file: str | None = None


@dataclass
class KvEventSettings:
    """The engines' own KV-cache events (vLLM's ``--kv-events-config``), read into the exact prefix index
    that ``prefix-cache``, ``prefix-cache-and-load`` and the ``inference-extension`` preset prefer for
    every pod whose events are live (docs/routing.md)."""

    #: Subscribe to every discovered pod's events. The engines publish on ``tcp://*:<port>``.
    enabled: bool = False
    #: Port of each engine's event publisher; a pod's ``brickyard.dev/kv-events-port`` annotation wins.
    port: int = defaults.KV_EVENTS_PORT
    #: Port of each engine's replay socket (vLLM's ``replay_endpoint``), asked for the history on
    #: subscription and for missed batches after a gap; 0: none. Annotation
    #: ``brickyard.dev/kv-events-replay-port`` wins.
    replay_port: int = 0
    #: Seconds a replay may take before the pod is left to heal on its own.
    replay_timeout_seconds: float = 2.0
    #: After a gap no replay closed (or a subscription that joined late), the pod is routed on the
    #: approximate index for this long: what was missed heals as blocks are stored and evicted again.
    resync_seconds: float = 30.0
    #: A routed prompt's blocks count as held by the chosen pod for this long before its events confirm
    #: them, so a burst of one new prefix does not scatter.
    speculative_seconds: float = 2.0


@dataclass
class EngineCredentialSettings:
    """A tenant's credentials are for the gateway: they never reach an engine. Engines that require a key
    of their own (vLLM's ``--api-key``) get the gateway's."""

    #: Request headers removed before the request reaches an engine.
    strip_headers: list[str] = field(
        default_factory=lambda: ["authorization", "proxy-authorization", "x-api-key", "api-key"]
    )
    #: File holding the engines' API key (or env ``BRICKYARD_ENGINE_API_KEY``), sent to every engine as
    #: ``Authorization: Bearer <key>``; unset: requests reach the engines without one.
    api_key_file: str | None = None


@dataclass
class GatewaySettings:
    #: Wire contract with Envoy: ``aibrix`` (target-pod header, ORIGINAL_DST cluster) or ``epp``
    #: (Gateway API Inference Extension: x-gateway-destination-endpoint header + envoy.lb metadata).
    contract: Contract = "aibrix"
    #: Address the gRPC, health and metrics servers bind to.
    listen_host: str = "0.0.0.0"
    #: ext_proc gRPC port (the Inference Extension's default).
    grpc_port: int = defaults.GRPC_PORT
    #: gRPC health service port (services "", liveness, readiness, the ext_proc service).
    health_port: int = defaults.HEALTH_PORT
    #: HTTP port of /metrics.
    metrics_port: int = defaults.METRICS_PORT
    #: Strategy when neither the request nor the model's settings name one: a name, a preset or a
    #: weighted combination (``prefix-cache:3,least-request:1``).
    default_strategy: str = "least-request"
    #: Strategy knobs and named presets.
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    #: Per-model settings, keyed by model name.
    models: dict[str, ModelSettings] = field(default_factory=dict)
    #: Largest request body routed; bigger bodies get 413.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Bodies longer than this (bytes) of a model with a tokenizer are tokenized in a worker thread before
    #: routing, so a long prompt (milliseconds of tokenization) does not hold up other streams.
    tokenize_in_thread_bytes: int = 16 * 1024
    #: EPP contract: alternates listed after the primary endpoint, for Envoy retries.
    epp_fallbacks: int = 2
    #: Seconds to let open streams finish after SIGTERM.
    drain_seconds: float = 20.0
    #: Redis with the sidecars' pod-metrics records and other gateways' in-flight counts; unset: neither.
    redis_url: str | None = None
    #: A pod-metrics record older than this is unknown to routing (never read as saturated).
    metrics_stale_seconds: float = defaults.METRICS_STALE_SECONDS
    #: Seconds between reports of this gateway's in-flight counts to the other replicas.
    inflight_share_seconds: float = 0.05
    #: AIBrix contract: ask Envoy for every routed request's response headers, so request counts carry
    #: the status code (one more message per request); off, only accounted requests' are seen.
    observe_response_status: bool = False
    #: API keys, limits and usage accounting (need ``redis_url``).
    tenancy: TenancySettings = field(default_factory=TenancySettings)
    #: The engines' KV-cache events, for exact prefix-aware routing.
    kv_events: KvEventSettings = field(default_factory=KvEventSettings)
    #: What the engines see of credentials: the clients' stripped, the gateway's own key added.
    engine_credentials: EngineCredentialSettings = field(default_factory=EngineCredentialSettings)
    #: Log level; ``debug`` logs one line per request.
    log_level: str = "info"
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
