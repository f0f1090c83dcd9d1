"""One ext_proc stream = one HTTP request: its state machine from headers to close.

The request runs one way through five modules: this stream reads Envoy's
messages, ``request_parsing`` makes the body a ``RoutingRequest``, the
``Router`` decides, the ``Contract`` encodes the decision into replies, and
``messages`` builds the rest. Tenancy is an observer (``RequestAccounting``)
called at fixed points; requests the gateway answers itself go to ``Answers``.

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
rate-limit headers) and body (usage, TTFT).

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

from gateway_plugins.errors import GatewayError, internal_error
from gateway_plugins.extproc import messages
from gateway_plugins.extproc.answers import method_not_allowed
from gateway_plugins.extproc.contracts import response_headers_reply, subset_hint
from gateway_plugins.extproc.messages import FULL_DUPLEX, HeaderChanges, ProcessingRequest
from gateway_plugins.extproc.service import ExtProcService
from gateway_plugins.metrics import ResponseTimer
from gateway_plugins.request_parsing import ROUTED_ENDPOINTS, parse_body
from gateway_plugins.routing.router import Decision
from gateway_plugins.routing.strategies import Strategy
from gateway_plugins.routing.types import Endpoint, RoutingRequest
from gateway_plugins.tenancy.accounting import RequestAccounting

if TYPE_CHECKING:
    from gateway_plugins.transport.server import GrpcStream

log = logging.getLogger("gateway_plugins.requests")


class ExtProcStream:
    __slots__ = (
        "_accounting",
        "_backlog",
        "_body",
        "_decision",
        "_endpoint",
        "_finished",
        "_full_duplex_request",
        "_full_duplex_response",
        "_grpc",
        "_headers",
        "_model",
        "_pending",
        "_request_id",
        "_service",
        "_started",
        "_status",
        "_strategy",
        "_subset",
        "_timer",
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
        self._accounting: RequestAccounting | None = None  # tenancy on
        self._timer: ResponseTimer | None = None  # set when the response is read (accounted)
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
        decision, self._decision = self._decision, None
        service = self._service
        if decision is not None:
            service.router.release(decision)
            if self._accounting is not None:
                self._accounting.finish(self._model)
        # Only routed requests name their model: a client's made-up model names must not become series.
        service.metrics.requests.labels(
            self._model if decision else "", decision.label if decision else "", self._status or "forwarded"
        ).inc()
        if service.log_requests:
            self._log(decision)

    def _await(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` (which awaits Redis or a tokenizer thread) and hold the stream's next messages until
        it is done."""
        self._pending = asyncio.get_running_loop().create_task(self._run_pending(step))

    async def _run_pending(self, step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except GatewayError as error:
            self._reject(error)
        except Exception:
            log.exception("ext_proc stream failed while checking limits or tokenizing")
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
        service = self._service
        headers = self._headers
        read = service.read_headers
        for header in request.request_headers.headers.headers:
            if header.key in read:
                headers[header.key] = header.raw_value.decode("utf-8", "replace")
        self._request_id = headers.get("x-request-id") or uuid.uuid4().hex
        path = headers.get(":path", "").partition("?")[0]
        method = headers.get(":method", "")
        endpoint = ROUTED_ENDPOINTS.get(path)
        if endpoint is None:
            self._finish_with(200, service.answers.answer(path, method))
            return
        if method != "POST":
            raise method_not_allowed(path, method, "POST")
        self._endpoint = endpoint
        tenancy = service.tenancy
        if tenancy is not None:
            tenant = tenancy.identify(headers.get("authorization"), headers.get("user"))
            self._accounting = RequestAccounting(tenancy, tenant)
        strategy_name = headers.get("routing-strategy")
        if strategy_name:
            self._strategy = service.router.strategy(strategy_name)
        if request.metadata_context.filter_metadata:
            self._subset = subset_hint(request.metadata_context.filter_metadata)
        if request.request_headers.end_of_stream:
            self._on_request_body(b"", True)
        elif not self._full_duplex_request:
            self._grpc.send(messages.request_headers_reply(self._header_changes(), self._response_mode()))

    def _response_mode(self) -> Any:
        """The mode override asking for the response (AIBrix contract), or None to leave it to Envoy."""
        if self._accounting is not None and self._accounting.accounted:
            return messages.OBSERVE_RESPONSE
        return messages.OBSERVE_RESPONSE_HEADERS if self._service.observe_response_status else None

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
        limit = self._service.max_body_bytes
        if len(raw) > limit:
            raise GatewayError(
                413,
                f"The request body ({len(raw)} bytes) exceeds the gateway's limit of {limit} bytes.",
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
        assert self._endpoint is not None
        accounting = self._accounting
        tenant = accounting.tenant if accounting is not None else None
        request = parse_body(
            self._endpoint,
            raw,
            user=tenant.name if tenant is not None else self._headers.get("user"),
            session_id=self._headers.get("x-session-id"),
        )
        self._model = request.model
        service = self._service
        admit = accounting is not None and accounting.needs_admission(request.model)
        # A long prompt of a model with a tokenizer is tokenized in a worker thread (the Rust tokenizer
        # lets go of the GIL): the event loop serves other streams meanwhile.
        tokenize = len(raw) > service.tokenize_in_thread_bytes and service.router.attach_tokenizer(
            request, self._subset
        )
        if admit or tokenize:
            service.router.candidates(request.model, self._subset)  # 404/503 before counting or tokenizing
            self._await(
                self._prepare_and_commit(accounting if admit else None, request, raw, body_ends_stream)
            )
        else:
            self._commit(request, raw, body_ends_stream)

    async def _prepare_and_commit(
        self,
        accounting: RequestAccounting | None,
        request: RoutingRequest,
        raw: bytes,
        body_ends_stream: bool,
    ) -> None:
        if accounting is not None:
            await accounting.admit(request.model)
        if request.tokenizer is not None:
            await asyncio.to_thread(request.tokenize)
        self._commit(request, raw, body_ends_stream)

    def _commit(self, request: RoutingRequest, raw: bytes, body_ends_stream: bool) -> None:
        service = self._service
        accounting = self._accounting
        body = accounting.prepare(request, raw) if accounting is not None else raw
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
        routed_at = time.perf_counter()
        service.metrics.decision_seconds.observe(routed_at - started)
        if accounting is not None and accounting.accounted:
            self._timer = ResponseTimer(service.metrics, request.model, routed_at, request.stream)
        contract = service.contract
        if self._full_duplex_request:
            changes = self._header_changes()
            if body is not raw:
                changes[1].append("content-length")
            self._grpc.send(contract.headers_reply(decision, changes))
            for reply in messages.streamed_body("request_body", body, body_ends_stream):
                self._grpc.send(reply)
            if not body_ends_stream:
                self._grpc.send(messages.CONTINUE_REQUEST_TRAILERS)
        else:
            self._grpc.send(contract.body_reply(decision, body if body is not raw else None))

    def _header_changes(self) -> HeaderChanges:
        """Headers to set (the engines' own credentials, an ``x-request-id`` if missing) and the client's
        routing headers and credentials to strip."""
        service = self._service
        add = service.engine_headers
        remove = [name for name in self._headers if name in service.stripped_headers and name not in add]
        if "x-request-id" not in self._headers:
            add = {**add, "x-request-id": self._request_id}
        return add, remove

    # -- response direction ------------------------------------------------------------

    def _on_response_headers(self, request: ProcessingRequest) -> None:
        for header in request.response_headers.headers.headers:
            if header.key == ":status":
                self._status = int(header.raw_value or 0) or None
                break
        rate_limits = self._accounting.response_headers() if self._accounting is not None else {}
        self._grpc.send(response_headers_reply(self._decision, self._request_id, rate_limits))

    def _on_response_body(self, chunk: bytes, end_of_stream: bool) -> None:
        if self._timer is not None:
            self._timer.chunk(time.perf_counter())
        accounting = self._accounting
        out = accounting.response_body(chunk, end_of_stream) if accounting is not None else chunk
        if end_of_stream and accounting is not None:
            accounting.finish(self._model)
        if self._full_duplex_response:
            if out or end_of_stream:
                for reply in messages.streamed_body("response_body", out, end_of_stream):
                    self._grpc.send(reply)
        elif out is chunk:
            self._grpc.send(messages.CONTINUE_RESPONSE_BODY)
        else:
            self._grpc.send(messages.reply("response_body", body=out))

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
