"""One ext_proc stream = one HTTP request: its state machine from headers to close.

Which message carries the routing decision follows from the request body mode
Envoy reports in ``protocol_config``:

* BUFFERED (AIBrix): headers are answered at once; the decision rides on the
  reply to the single, complete body message.
* FULL_DUPLEX_STREAMED (EPP): the headers reply is held back until the whole
  body has arrived; then come the headers reply with the decision, and the body
  handed back as ``streamed_response`` chunks (header, body, trailer order).

With tenancy on, the caller is identified at the request headers (401 there),
and once the body names the model the limits are checked in Redis: the one
step that awaits. Messages arriving meanwhile wait in a backlog, so the state
machine still sees them in order. Requests whose usage is accounted ask Envoy,
by a mode override on the headers reply, for the response headers (status,
rate-limit headers) and body (usage, TTFT); when the gateway had to add
``stream_options.include_usage`` itself, it removes the extra usage chunk
from what the client sees.

The in-flight count taken at routing time is released in ``on_close``, which
the transport calls exactly once however the stream ends: response done,
client gone, Envoy reset or connection lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from gateway_plugins.errors import GatewayError, bad_request, internal_error
from gateway_plugins.extproc import messages
from gateway_plugins.extproc.contracts import subset_hint
from gateway_plugins.extproc.messages import FULL_DUPLEX, ProcessingRequest
from gateway_plugins.request_parsing import ROUTED_ENDPOINTS, parse_body
from gateway_plugins.routing.router import Decision
from gateway_plugins.routing.strategies import Strategy
from gateway_plugins.routing.types import Endpoint, RoutingRequest
from gateway_plugins.tenancy.gate import Tenant
from gateway_plugins.tenancy.limits import Limit, Verdict
from gateway_plugins.tenancy.usage import JsonUsage, SseUsage

if TYPE_CHECKING:
    from gateway_plugins.extproc.service import ExtProcService
    from gateway_plugins.transport.server import GrpcStream

log = logging.getLogger("gateway_plugins.requests")

#: Request headers the gateway reads (besides those it strips, ``ExtProcService.stripped_headers``);
#: everything else is ignored without decoding.
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


class ExtProcStream:
    __slots__ = (
        "_backlog",
        "_body",
        "_decision",
        "_endpoint",
        "_finished",
        "_full_duplex_request",
        "_full_duplex_response",
        "_grpc",
        "_headers",
        "_last_chunk",
        "_model",
        "_pending",
        "_request_id",
        "_routed_at",
        "_service",
        "_started",
        "_status",
        "_strategy",
        "_subset",
        "_tenant",
        "_usage",
        "_verdict",
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
        self._tenant: Tenant | None = None
        self._verdict: Verdict | None = None
        self._usage: SseUsage | JsonUsage | None = None  # set when the response is read for its usage
        self._routed_at = self._last_chunk = 0.0
        self._pending: asyncio.Task[None] | None = None  # the limit check being awaited
        self._backlog: list[bytes] = []

    # -- StreamHandler ---------------------------------------------------------------

    def on_message(self, message: bytes) -> None:
        if self._finished:
            return
        if self._pending is not None:
            self._backlog.append(message)
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
            self._reject(internal_error())

    def on_end(self) -> None:
        self._grpc.finish()

    def on_close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        decision = self._decision
        service = self._service
        if decision is not None:
            self._decision = None
            service.router.release(decision)
        if self._usage is not None:
            self._account()
        # Only routed requests name their model: a client's made-up model names must not become series.
        service.metrics.requests.labels(
            self._model if decision else "",
            service.router.label(decision.strategy) if decision else "",
            self._status or "forwarded",
        ).inc()
        if service.log_requests:
            self._log(decision)

    def _await(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` (which awaits Redis) and hold the stream's next messages until it is done."""
        self._pending = asyncio.get_running_loop().create_task(self._run_pending(step))

    async def _run_pending(self, step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except GatewayError as error:
            self._reject(error)
        except Exception:
            log.exception("ext_proc stream failed while checking limits")
            self._reject(internal_error())
        self._pending = None
        backlog, self._backlog = self._backlog, []
        for message in backlog:
            self.on_message(message)

    # -- request direction -------------------------------------------------------------

    def _on_request_headers(self, request: ProcessingRequest) -> None:
        if request.HasField("protocol_config"):
            config = request.protocol_config
            self._full_duplex_request = config.request_body_mode == FULL_DUPLEX
            self._full_duplex_response = config.response_body_mode == FULL_DUPLEX
        headers = self._headers
        read = self._service.read_headers
        for header in request.request_headers.headers.headers:
            if header.key in read:
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
        tenancy = self._service.tenancy
        if tenancy is not None:
            self._tenant = tenancy.identify(headers.get("authorization"), headers.get("user"))
        strategy_name = headers.get("routing-strategy")
        if strategy_name:
            self._strategy = self._service.router.strategy(strategy_name)
        if request.metadata_context.filter_metadata:
            self._subset = subset_hint(request.metadata_context.filter_metadata)
        if request.request_headers.end_of_stream:
            self._on_request_body(b"", True)
        elif not self._full_duplex_request:
            self._grpc.send(self._service.headers_reply(self._cleanup_headers(), self._response_mode()))

    def _response_mode(self) -> Any:
        """The mode override asking for the response (AIBrix contract), or None to leave it to Envoy."""
        service = self._service
        if service.tenancy is not None and service.tenancy.accounts(self._tenant):
            return messages.OBSERVE_RESPONSE
        return messages.OBSERVE_RESPONSE_HEADERS if service.observe_response_status else None

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
        self._route(bytes(raw), True)

    def _on_request_trailers(self) -> None:
        if self._full_duplex_request and self._decision is None and self._endpoint is not None:
            self._route(bytes(self._body or b""), False)
        else:
            self._grpc.send(messages.CONTINUE_REQUEST_TRAILERS)

    def _route(self, raw: bytes, body_ends_stream: bool) -> None:
        """Parse the complete body, check the limits, choose a pod, tell Envoy where to send it."""
        headers = self._headers
        assert self._endpoint is not None
        tenant = self._tenant
        request = parse_body(
            self._endpoint,
            raw,
            user=tenant.name if tenant is not None else headers.get("user"),
            session_id=headers.get("x-session-id"),
        )
        self._model = request.model
        tenancy = self._service.tenancy
        limits = tenancy.limits(tenant, request.model) if tenancy is not None else None
        if limits:
            self._service.router.candidates(request.model, self._subset)  # 404/503 before counting it
            self._await(self._admit_and_commit(request, raw, body_ends_stream, limits))
        else:
            self._commit(request, raw, body_ends_stream)

    async def _admit_and_commit(
        self, request: RoutingRequest, raw: bytes, body_ends_stream: bool, limits: list[Limit]
    ) -> None:
        assert self._service.tenancy is not None
        self._verdict = await self._service.tenancy.admit(limits)
        self._commit(request, raw, body_ends_stream)

    def _commit(self, request: RoutingRequest, raw: bytes, body_ends_stream: bool) -> None:
        service = self._service
        body, usage = self._prepare_usage(request, raw)
        started = time.perf_counter()
        decision = service.router.route(
            request,
            self._strategy,
            subset=self._subset,
            fallbacks=service.fallbacks,
            profile=self._headers.get("config-profile"),
        )
        # Routed and counted in flight: from here on ``on_close`` releases it, whatever happens next.
        self._decision = decision
        self._usage = usage
        self._routed_at = time.perf_counter()
        service.metrics.decision_seconds.observe(self._routed_at - started)
        if self._full_duplex_request:
            cleanup = self._cleanup_headers()
            if body is not raw:
                cleanup[1].append("content-length")
            self._grpc.send(service.routed_headers_reply(decision, cleanup))
            for reply in messages.streamed_body("request_body", body, body_ends_stream):
                self._grpc.send(reply)
            if not body_ends_stream:
                self._grpc.send(messages.CONTINUE_REQUEST_TRAILERS)
        elif body is not raw:
            self._grpc.send(service.routed_body_reply(decision, body))
        else:
            self._grpc.send(service.routed_body_reply(decision))

    def _prepare_usage(
        self, request: RoutingRequest, raw: bytes
    ) -> tuple[bytes, SseUsage | JsonUsage | None]:
        """The body to forward and the parser of the response's usage, when the tenant is accounted: the
        body gets ``stream_options.include_usage`` when a stream would not report usage otherwise."""
        tenancy = self._service.tenancy
        if tenancy is None or not tenancy.accounts(self._tenant):
            return raw, None
        if not request.stream or request.endpoint is Endpoint.RESPONSES:  # Responses streams report usage
            return raw, JsonUsage() if not request.stream else SseUsage()
        if request.include_usage:
            return raw, SseUsage()
        body = dict(request.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            return orjson.dumps(body), SseUsage(strip_usage_chunk=True)
        except orjson.JSONEncodeError:  # orjson writes 255 levels; it reads 1,024
            raise bad_request(
                "The request body is nested too deeply (more than 255 levels).",
                cause="invalid-body",
                code="invalid_value",
            ) from None

    def _cleanup_headers(self) -> tuple[dict[str, str], list[str]]:
        """Headers to set (the engines' own credentials, an ``x-request-id`` if missing) and the client's
        routing headers and credentials to strip."""
        service = self._service
        add = service.engine_headers
        remove = [name for name in self._headers if name in service.stripped_headers and name not in add]
        if "x-request-id" not in self._headers:
            add = {**add, "x-request-id": self._request_id}
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
        self._grpc.send(self._service.response_headers_reply(self._decision, self._request_id, self._verdict))

    def _on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        usage = self._usage
        out = chunk
        if usage is not None:
            self._observe_timing()
            if isinstance(usage, SseUsage):
                out = usage.feed(chunk)
                if end_of_stream:
                    tail = usage.finish()
                    out = out + tail if tail else out
            else:
                usage.feed(chunk)
            if end_of_stream:
                self._account()
        if self._full_duplex_response:
            if out or end_of_stream:
                for reply in messages.streamed_body("response_body", out, end_of_stream):
                    self._grpc.send(reply)
        elif out is chunk:
            self._grpc.send(messages.CONTINUE_RESPONSE_BODY)
        else:
            self._grpc.send(messages.reply("response_body", body=out))

    def _observe_timing(self) -> None:
        now = time.perf_counter()
        metrics = self._service.metrics
        if self._last_chunk:
            if isinstance(self._usage, SseUsage):
                metrics.itl_seconds.labels(self._model).observe(now - self._last_chunk)
        elif self._routed_at:
            metrics.ttft_seconds.labels(self._model).observe(now - self._routed_at)
        self._last_chunk = now

    def _account(self) -> None:
        """The response is complete (or abandoned): charge and count its usage, once."""
        parser, self._usage = self._usage, None
        assert parser is not None
        usage = parser.finish() if isinstance(parser, JsonUsage) else parser.usage
        metrics = self._service.metrics
        tenant = self._tenant
        if usage is None or tenant is None:
            metrics.unaccounted.labels(self._model).inc()
            return
        metrics.prompt_tokens.labels(self._model, tenant.name).inc(usage.prompt_tokens)
        metrics.completion_tokens.labels(self._model, tenant.name).inc(usage.completion_tokens)
        assert self._service.tenancy is not None
        self._service.tenancy.charge(tenant, usage)

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
