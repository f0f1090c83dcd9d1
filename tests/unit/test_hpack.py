"""Our HPACK decoder agrees with the hpack package's encoder, table state included."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_plugins.transport.hpack import HpackDecoder, HpackError

common = st.sampled_from([b":path", b":method", b"content-type", b"x-request-id", b"te", b"user-agent"])
names = common | st.binary(min_size=1, max_size=20).map(lambda b: b.lower())
values = st.binary(max_size=200)
blocks = st.lists(st.lists(st.tuples(names, values, st.booleans()), max_size=12), min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(blocks=blocks, table_size=st.sampled_from([0, 64, 256, 4096]), huffman=st.booleans())
def test_decodes_what_the_reference_encoder_writes(blocks: list, table_size: int, huffman: bool) -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = table_size  # emits a size update in the first block
    decoder = HpackDecoder()
    for block in blocks:
        headers = [hpack.NeverIndexedHeaderTuple(n, v) if sensitive else (n, v) for n, v, sensitive in block]
        encoded = encoder.encode(headers, huffman=huffman)
        assert decoder.decode(encoded) == [(n, v) for n, v, _ in block]


def test_envoy_ext_proc_block_is_decoded_and_repeats_cheaply() -> None:
    # What Envoy 1.40 sends to open an ext_proc stream, captured on loopback (second and later streams).
    first = bytes.fromhex(
        "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508418d8ec313afa1d924530d25f0"
        "3f5f8640027465864d833505b11f5f8b1d75d0620d263d4c4d6564408cf2b16aee7f4b1aa496ca8747834d9697408bf2b4a7b3c0ec"
        "90b22d29ec870be25c0b89717f"
    )
    later = bytes.fromhex(
        "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508c286c1c0bfbe"
    )
    decoder = HpackDecoder()
    expected = [
        (b":method", b"POST"),
        (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
        (b":authority", b"brickyard_gateway"),
        (b":scheme", b"http"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (b"x-envoy-internal", b"true"),
        (b"x-forwarded-for", b"192.0.2.2"),
    ]
    assert decoder.decode(first) == expected
    assert decoder.decode(later) == expected


@pytest.mark.parametrize(
    "block",
    [
        b"\xff",  # truncated integer
        b"\xbf\x00",  # dynamic index that does not exist
        b"\x80",  # index 0
        b"\x40\x05ab",  # truncated name
        b"\x3f\xe2\x1f",  # table size update to 4097, above the advertised 4096
        b"\x00\x81\xff\x01a",  # invalid Huffman (EOS padding)
    ],
)
def test_malformed_blocks_raise(block: bytes) -> None:
    with pytest.raises(HpackError):
        HpackDecoder().decode(block)
