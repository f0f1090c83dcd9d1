"""One request's side of tenancy, at the points the ext_proc stream calls it.

1. ``admit`` once the body names the model: the limits that apply, checked and counted in one Redis
   round trip (the only step of a request that awaits).
2. ``prepare`` before routing: the body to forward, with ``stream_options.include_usage`` added when an
   accounted stream would not report its usage otherwise.
3. ``response_body`` for each chunk of an accounted response: usage read, the added usage chunk removed.
4. ``finish`` once the routed request has ended, however: the usage charged to the tenant and counted.
"""

from __future__ import annotations

import orjson

from gateway_plugins.errors import bad_request
from gateway_plugins.routing.types import Endpoint, RoutingRequest
from gateway_plugins.tenancy.gate import Tenancy, Tenant
from gateway_plugins.tenancy.limits import Verdict
from gateway_plugins.tenancy.usage import JsonUsage, SseUsage


class RequestAccounting:
    """The tenancy of one request: ``tenant`` None means unidentified (no limits but per-model ones)."""

    __slots__ = ("_parser", "_tenancy", "tenant", "verdict")

    def __init__(self, tenancy: Tenancy, tenant: Tenant | None) -> None:
        self._tenancy = tenancy
        self.tenant = tenant
        #: How the limits answered (its rate-limit headers go on the response); None: none checked.
        self.verdict: Verdict | None = None
        self._parser: SseUsage | JsonUsage | None = None

    @property
    def accounted(self) -> bool:
        """Whether the response is read for its usage (the gateway asks Envoy for it)."""
        return self._tenancy.accounts(self.tenant)

    def needs_admission(self, model: str) -> bool:
        return bool(self._tenancy.limits(self.tenant, model))

    async def admit(self, model: str) -> None:
        """Check and count the request against its limits; ``GatewayError`` 429 (or 503) when refused."""
        self.verdict = await self._tenancy.admit(self._tenancy.limits(self.tenant, model))

    def prepare(self, request: RoutingRequest, raw: bytes) -> bytes:
        """The body to forward, ready to read the response's usage; 400 for one that cannot be rewritten."""
        if not self.accounted:
            return raw
        if not request.stream or request.endpoint is Endpoint.RESPONSES:  # Responses streams report usage
            self._parser = JsonUsage() if not request.stream else SseUsage()
            return raw
        if request.include_usage:
            self._parser = SseUsage()
            return raw
        body = dict(request.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            rewritten = orjson.dumps(body)
        except orjson.JSONEncodeError:  # orjson writes 255 levels; it reads 1,024
            raise bad_request(
                "The request body is nested too deeply (more than 255 levels).",
                cause="invalid-body",
                code="invalid_value",
            ) from None
        self._parser = SseUsage(strip_usage_chunk=True)
        return rewritten

    def response_headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers, when limits were checked."""
        return self.verdict.headers() if self.verdict is not None else {}

    def response_body(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """Read a chunk of the response for its usage; returns what the client gets instead."""
        parser = self._parser
        if parser is None:
            return chunk
        if isinstance(parser, JsonUsage):
            parser.feed(chunk)
            return chunk
        out = parser.feed(chunk)
        if end_of_stream:
            tail = parser.finish()
            out = out + tail if tail else out
        return out

    def finish(self, model: str) -> None:
        """The routed request ended (response complete or abandoned): charge and count its usage, once."""
        parser, self._parser = self._parser, None
        if parser is None:
            return
        usage = parser.finish() if isinstance(parser, JsonUsage) else parser.usage
        self._tenancy.record(self.tenant, model, usage)
