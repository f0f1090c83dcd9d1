"""The HTTP/2 gRPC transport against grpcio's own client (interop) and raw frames (edge cases)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import ClassVar

import grpc
import pytest

from gateway_plugins.transport.frames import PREFACE, ErrorCode, Flag, FrameType, frame, settings_frame
from gateway_plugins.transport.server import GrpcServer, GrpcStream

ECHO = "/test.Echo/Chat"
BOOM = "/test.Echo/Boom"


class Echo:
    """Sends every message back; records how streams end."""

    closed: ClassVar[list[int]] = []

    def __init__(self, stream: GrpcStream) -> None:
        self.stream = stream

    def on_message(self, message: bytes) -> None:
        self.stream.send(message)

    def on_end(self) -> None:
        self.stream.finish()

    def on_close(self) -> None:
        Echo.closed.append(self.stream.id)


class Boom(Echo):
    def on_message(self, message: bytes) -> None:
        raise RuntimeError("handler bug")


@pytest.fixture
async def server() -> AsyncIterator[tuple[GrpcServer, int]]:
    Echo.closed = []
    srv = GrpcServer({ECHO: Echo, BOOM: Boom}, max_message_bytes=32 << 20)
    port = await srv.start("127.0.0.1", 0)
    yield srv, port
    await srv.drain(0.1)


def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )


def _call(channel: grpc.aio.Channel, method: str = ECHO) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(method, request_serializer=None, response_deserializer=None)


async def test_grpcio_client_round_trips_messages(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    async with _channel(port) as channel:
        call = _call(channel)(iter([b"one", b"", b"three"]))
        assert [m async for m in call] == [b"one", b"", b"three"]
        assert await call.code() == grpc.StatusCode.OK


async def test_large_messages_use_flow_control_both_ways(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    big = bytes(range(256)) * (20 * 1024 * 4)  # 20 MiB: beyond every default window
    async with _channel(port) as channel:
        replies = [m async for m in _call(channel)(iter([big, b"tail"]))]
    assert replies == [big, b"tail"]


async def test_many_concurrent_streams(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    async with _channel(port) as channel:
        echo = _call(channel)

        async def one(i: int) -> list[bytes]:
            return [m async for m in echo(iter([str(i).encode()] * 3))]

        results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [[str(i).encode()] * 3 for i in range(200)]
    await asyncio.sleep(0.05)
    assert len(Echo.closed) == 200


async def test_unknown_method_is_unimplemented(server: tuple[GrpcServer, int]) -> None:
    srv, port = server
    async with _channel(port) as channel:
        # unary_stream sends the message and the half-close with the headers: no race with our early answer
        call = channel.unary_stream("/test.Echo/Nope", request_serializer=None, response_deserializer=None)(
            b"x"
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in call]
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/test.Echo/Nope" in (info.value.details() or "")
    assert srv.open_streams == 0


async def test_handler_exception_ends_only_that_stream(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    async with _channel(port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in _call(channel, BOOM)(iter([b"x"]))]
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert [m async for m in _call(channel)(iter([b"still fine"]))] == [b"still fine"]


async def test_oversized_message_is_resource_exhausted(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    async with _channel(port) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in _call(channel)(iter([b"x" * (33 << 20)]))]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_client_cancel_closes_stream(server: tuple[GrpcServer, int]) -> None:
    srv, port = server
    async with _channel(port) as channel:
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def requests() -> AsyncIterator[bytes]:
            while True:
                yield await queue.get()

        call = _call(channel)(requests())
        await queue.put(b"hello")
        assert await call.read() == b"hello"
        assert srv.open_streams == 1
        call.cancel()
        for _ in range(100):
            if Echo.closed:
                break
            await asyncio.sleep(0.01)
    assert len(Echo.closed) == 1
    assert srv.open_streams == 0


# -- raw frames ------------------------------------------------------------------------------


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PREFACE + settings_frame({}))
    await writer.drain()
    return reader, writer


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    header = await asyncio.wait_for(reader.readexactly(9), 5)
    length_type, flags, stream_id = struct.unpack(">IBI", header)
    payload = await reader.readexactly(length_type >> 8)
    return length_type & 0xFF, flags, stream_id, payload


async def test_ping_is_acknowledged(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    reader, writer = await _raw(port)
    writer.write(frame(FrameType.PING, 0, 0, b"12345678"))
    while True:
        kind, flags, _, payload = await _read_frame(reader)
        if kind == FrameType.PING:
            assert (flags, payload) == (Flag.ACK, b"12345678")
            break
    writer.close()


async def test_bad_preface_gets_goaway_and_close(server: tuple[GrpcServer, int]) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    frames = []
    while True:
        try:
            frames.append(await _read_frame(reader))
        except asyncio.IncompleteReadError:
            break
    goaways = [f for f in frames if f[0] == FrameType.GOAWAY]
    assert goaways
    assert struct.unpack(">II", goaways[0][3][:8])[1] == ErrorCode.PROTOCOL_ERROR
    writer.close()


async def test_drain_refuses_new_streams_and_waits_for_open_ones(server: tuple[GrpcServer, int]) -> None:
    srv, port = server
    async with _channel(port) as channel:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[bytes]:
            while (item := await queue.get()) is not None:
                yield item

        call = _call(channel)(requests())
        await queue.put(b"a")
        assert await call.read() == b"a"
        drain = asyncio.create_task(srv.drain(5))
        await asyncio.sleep(0.1)
        assert not drain.done()  # the open stream holds the drain
        await queue.put(b"b")
        assert await call.read() == b"b"
        await queue.put(None)
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(drain, 2)
