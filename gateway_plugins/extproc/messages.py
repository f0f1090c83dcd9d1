"""Serialized ext_proc ``ProcessingResponse`` messages, built once where possible.

Every function returns bytes ready for ``GrpcStream.send``. Replies that never
change (a plain CONTINUE) are module constants; the rest are small builders.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from brickyard_core.api.envoy.config.core.v3 import base_pb2 as core
from brickyard_core.api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as modes
from brickyard_core.api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from gateway_plugins.errors import GatewayError

#: Largest body chunk sent back in FULL_DUPLEX_STREAMED mode (what peers use; under 64 KiB).
STREAMED_CHUNK_BYTES = 62_000
FULL_DUPLEX = modes.ProcessingMode.FULL_DUPLEX_STREAMED
_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

ProcessingRequest = pb.ProcessingRequest
#: Request headers to set, and header names to remove.
HeaderChanges = tuple[dict[str, str], list[str]]


def header_mutation(
    set_headers: Mapping[str, str] | None = None, remove: Sequence[str] = ()
) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            core.HeaderValueOption(
                header=core.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in (set_headers or {}).items()
        ],
        remove_headers=remove,
    )


def _struct(metadata: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if not metadata:
        return None
    value = struct_pb2.Struct()
    value.update(metadata)
    return value


def reply(
    kind: str,
    mutation: pb.HeaderMutation | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    body: bytes | None = None,
    mode: modes.ProcessingMode | None = None,
) -> bytes:
    """A CONTINUE reply to a ``kind`` message (``request_headers``, ``request_body``, ``response_headers``,
    ``response_body``) with an optional header mutation, dynamic metadata, replacement body and (in
    answer to headers) processing-mode override."""
    wrapper = pb.HeadersResponse if kind.endswith("headers") else pb.BodyResponse
    common = pb.CommonResponse(header_mutation=mutation)
    if body is not None:
        common.body_mutation.CopyFrom(
            pb.BodyMutation(body=body) if body else pb.BodyMutation(clear_body=True)
        )
    return pb.ProcessingResponse(
        **{kind: wrapper(response=common)}, dynamic_metadata=_struct(metadata), mode_override=mode
    ).SerializeToString()


def request_headers_reply(changes: HeaderChanges, mode: modes.ProcessingMode | None = None) -> bytes:
    """The reply to request headers that carry no decision: header changes and an optional mode override."""
    add, remove = changes
    if not add and not remove and mode is None:
        return CONTINUE_REQUEST_HEADERS
    return reply("request_headers", header_mutation(add, remove), mode=mode)


def streamed_body(direction: str, body: bytes, end_of_stream: bool) -> Iterator[bytes]:
    """FULL_DUPLEX_STREAMED: hand a body back as ``streamed_response`` chunks.

    ``direction`` is ``request_body`` or ``response_body``. An empty body still
    yields one (empty) chunk so that ``end_of_stream`` reaches Envoy.
    """
    last = max(len(body) - 1, 0) // STREAMED_CHUNK_BYTES * STREAMED_CHUNK_BYTES
    for start in range(0, last + 1, STREAMED_CHUNK_BYTES):
        chunk = pb.StreamedBodyResponse(
            body=body[start : start + STREAMED_CHUNK_BYTES], end_of_stream=end_of_stream and start == last
        )
        reply = pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=chunk))
        )
        yield pb.ProcessingResponse(**{direction: reply}).SerializeToString()


def immediate_response(status: int, body: bytes, headers: Mapping[str, str], details: str = "") -> bytes:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status={"code": status}, headers=header_mutation(headers), body=body, details=details
        )
    ).SerializeToString()


def error_reply(error: GatewayError) -> bytes:
    return immediate_response(
        error.status, error.body(), error.response_headers(), f"brickyard_{error.cause}"
    )


#: Mode overrides sent with the request-headers reply (the configured request modes stay): the response
#: headers only (status, rate-limit headers), or the headers and the body streamed (usage accounting).
_SEND, _SKIP = modes.ProcessingMode.SEND, modes.ProcessingMode.SKIP
OBSERVE_RESPONSE_HEADERS = modes.ProcessingMode(
    request_header_mode=_SEND,
    response_header_mode=_SEND,
    request_trailer_mode=_SKIP,
    response_trailer_mode=_SKIP,
    request_body_mode=modes.ProcessingMode.BUFFERED,
    response_body_mode=modes.ProcessingMode.NONE,
)
OBSERVE_RESPONSE = modes.ProcessingMode(
    request_header_mode=_SEND,
    response_header_mode=_SEND,
    request_trailer_mode=_SKIP,
    response_trailer_mode=_SKIP,
    request_body_mode=modes.ProcessingMode.BUFFERED,
    response_body_mode=modes.ProcessingMode.STREAMED,
)

#: Replies that do not depend on the request.
CONTINUE_REQUEST_HEADERS = reply("request_headers")
CONTINUE_REQUEST_BODY = reply("request_body")
CONTINUE_RESPONSE_BODY = reply("response_body")
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse()).SerializeToString()
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(
    response_trailers=pb.TrailersResponse()
).SerializeToString()
