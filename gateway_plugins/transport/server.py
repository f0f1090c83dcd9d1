"""A gRPC server over HTTP/2 that runs inside the asyncio event loop.

Envoy opens one gRPC stream per HTTP request it hands to ext_proc, so the cost
that matters is the cost of a short stream. ``grpc.aio`` pays for every
message with a hand-off between its poller thread and the event loop; on this
project's 2-core benchmark machine that alone was ~250 us per request. This
transport parses frames in ``data_received``, calls the stream handler
synchronously and writes every reply produced by one read in a single
``transport.write``: ~50 us per request (see docs/benchmarks.md).

Scope: the server side of gRPC over cleartext HTTP/2 (h2c, prior knowledge),
uncompressed messages, full flow control in both directions. Stream handlers
are plain callbacks; a handler that needs I/O starts a task and calls
``GrpcStream.send`` when it is done.

Errors follow RFC 9113: a stream error resets only its stream, a connection
error sends GOAWAY and closes. Frames of closed streams are dropped after the
minimal processing of section 5.1 (HPACK decoding, connection window), which
needs no memory of closed streams. tests/unit/test_transport_h2.py checks these
edge cases with h2 as the peer.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Protocol
from urllib.parse import quote

from gateway_plugins.transport.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    GRPC_RESPONSE_HEADERS,
    MAX_WINDOW,
    PREFACE,
    ErrorCode,
    Flag,
    FrameType,
    ProtocolError,
    Setting,
    frame,
    goaway,
    hpack_literal,
    rst_stream,
    settings_frame,
    window_update,
)
from gateway_plugins.transport.hpack import HpackDecoder, HpackError

log = logging.getLogger(__name__)

#: DATA frame header and gRPC length prefix of a one-message frame, packed at once.
_DATA_WITH_MESSAGE = struct.Struct(">IBIBI")
#: What we let the peer send before it must wait for a WINDOW_UPDATE.
STREAM_RECEIVE_WINDOW = 16 * 1024 * 1024
CONNECTION_RECEIVE_WINDOW = 1 << 30
#: Largest frame we accept; Envoy then sends big bodies in few frames.
RECEIVE_MAX_FRAME = 1 << 20


class GrpcStatus(IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


_OK_TRAILERS = hpack_literal(b"grpc-status", b"0")
#: Trailers go out as one HEADERS frame, which must fit the smallest SETTINGS_MAX_FRAME_SIZE
#: (16 KiB, RFC 9113 section 4.2) even if every character is percent-encoded UTF-8 (12 bytes).
_MAX_STATUS_MESSAGE = 1024


def _trailers(status: GrpcStatus, message: str) -> bytes:
    if status == GrpcStatus.OK and not message:
        return _OK_TRAILERS
    block = hpack_literal(b"grpc-status", str(int(status)).encode())
    if message:
        block += hpack_literal(b"grpc-message", quote(message[:_MAX_STATUS_MESSAGE], safe=" ").encode())
    return block


class StreamHandler(Protocol):
    """What the transport calls for one stream. Exceptions end the stream with INTERNAL."""

    def on_message(self, message: bytes) -> None:
        """One complete request message."""

    def on_end(self) -> None:
        """The client sent its last message; the handler should ``finish`` the stream."""

    def on_close(self) -> None:
        """The stream is gone (finished, reset or connection lost). Called exactly once."""


HandlerFactory = Callable[["GrpcStream"], StreamHandler]


class GrpcStream:
    """One server-side gRPC stream: send messages, then finish with a status."""

    __slots__ = (
        "_closed",
        "_conn",
        "_headers_sent",
        "_local_closed",
        "_pending",
        "_pending_trailers",
        "_recv",
        "_recv_unacked",
        "_remote_closed",
        "_send_window",
        "handler",
        "id",
    )

    def __init__(self, conn: GrpcConnection, stream_id: int, send_window: int) -> None:
        self._conn = conn
        self.id = stream_id
        self.handler: StreamHandler | None = None
        self._recv = b""
        self._recv_unacked = 0
        self._send_window = send_window
        self._pending: list[bytes] = []
        self._pending_trailers: bytes | None = None
        self._headers_sent = False
        self._local_closed = False
        self._remote_closed = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._local_closed or self._closed

    def send(self, message: bytes) -> None:
        """Queue one response message (already serialized)."""
        if self._local_closed:
            return
        conn = self._conn
        n = len(message)
        if not self._pending and n + 5 <= min(self._send_window, conn._send_window, conn._peer_max_frame):
            # The common case: one small message, one DATA frame, windows permitting.
            if not self._headers_sent:
                self._headers_sent = True
                conn._write(conn._response_headers(self.id))
            self._send_window -= n + 5
            conn._send_window -= n + 5
            conn._write(_DATA_WITH_MESSAGE.pack(((n + 5) << 8) | FrameType.DATA, 0, self.id, 0, n) + message)
            return
        if not self._headers_sent:
            self._headers_sent = True
            conn._write(conn._response_headers(self.id))
        self._pending.append(b"\x00" + n.to_bytes(4, "big") + message)
        conn._flush_stream(self)

    def finish(self, status: GrpcStatus = GrpcStatus.OK, message: str = "") -> None:
        """End the stream with a gRPC status (trailers); idempotent."""
        if self._local_closed or self._closed:
            return
        self._local_closed = True
        block = _trailers(status, message)
        if not self._headers_sent:  # trailers-only response
            self._headers_sent = True
            block = GRPC_RESPONSE_HEADERS + block
        trailers = frame(FrameType.HEADERS, Flag.END_STREAM | Flag.END_HEADERS, self.id, block)
        if self._pending:
            self._pending_trailers = trailers
        else:
            self._conn._write_trailers(self, trailers)

    # -- receive side, driven by GrpcConnection ---------------------------------

    def _receive(self, data: bytes, frame_length: int, end_stream: bool) -> None:
        conn = self._conn
        self._recv_unacked += frame_length
        if self._recv_unacked > STREAM_RECEIVE_WINDOW:  # RFC 9113 section 6.9.1
            conn._reset(self, ErrorCode.FLOW_CONTROL_ERROR)
            return
        if self._local_closed:  # we have answered; drop what the client still sends
            if end_stream:
                self._remote_closed = True
                if self._pending_trailers is None:
                    conn._remove(self)
            return
        if not end_stream and self._recv_unacked >= STREAM_RECEIVE_WINDOW // 2:
            conn._write(window_update(self.id, self._recv_unacked))
            self._recv_unacked = 0
        buf = self._recv + data if self._recv else data
        pos, size = 0, len(buf)
        while size - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if length > conn._server.max_message_bytes:
                self._fail(GrpcStatus.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds the limit")
                return
            if size - pos - 5 < length:
                break
            if buf[pos]:
                self._fail(GrpcStatus.UNIMPLEMENTED, "compressed messages are not supported")
                return
            message = buf[pos + 5 : pos + 5 + length]
            pos += 5 + length
            self._dispatch(self.handler.on_message, message)  # type: ignore[union-attr]
            if self._local_closed:
                self._receive(b"", 0, end_stream)
                return
        self._recv = buf[pos:] if pos < size else b""
        if end_stream:
            self._remote_closed = True
            if self._recv:
                self._fail(GrpcStatus.INTERNAL, "stream ended inside a message")
            else:
                self._dispatch(self.handler.on_end)  # type: ignore[union-attr]

    def _dispatch(self, callback: Callable[..., None], *args: bytes) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("stream handler failed on stream %d", self.id)
            self.finish(GrpcStatus.INTERNAL, "internal error")

    def _fail(self, status: GrpcStatus, message: str) -> None:
        log.warning("stream %d: %s", self.id, message)
        self.finish(status, message)


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection from a gRPC client (Envoy keeps one or a few open)."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._preface_seen = False
        self._decoder = HpackDecoder()
        self._streams: dict[int, GrpcStream] = {}
        self._last_stream_id = 0
        self._continuation: tuple[int, int, bytearray] | None = None
        self._out: list[bytes] = []
        self._in_receive = False
        self._flush_scheduled = False
        self._blocked: dict[int, GrpcStream] = {}  # streams waiting for send window
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._recv_unacked = 0
        self._goaway_sent = False
        self._peer_goaway = False

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._server._connections.add(self)
        transport.write(
            settings_frame(
                {
                    Setting.MAX_CONCURRENT_STREAMS: self._server.max_concurrent_streams,
                    Setting.INITIAL_WINDOW_SIZE: STREAM_RECEIVE_WINDOW,
                    Setting.MAX_FRAME_SIZE: RECEIVE_MAX_FRAME,
                    Setting.ENABLE_PUSH: 0,
                }
            )
            + window_update(0, CONNECTION_RECEIVE_WINDOW - DEFAULT_WINDOW)
        )
        if self._server.draining:
            self.start_drain()

    def data_received(self, data: bytes) -> None:
        self._in_receive = True
        try:
            self._receive(data)
        except ProtocolError as exc:
            log.warning("HTTP/2 protocol error from peer: %s", exc)
            self._fail(exc.code, str(exc))
        except Exception:  # a bug here must cost one connection, not the process
            log.exception("HTTP/2 connection failed")
            self._fail(ErrorCode.INTERNAL_ERROR, "internal error")
        finally:
            self._in_receive = False
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._close_stream(stream)
        self._server._stream_closed()

    def _fail(self, code: ErrorCode, reason: str) -> None:
        self._write(goaway(self._last_stream_id, code, reason.encode()))
        self._flush()
        if self._transport is not None:
            self._transport.close()

    # -- draining -------------------------------------------------------------------

    def start_drain(self) -> None:
        """Refuse new streams (GOAWAY) and close once the open ones have finished."""
        if self._goaway_sent:
            return
        self._goaway_sent = True
        self._write(goaway(self._last_stream_id, ErrorCode.NO_ERROR))
        self._maybe_close_idle()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- frame parsing --------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        if not self._preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ProtocolError("bad connection preface")
                return
            if buf[: len(PREFACE)] != PREFACE:
                raise ProtocolError("bad connection preface")
            self._preface_seen = True
            pos = len(PREFACE)
        size = len(buf)
        try:
            while size - pos >= FRAME_HEADER_SIZE:
                length_type, flags, stream_id = FRAME_HEADER.unpack_from(buf, pos)
                length = length_type >> 8
                if length > RECEIVE_MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes", ErrorCode.FRAME_SIZE_ERROR)
                end = pos + FRAME_HEADER_SIZE + length
                if end > size:
                    break
                payload = bytes(buf[pos + FRAME_HEADER_SIZE : end])
                pos = end
                self._on_frame(length_type & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
        finally:
            del buf[:pos]

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != FrameType.CONTINUATION:
            raise ProtocolError("expected CONTINUATION")
        if kind == FrameType.DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == FrameType.HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == FrameType.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == FrameType.RST_STREAM:
            if len(payload) != 4:
                raise ProtocolError("RST_STREAM length", ErrorCode.FRAME_SIZE_ERROR)
            stream = self._stream(stream_id, "RST_STREAM")
            if stream is not None:
                self._remove(stream)
        elif kind == FrameType.SETTINGS:
            if stream_id:
                raise ProtocolError("SETTINGS on a stream")
            if not flags & Flag.ACK:
                self._on_settings(payload)
            elif payload:
                raise ProtocolError("SETTINGS ACK with a payload", ErrorCode.FRAME_SIZE_ERROR)
        elif kind == FrameType.PING:
            if stream_id:
                raise ProtocolError("PING on a stream")
            if len(payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR)
            if not flags & Flag.ACK:
                self._write(frame(FrameType.PING, Flag.ACK, 0, payload))
        elif kind == FrameType.GOAWAY:
            if stream_id:
                raise ProtocolError("GOAWAY on a stream")
            self._peer_goaway = True
            self._maybe_close_idle()
        elif kind == FrameType.CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == FrameType.PUSH_PROMISE:
            raise ProtocolError("clients must not push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)  # padding included: it counts against flow control
        if length > CONNECTION_RECEIVE_WINDOW - self._recv_unacked:  # RFC 9113 section 6.9.1
            raise ProtocolError("DATA beyond the connection window", ErrorCode.FLOW_CONTROL_ERROR)
        self._recv_unacked += length
        if self._recv_unacked >= CONNECTION_RECEIVE_WINDOW // 2:
            self._write(window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        stream = self._stream(stream_id, "DATA")
        if stream is None:
            return  # a closed stream: counted against the connection window above, then dropped
        if stream._remote_closed:  # section 5.1, half-closed (remote)
            self._reset(stream, ErrorCode.STREAM_CLOSED)
            return
        if flags & Flag.PADDED:
            payload = _strip_padding(payload)
        stream._receive(payload, length, bool(flags & Flag.END_STREAM))

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ProtocolError("HEADERS on an invalid stream id")
        if flags & Flag.PADDED:
            payload = _strip_padding(payload)
        if flags & Flag.PRIORITY:
            payload = payload[5:]
        if flags & Flag.END_HEADERS:
            self._on_header_block(stream_id, flags, payload)
        else:
            self._continuation = (stream_id, flags, bytearray(payload))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ProtocolError("unexpected CONTINUATION")
        first_flags, block = self._continuation[1], self._continuation[2]
        block += payload
        if flags & Flag.END_HEADERS:
            self._continuation = None
            self._on_header_block(stream_id, first_flags, bytes(block))

    def _on_header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            headers = self._decoder.decode(block)
        except HpackError as exc:
            raise ProtocolError(f"HPACK: {exc}", ErrorCode.COMPRESSION_ERROR) from exc
        end_stream = bool(flags & Flag.END_STREAM)
        stream = self._streams.get(stream_id)
        if stream is not None:  # request trailers: only legal as the end of the stream
            if stream._remote_closed:  # section 5.1, half-closed (remote)
                self._reset(stream, ErrorCode.STREAM_CLOSED)
            elif not end_stream:
                raise ProtocolError("trailers without END_STREAM")
            else:
                stream._receive(b"", 0, True)
            return
        if stream_id <= self._last_stream_id:
            return  # trailers of a stream we already closed
        self._last_stream_id = stream_id
        if self._goaway_sent:
            self._write(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        path = next((value for name, value in headers if name == b":path"), b"")
        stream = GrpcStream(self, stream_id, self._peer_initial_window)
        self._streams[stream_id] = stream
        factory = self._server.handlers.get(path.decode("ascii", "replace"))
        if factory is None:
            stream.finish(GrpcStatus.UNIMPLEMENTED, f"unknown method {path.decode('ascii', 'replace')}")
        else:
            stream.handler = factory(stream)
        if end_stream:
            stream._receive(b"", 0, True)

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS length", ErrorCode.FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window too large", ErrorCode.FLOW_CONTROL_ERROR)
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream._send_window += delta
                    if stream._send_window > MAX_WINDOW:  # section 6.9.2
                        raise ProtocolError("stream window overflow", ErrorCode.FLOW_CONTROL_ERROR)
            elif key == Setting.ENABLE_PUSH and value > 1:
                raise ProtocolError("invalid ENABLE_PUSH")
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise ProtocolError("invalid MAX_FRAME_SIZE")
                self._peer_max_frame = value
        self._write(frame(FrameType.SETTINGS, Flag.ACK, 0))
        self._resume_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE length", ErrorCode.FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolError("zero window increment")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
            self._resume_blocked()
            return
        stream = self._stream(stream_id, "WINDOW_UPDATE")
        if stream is None:
            return  # a late update for a closed stream is no error (section 6.9)
        if increment == 0:  # section 6.9
            self._reset(stream, ErrorCode.PROTOCOL_ERROR)
            return
        stream._send_window += increment
        if stream._send_window > MAX_WINDOW:  # section 6.9.1
            self._reset(stream, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._flush_stream(stream)

    def _stream(self, stream_id: int, kind: str) -> GrpcStream | None:
        """The open stream a frame is for, or None if it is closed: RFC 9113 section 5.1 lets us
        drop frames of closed streams, but a frame on stream 0 or on an idle stream (one the client
        has not opened) is a connection error."""
        stream = self._streams.get(stream_id)
        if stream is None and (stream_id % 2 == 0 or stream_id > self._last_stream_id):
            raise ProtocolError(f"{kind} on stream {stream_id}, which the client has not opened")
        return stream

    # -- sending ----------------------------------------------------------------------

    def _response_headers(self, stream_id: int) -> bytes:
        return frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, GRPC_RESPONSE_HEADERS)

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._in_receive and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _flush_stream(self, stream: GrpcStream) -> None:
        """Send as much queued data as the windows allow, then trailers if queued."""
        pending = stream._pending
        while pending:
            chunk = pending[0]
            allowed = min(stream._send_window, self._send_window, self._peer_max_frame)
            if allowed <= 0:
                self._blocked[stream.id] = stream
                return
            part, rest = chunk[:allowed], chunk[allowed:]
            self._write(frame(FrameType.DATA, 0, stream.id, part))
            stream._send_window -= len(part)
            self._send_window -= len(part)
            if rest:
                pending[0] = rest
            else:
                pending.pop(0)
        self._blocked.pop(stream.id, None)
        if stream._pending_trailers is not None:
            trailers, stream._pending_trailers = stream._pending_trailers, None
            self._write_trailers(stream, trailers)

    def _resume_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            self._flush_stream(stream)
            if self._send_window <= 0:
                return

    def _write_trailers(self, stream: GrpcStream, trailers: bytes) -> None:
        """The stream is done once the client has also finished sending (or resets it)."""
        self._write(trailers)
        if stream._remote_closed:
            self._remove(stream)

    def _reset(self, stream: GrpcStream, code: ErrorCode) -> None:
        """A stream error (RFC 9113 section 5.4.2): one bad stream must not end the others."""
        self._write(rst_stream(stream.id, code))
        self._remove(stream)

    def _remove(self, stream: GrpcStream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            self._close_stream(stream)

    def _close_stream(self, stream: GrpcStream) -> None:
        if stream._closed:
            return
        stream._closed = True
        stream._local_closed = True
        self._blocked.pop(stream.id, None)
        if stream.handler is not None:
            try:
                stream.handler.on_close()
            except Exception:
                log.exception("stream handler failed in on_close")
        self._server._stream_closed()
        self._maybe_close_idle()

    def _maybe_close_idle(self) -> None:
        if (self._goaway_sent or self._peer_goaway) and not self._streams and self._transport is not None:
            self._flush()
            self._transport.close()


def _strip_padding(payload: bytes) -> bytes:
    if not payload:
        raise ProtocolError("padded frame without pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError("padding exceeds frame")
    return payload[1 : len(payload) - pad]


class GrpcServer:
    """Listens for gRPC clients and routes each stream to a handler by method path."""

    def __init__(
        self,
        handlers: Mapping[str, HandlerFactory],
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_concurrent_streams: int = 100_000,
    ) -> None:
        self.handlers = dict(handlers)
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.draining = False
        self._connections: set[GrpcConnection] = set()
        self._server: asyncio.Server | None = None
        self._idle = asyncio.Event()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: GrpcConnection(self), host, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    @property
    def open_streams(self) -> int:
        return sum(conn.open_streams for conn in self._connections)

    async def drain(self, grace_seconds: float) -> None:
        """Stop listening, refuse new streams, wait up to ``grace_seconds`` for open ones."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.start_drain()
        self._idle.clear()
        self._stream_closed()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning("drain timed out with %d open streams", self.open_streams)
        for conn in list(self._connections):
            conn.abort()

    def _stream_closed(self) -> None:
        if self.draining and self.open_streams == 0:
            self._idle.set()
