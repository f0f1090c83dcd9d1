"""HPACK header decoding (RFC 7541) for the gRPC transport.

Envoy opens every ext_proc stream with the same header block, but sends
``:path`` as a Huffman-coded literal that is never indexed, so a general
decoder redoes the same Huffman decode on every request. This decoder keeps
the dynamic table like any other and memoizes Huffman strings, which makes a
repeated block a handful of table lookups. The static table and the Huffman
code come from the ``hpack`` package.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
STATIC_TABLE: tuple[Header, ...] = HeaderTable.STATIC_TABLE
_STATIC_SIZE = len(STATIC_TABLE)
#: RFC 7541 section 4.1: each entry costs its name and value plus 32 octets.
ENTRY_OVERHEAD = 32


class HpackError(ValueError):
    """A header block that cannot be decoded: a connection error (COMPRESSION_ERROR)."""


_huffman = lru_cache(maxsize=4096)(decode_huffman)


class HpackDecoder:
    def __init__(self, max_table_size: int = 4096) -> None:
        #: The limit we advertised (SETTINGS_HEADER_TABLE_SIZE); the peer may lower the table below it.
        self.max_allowed = max_table_size
        self._max = max_table_size
        self._table: deque[Header] = deque()  # newest first, like the index space
        self._size = 0

    def decode(self, data: bytes) -> list[Header]:
        headers: list[Header] = []
        pos, end = 0, len(data)
        while pos < end:
            first = data[pos]
            if first & 0x80:  # indexed header field
                index, pos = _integer(data, pos, 7)
                headers.append(self._entry(index))
            elif first & 0x40:  # literal with incremental indexing
                index, pos = _integer(data, pos, 6)
                name, pos = (self._entry(index)[0], pos) if index else _string(data, pos)
                value, pos = _string(data, pos)
                self._add(name, value)
                headers.append((name, value))
            elif first & 0x20:  # dynamic table size update
                size, pos = _integer(data, pos, 5)
                if size > self.max_allowed:
                    raise HpackError(f"table size {size} above the advertised {self.max_allowed}")
                self._max = size
                self._evict()
            else:  # literal without indexing (0000) or never indexed (0001)
                index, pos = _integer(data, pos, 4)
                name, pos = (self._entry(index)[0], pos) if index else _string(data, pos)
                value, pos = _string(data, pos)
                headers.append((name, value))
        return headers

    def _entry(self, index: int) -> Header:
        if 0 < index <= _STATIC_SIZE:
            return STATIC_TABLE[index - 1]
        dynamic = index - _STATIC_SIZE - 1
        if index == 0 or dynamic >= len(self._table):
            raise HpackError(f"header index {index} out of range")
        return self._table[dynamic]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self._max:  # an entry larger than the table empties it (section 4.4)
            self._table.clear()
            self._size = 0
            return
        self._table.appendleft((name, value))
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max:
            name, value = self._table.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HpackError("integer too large")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise HpackError("truncated string")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HpackError("truncated string")
    raw = data[pos:end]
    if not huffman:
        return raw, end
    try:
        return _huffman(raw), end
    except HPACKDecodingError as exc:
        raise HpackError(f"bad Huffman string: {exc}") from None
