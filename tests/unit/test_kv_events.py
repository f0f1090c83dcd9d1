"""The KV-event decoder on both of vLLM's encodings, from msgpack built by hand (no vLLM needed)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from gateway_plugins.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_event,
    decode_message,
    decode_payload,
)

BIG_HASH = 2**64 - 5  # vLLM's hashes are uint64: above int64's range


def fixstr(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 32
    return bytes([0xA0 | len(data)]) + data


def uint64(value: int) -> bytes:
    return b"\xcf" + value.to_bytes(8, "big")


def float64(value: float) -> bytes:
    return b"\xcb" + struct.pack(">d", value)


def fixarray(*items: bytes) -> bytes:
    return bytes([0x90 | len(items)]) + b"".join(items)


def fixmap(**items: bytes) -> bytes:
    return bytes([0x80 | len(items)]) + b"".join(fixstr(k) + v for k, v in items.items())


NIL = b"\xc0"


def seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


def test_map_encoding_of_current_vllm() -> None:
    stored = fixmap(
        type=fixstr("BlockStored"),
        block_hashes=fixarray(uint64(BIG_HASH), b"\x07"),
        parent_block_hash=NIL,
        token_ids=fixarray(b"\x01", b"\x02", b"\xcd\x01\xf8"),  # 1, 2, 504 (uint16)
        block_size=b"\x02",
        lora_id=NIL,
        medium=fixstr("GPU"),
        lora_name=fixstr("sql"),
    )
    removed = fixmap(type=fixstr("BlockRemoved"), block_hashes=fixarray(b"\x07"), medium=fixstr("GPU"))
    cleared = fixmap(type=fixstr("AllBlocksCleared"))
    payload = fixarray(float64(1700000000.25), fixarray(stored, removed, cleared), b"\x00")

    batch = decode_message([b"vllm-a", seq(41), payload])

    assert batch.topic == "vllm-a"
    assert batch.seq == 41
    assert batch.ts == 1700000000.25
    assert batch.data_parallel_rank == 0
    assert batch.events == (
        BlockStored((BIG_HASH, 7), None, (1, 2, 504), 2, None, "GPU", "sql"),
        BlockRemoved((7,), "GPU"),
        AllBlocksCleared(),
    )


def test_array_encoding_of_older_vllm() -> None:
    # ["BlockStored", hashes, parent, token_ids, block_size, lora_id] (no medium yet), then the others.
    stored = fixarray(
        fixstr("BlockStored"), fixarray(b"\x0b", b"\x0c"), b"\x0a", fixarray(b"\x05", b"\x06"), b"\x10", NIL
    )
    removed = fixarray(fixstr("BlockRemoved"), fixarray(b"\x0b"))
    cleared = fixarray(fixstr("AllBlocksCleared"))
    payload = fixarray(float64(2.5), fixarray(stored, removed, cleared))  # no data_parallel_rank

    ts, events, rank = decode_payload(payload)

    assert (ts, rank) == (2.5, None)
    assert events == (
        BlockStored((11, 12), 10, (5, 6), 16, None, None, None),
        BlockRemoved((11,), None),
        AllBlocksCleared(),
    )


def test_both_encodings_agree_with_msgpack_itself() -> None:
    hand = fixarray(
        float64(3.0), fixarray(fixmap(type=fixstr("BlockRemoved"), block_hashes=fixarray(b"\x01")))
    )
    assert msgpack.unpackb(hand) == [3.0, [{"type": "BlockRemoved", "block_hashes": [1]}]]
    assert decode_payload(hand) == decode_payload(msgpack.packb([3.0, [["BlockRemoved", [1]]]]))


def test_byte_string_hashes_are_kept() -> None:
    event = decode_event({"type": "BlockRemoved", "block_hashes": [b"\x00" * 32]})
    assert event == BlockRemoved((b"\x00" * 32,), None)


def test_unknown_event_types_are_skipped() -> None:
    payload = msgpack.packb([1.0, [{"type": "BlockPinned", "x": 1}, ["Future", 1], ["AllBlocksCleared"]], 0])
    assert decode_payload(payload)[1] == (AllBlocksCleared(),)


@pytest.mark.parametrize(
    "frames",
    [
        [b"kv", seq(1)],  # two frames
        [b"kv", b"\x01", msgpack.packb([1.0, []])],  # short sequence frame
        [b"kv", seq(1), b"\xc1"],  # not msgpack (0xc1 is never used)
        [b"kv", seq(1), msgpack.packb({"a": 1})],  # not a batch
        [b"kv", seq(1), msgpack.packb(["now", []])],  # timestamp not a number
        [
            b"kv",
            seq(1),
            msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1]}]]),
        ],  # fields missing
        [b"kv", seq(1), msgpack.packb([1.0, [{"type": "BlockRemoved", "block_hashes": ["x"]}]])],
        [b"kv", seq(1), msgpack.packb([1.0, [42]])],  # an event neither map nor tagged array
    ],
)
def test_malformed_messages_raise(frames: list[bytes]) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_message(frames)


async def test_subscriber_counts_gaps_and_skips_malformed_messages() -> None:
    import zmq
    import zmq.asyncio

    from brickyard.stack import free_port
    from gateway_plugins.kv_events import KVEventSubscriber

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.asyncio.Context()
    subscriber = KVEventSubscriber(endpoint, context=context).start()
    pub = context.socket(zmq.PUB)
    pub.connect(endpoint)
    payload = msgpack.packb([1.0, [["AllBlocksCleared"]], 0])
    try:
        # PUB drops messages until the connection is up: send until the first arrives.
        while True:
            await pub.send_multipart([b"kv", seq(0), payload])
            if await subscriber._socket.poll(50):  # type: ignore[union-attr]
                break
        first = await subscriber.recv()
        await pub.send_multipart([b"kv", seq(1), b"\xc1"])
        await pub.send_multipart([b"kv", seq(5), payload])
        last = await subscriber.recv()
        while last.seq == 0:  # the handshake may have let more than one copy of seq 0 through
            last = await subscriber.recv()
    finally:
        pub.close(0)
        subscriber.close()
        context.term()
    assert first.events == (AllBlocksCleared(),)
    assert last.seq == 5
    assert subscriber.malformed == 1
    assert subscriber.missed == 4  # 1 (malformed), 2, 3, 4
