"""The ext_proc service: per-gateway state shared by all streams, and reply encoding."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson

from gateway_plugins.config import GatewaySettings
from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.extproc import messages
from gateway_plugins.extproc.contracts import CONTRACTS, STRIPPED_REQUEST_HEADERS
from gateway_plugins.extproc.stream import READ_HEADERS, ExtProcStream
from gateway_plugins.metrics import RequestMetrics
from gateway_plugins.routing.router import Decision, Router
from gateway_plugins.tenancy.gate import Tenancy
from gateway_plugins.tenancy.limits import Verdict

if TYPE_CHECKING:
    from brickyard_core.api.envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import (
        ProcessingMode,
    )
    from gateway_plugins.transport.server import GrpcStream

#: gRPC method path Envoy calls.
PROCESS_METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class ExtProcService:
    """Creates one ``ExtProcStream`` per gRPC stream and encodes the replies they send."""

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
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.tenancy = tenancy
        self.observe_response_status = settings.observe_response_status
        self.contract = CONTRACTS[settings.contract]
        #: Body modes to assume when Envoy does not report them in protocol_config.
        self.full_duplex_default = settings.contract == "epp"
        self.fallbacks = settings.epp_fallbacks if settings.contract == "epp" else 0
        self.max_body_bytes = settings.max_body_bytes
        #: Client headers no engine sees: routing headers a client must not choose, EPP control headers,
        #: and the tenant's credentials.
        self.stripped_headers = STRIPPED_REQUEST_HEADERS | frozenset(
            name.lower() for name in settings.engine_credentials.strip_headers
        )
        self.read_headers = READ_HEADERS | self.stripped_headers
        #: Set on every routed request (and never stripped): the engines' own key.
        self.engine_headers = {"authorization": f"Bearer {engine_api_key}"} if engine_api_key else {}
        self.log_requests = logging.getLogger("gateway_plugins.requests").isEnabledFor(logging.DEBUG)
        self._started = int(time.time())

    def __call__(self, grpc: GrpcStream) -> ExtProcStream:
        return ExtProcStream(self, grpc)

    # -- replies -------------------------------------------------------------------

    @staticmethod
    def headers_reply(cleanup: tuple[dict[str, str], list[str]], mode: ProcessingMode | None = None) -> bytes:
        add, remove = cleanup
        if not add and not remove and mode is None:
            return messages.CONTINUE_REQUEST_HEADERS
        return messages.reply("request_headers", messages.header_mutation(add, remove), mode=mode)

    def routed_body_reply(self, decision: Decision, body: bytes | None = None) -> bytes:
        """BUFFERED mode: the destination rides on the body reply; cached per (pod, strategy) unless it
        carries something of this request's own (fallbacks, a session id, a rewritten body, a combination
        of strategies the client made up: those would grow the cache without bound)."""
        if body is not None:
            headers, metadata = self.contract.destination(decision)
            headers["content-length"] = str(len(body))  # Envoy keeps the header; it must match the body
            return messages.reply("request_body", messages.header_mutation(headers), metadata, body=body)
        if (
            decision.fallbacks
            or decision.request.bound_session is not None
            or self.router.label(decision.strategy) != decision.strategy
        ):
            headers, metadata = self.contract.destination(decision)
            return messages.reply("request_body", messages.header_mutation(headers), metadata)
        encoded = decision.pod.encoded
        reply = encoded.get(decision.strategy)
        if reply is None:
            headers, metadata = self.contract.destination(decision)
            reply = encoded[decision.strategy] = messages.reply(
                "request_body", messages.header_mutation(headers), metadata
            )
        return reply

    def routed_headers_reply(self, decision: Decision, cleanup: tuple[dict[str, str], list[str]]) -> bytes:
        """FULL_DUPLEX_STREAMED mode: the destination rides on the (deferred) headers reply."""
        headers, metadata = self.contract.destination(decision)
        add, remove = cleanup
        return messages.reply(
            "request_headers", messages.header_mutation({**headers, **add}, remove), metadata
        )

    @staticmethod
    def response_headers_reply(decision: Decision | None, request_id: str, verdict: Verdict | None) -> bytes:
        """Tell the client which pod served it and where its rate limits stand (when Envoy sends us the
        response headers)."""
        headers = verdict.headers() if verdict is not None else {}
        headers["request-id"] = request_id
        if decision is not None:
            headers["target-pod"] = decision.pod.name
            headers["target-pod-ip"] = decision.pod.address
            headers["routing-strategy"] = decision.strategy
            if decision.request.bound_session is not None:
                headers["x-session-id"] = decision.request.bound_session
        return messages.reply("response_headers", messages.header_mutation(headers))

    def models_body(self, model_id: str) -> bytes:
        """``GET /v1/models`` (models with a ready pod) or ``GET /v1/models/{id}``."""
        models = [
            {"id": name, "object": "model", "created": self._started, "owned_by": "brickyard"}
            for name in self.registry.serving_models()
        ]
        if not model_id:
            return orjson.dumps({"object": "list", "data": models})
        for model in models:
            if model["id"] == model_id:
                return orjson.dumps(model)
        raise GatewayError(
            404, f"The model `{model_id}` does not exist.", cause="model-not-found", code="model_not_found"
        )
