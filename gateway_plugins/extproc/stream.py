"""One ext_proc stream = one HTTP request: its state machine from headers to close.

Which message carries the routing decision follows from the request body mode
Envoy reports in ``protocol_config``:

* BUFFERED (AIBrix): headers are answered at once; the decision rides on the
  reply to the single, complete body message.
* FULL_DUPLEX_STREAMED (EPP): the headers reply is held back until the whole
  body has arrived; then come the headers reply with the decision, and the body
  handed back as ``streamed_response`` chunks (header, body, trailer order).

The in-flight count taken at routing time is released in ``on_close``, which
the transport calls exactly once however the stream ends: response done,
client gone, Envoy reset or connection lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from gateway_plugins.errors import GatewayError
from gateway_plugins.extproc import messages
from gateway_plugins.extproc.contracts import STRIPPED_REQUEST_HEADERS, subset_hint
from gateway_plugins.extproc.messages import FULL_DUPLEX, ProcessingRequest
from gateway_plugins.request_parsing import ROUTED_ENDPOINTS, parse_body
from gateway_plugins.routing.router import Decision
from gateway_plugins.routing.strategies import Strategy
from gateway_plugins.routing.types import Endpoint

if TYPE_CHECKING:
    from gateway_plugins.extproc.service import ExtProcService
    from gateway_plugins.transport.server import GrpcStream

log = logging.getLogger("gateway_plugins.requests")

#: Request headers the gateway reads; everything else is ignored without decoding.
_READ_HEADERS = (
    frozenset(
        {":path", ":method", "x-request-id", "routing-strategy", "config-profile", "user", "x-session-id"}
    )
    | STRIPPED_REQUEST_HEADERS
)


class ExtProcStream:
    __slots__ = (
        "_body",
        "_decision",
        "_endpoint",
        "_finished",
        "_full_duplex_request",
        "_full_duplex_response",
        "_grpc",
        "_headers",
        "_model",
        "_request_id",
        "_service",
        "_started",
        "_status",
        "_strategy",
        "_subset",
    )

    def __init__(self, service: ExtProcService, grpc: GrpcStream) -> None:
        self._service = service
        self._grpc = grpc
        self._full_duplex_request = service.full_duplex_default
        self._full_duplex_response = service.full_duplex_default
        self._headers: dict[str, str] = {}
        self._endpoint: Endpoint | None = None
        self._strategy: Strategy | None = None
        self._subset: frozenset[str] | None = None
        self._body: bytearray | None = None
        self._decision: Decision | None = None
        self._request_id = ""
        self._model = ""
        self._finished = False  # an immediate response ended the HTTP request
        self._status: int | None = None  # unknown unless Envoy sends us the response headers
        self._started = time.monotonic() if service.log_requests else 0.0

    # -- StreamHandler ---------------------------------------------------------------

    def on_message(self, message: bytes) -> None:
        if self._finished:
            return
        request = ProcessingRequest.FromString(message)
        kind = request.WhichOneof("request")
        try:
            if kind == "request_headers":
                self._on_request_headers(request)
            elif kind == "request_body":
                self._on_request_body(request.request_body.body, request.request_body.end_of_stream)
            elif kind == "response_headers":
                self._on_response_headers(request)
            elif kind == "response_body":
                self._on_response_body(request.response_body.body, request.response_body.end_of_stream)
            elif kind == "request_trailers":
                self._on_request_trailers()
            elif kind == "response_trailers":
                self._grpc.send(messages.CONTINUE_RESPONSE_TRAILERS)
        except GatewayError as error:
            self._reject(error)
        except Exception:
            log.exception("ext_proc stream failed on %s", kind)
            self._reject(GatewayError(500, "The gateway failed to process the request.", cause="internal"))

    def on_end(self) -> None:
        self._grpc.finish()

    def on_close(self) -> None:
        decision = self._decision
        if decision is not None:
            self._decision = None
            self._service.router.release(decision)
        if self._service.log_requests:
            self._log(decision)

    # -- request direction -------------------------------------------------------------

    def _on_request_headers(self, request: ProcessingRequest) -> None:
        if request.HasField("protocol_config"):
            config = request.protocol_config
            self._full_duplex_request = config.request_body_mode == FULL_DUPLEX
            self._full_duplex_response = config.response_body_mode == FULL_DUPLEX
        headers = self._headers
        for header in request.request_headers.headers.headers:
            if header.key in _READ_HEADERS:
                headers[header.key] = header.raw_value.decode("utf-8", "replace")
        self._request_id = headers.get("x-request-id") or uuid.uuid4().hex
        path = headers.get(":path", "").partition("?")[0]
        method = headers.get(":method", "")
        endpoint = ROUTED_ENDPOINTS.get(path)
        if endpoint is None:
            self._reply_without_routing(path, method)
            return
        if method != "POST":
            raise GatewayError(
                405,
                f"{path} accepts POST, not {method}.",
                cause="method-not-allowed",
                code="method_not_allowed",
            )
        self._endpoint = endpoint
        strategy_name = headers.get("routing-strategy")
        if strategy_name:
            self._strategy = self._service.router.strategy(strategy_name)
        if request.metadata_context.filter_metadata:
            self._subset = subset_hint(request.metadata_context.filter_metadata)
        if request.request_headers.end_of_stream:
            self._on_request_body(b"", True)
        elif not self._full_duplex_request:
            self._grpc.send(self._service.headers_reply(self._cleanup_headers()))

    def _on_request_body(self, chunk: bytes, end_of_stream: bool) -> None:
        if self._endpoint is None:
            return  # answered at the headers already (models list, errors)
        body = self._body
        if body is None and end_of_stream:
            raw = chunk
        else:
            if body is None:
                body = self._body = bytearray()
            body += chunk
            raw = body
        if len(raw) > self._service.max_body_bytes:
            raise GatewayError(
                413,
                f"The request body ({len(raw)} bytes) exceeds the gateway's limit of "
                f"{self._service.max_body_bytes} bytes.",
                cause="body-too-large",
                code="request_too_large",
            )
        if not end_of_stream:
            if not self._full_duplex_request:
                self._grpc.send(messages.CONTINUE_REQUEST_BODY)
            return
        self._route(bytes(raw))
        if self._full_duplex_request:
            for reply in messages.streamed_body("request_body", bytes(raw), True):
                self._grpc.send(reply)

    def _on_request_trailers(self) -> None:
        if self._full_duplex_request and self._decision is None and self._endpoint is not None:
            raw = bytes(self._body or b"")
            self._route(raw)
            for reply in messages.streamed_body("request_body", raw, False):
                self._grpc.send(reply)
        self._grpc.send(messages.CONTINUE_REQUEST_TRAILERS)

    def _route(self, raw: bytes) -> None:
        """Parse the complete body, choose a pod, tell Envoy where to send it."""
        service = self._service
        headers = self._headers
        assert self._endpoint is not None
        request = parse_body(
            self._endpoint, raw, user=headers.get("user"), session_id=headers.get("x-session-id")
        )
        self._model = request.model
        decision = service.router.route(
            request,
            self._strategy,
            subset=self._subset,
            fallbacks=service.fallbacks,
            profile=headers.get("config-profile"),
        )
        self._decision = decision
        if self._full_duplex_request:
            self._grpc.send(service.routed_headers_reply(decision, self._cleanup_headers()))
        else:
            self._grpc.send(service.routed_body_reply(decision))

    def _cleanup_headers(self) -> tuple[dict[str, str], list[str]]:
        """Client routing headers to strip, and an ``x-request-id`` to add if it was missing."""
        remove = [name for name in self._headers if name in STRIPPED_REQUEST_HEADERS]
        add = {} if "x-request-id" in self._headers else {"x-request-id": self._request_id}
        return add, remove

    def _reply_without_routing(self, path: str, method: str) -> None:
        """Requests the gateway answers itself: the model list, or a clear 404/405."""
        if path == Endpoint.MODELS or path.startswith(Endpoint.MODELS + "/"):
            if method != "GET":
                raise GatewayError(
                    405,
                    f"{path} accepts GET, not {method}.",
                    cause="method-not-allowed",
                    code="method_not_allowed",
                )
            self._finish_with(200, self._service.models_body(path.removeprefix(Endpoint.MODELS).lstrip("/")))
            return
        raise GatewayError(
            404,
            f"Unsupported path {path or '(none)'}. "
            f"The gateway serves {', '.join(e.value for e in Endpoint)}.",
            cause="unsupported-path",
            code="unknown_url",
        )

    # -- response direction ------------------------------------------------------------

    def _on_response_headers(self, request: ProcessingRequest) -> None:
        for header in request.response_headers.headers.headers:
            if header.key == ":status":
                self._status = int(header.raw_value or 0) or None
                break
        self._grpc.send(self._service.response_headers_reply(self._decision, self._request_id))

    def _on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        if self._full_duplex_response:
            for reply in messages.streamed_body("response_body", chunk, end_of_stream):
                self._grpc.send(reply)
        else:
            self._grpc.send(messages.CONTINUE_RESPONSE_BODY)

    # -- endings -----------------------------------------------------------------------

    def _reject(self, error: GatewayError) -> None:
        self._status = error.status
        self._finished = True
        self._grpc.send(messages.error_reply(error))

    def _finish_with(self, status: int, body: bytes) -> None:
        self._status = status
        self._finished = True
        self._grpc.send(messages.immediate_response(status, body, {"content-type": "application/json"}))

    def _log(self, decision: Decision | None) -> None:
        log.debug(
            "request",
            extra={
                "request_id": self._request_id,
                "path": self._headers.get(":path"),
                "model": self._model,
                "strategy": decision.strategy if decision else None,
                "pod": decision.pod.name if decision else None,
                "status": self._status,
                "ms": round((time.monotonic() - self._started) * 1000, 3),
            },
        )
