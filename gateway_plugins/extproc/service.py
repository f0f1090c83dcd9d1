"""What every ext_proc stream of one gateway shares: its router, contract, answers, tenancy and metrics,
and the settings streams read per request, resolved once."""

from __future__ import annotations

import logging

from gateway_plugins.config import GatewaySettings
from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.extproc.answers import Answers
from gateway_plugins.extproc.contracts import CONTRACTS, STRIPPED_REQUEST_HEADERS
from gateway_plugins.metrics import RequestMetrics
from gateway_plugins.routing.router import Router
from gateway_plugins.tenancy.gate import Tenancy

#: gRPC method path Envoy calls.
PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
#: Request headers the gateway reads (besides those it strips); everything else is ignored undecoded.
READ_HEADERS = frozenset(
    {
        ":path",
        ":method",
        "x-request-id",
        "routing-strategy",
        "config-profile",
        "user",
        "x-session-id",
        "authorization",
    }
)


class ExtProcService:
    """The ext_proc service's shared state; ``ExtProcStream(service, grpc)`` serves one stream of it."""

    def __init__(
        self,
        settings: GatewaySettings,
        registry: PodRegistry,
        router: Router,
        metrics: RequestMetrics,
        tenancy: Tenancy | None = None,
        *,
        engine_api_key: str | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.tenancy = tenancy
        self.answers = Answers(registry)
        self.contract = CONTRACTS[settings.contract]()
        self.observe_response_status = settings.observe_response_status
        #: Body modes to assume when Envoy does not report them in protocol_config.
        self.full_duplex_default = settings.contract == "epp"
        self.fallbacks = settings.epp_fallbacks if settings.contract == "epp" else 0
        self.max_body_bytes = settings.max_body_bytes
        self.tokenize_in_thread_bytes = settings.tokenize_in_thread_bytes
        #: Client headers no engine sees: routing headers a client must not choose, EPP control headers,
        #: and the tenant's credentials.
        self.stripped_headers = STRIPPED_REQUEST_HEADERS | frozenset(
            name.lower() for name in settings.engine_credentials.strip_headers
        )
        self.read_headers = READ_HEADERS | self.stripped_headers
        #: Set on every routed request (and never stripped): the engines' own key.
        self.engine_headers = {"authorization": f"Bearer {engine_api_key}"} if engine_api_key else {}
        self.log_requests = logging.getLogger("gateway_plugins.requests").isEnabledFor(logging.DEBUG)
