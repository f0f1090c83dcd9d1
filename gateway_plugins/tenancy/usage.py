"""Token usage read from the engines' OpenAI responses as they pass through Envoy.

Tenants are billed and rate-limited by tokens, so the counts must be the engine's own: the
``usage`` object of a non-streaming body, or the last usage an event stream carries
(``stream_options.include_usage``, ``continuous_usage_stats``, the Responses API's
``response.completed``). Bodies arrive as ext_proc chunks cut anywhere, so both readers are
incremental and never raise on what they read: a response the gateway cannot account is
still the client's response.

When the gateway itself turned on ``include_usage`` (the client did not ask), ``SseUsage``
removes the usage-only chunk from the stream, and changes nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one response, as the engine reported them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _count(value: Any) -> int | None:
    """A token count, or None: JSON has no int type, so accept integral floats but no bools."""
    if type(value) is int:  # not isinstance: bool is an int
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and value >= 0:
        return int(value)
    return None


def _usage_fields(usage: dict[str, Any]) -> Usage | None:
    """Chat/completions/embeddings name the counts prompt/completion, the Responses API input/output."""
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("input_tokens"))
        if prompt is None:
            return None  # every usage object has a prompt count: this is not one
    completion = _count(usage.get("completion_tokens"))
    if completion is None:
        completion = _count(usage.get("output_tokens"))
        if completion is None:
            completion = 0  # embeddings generate nothing
    total = _count(usage.get("total_tokens"))
    return Usage(prompt, completion, prompt + completion if total is None else total)


def _usage_of(obj: dict[str, Any]) -> Usage | None:
    """The top-level ``usage``, else ``response.usage`` (the Responses API's stream events)."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        response = obj.get("response")
        if not isinstance(response, dict):
            return None
        usage = response.get("usage")
        if not isinstance(usage, dict):
            return None
    return _usage_fields(usage)


def usage_from_json(body: bytes) -> Usage | None:
    """The usage of a complete non-streaming body; None when it has none (errors) or is not JSON."""
    try:
        obj = orjson.loads(body)
    except (orjson.JSONDecodeError, TypeError):
        return None
    return _usage_of(obj) if isinstance(obj, dict) else None


class JsonUsage:
    """Accumulates a non-streaming body (any chunking) and parses it at the end.

    The chunks are kept by reference and joined once, at the end: no copy per chunk. A body
    over ``max_bytes`` is dropped (its usage is None) rather than held in memory.
    """

    __slots__ = ("_max", "_overflow", "_parts", "_size")

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._max = max_bytes
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk (Envoy may cut it anywhere)."""
        if self._overflow or not chunk:
            return
        self._size += len(chunk)
        if self._size > self._max:
            self._overflow = True
            self._parts.clear()
            return
        self._parts.append(chunk)

    def finish(self) -> Usage | None:
        """End of body: its usage, or None."""
        parts, self._parts = self._parts, []
        if self._overflow or not parts:
            return None
        return usage_from_json(parts[0] if len(parts) == 1 else b"".join(parts))


#: The end of an event: a line terminator (CRLF, LF or CR) directly followed by another, i.e. a
#: blank line. A lone CR may not be the first half of a CRLF, or every CRLF would be a blank line.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_CR = 0x0D
_LF = 0x0A
#: The longest terminator pair is 4 bytes: a search that found none resumes this far back.
_OVERLAP = 3


def _event_data(event: bytes | bytearray) -> bytes | bytearray | None:
    """The event's data lines joined by LF (the SSE rule), or None when it has none."""
    parts = []
    for line in _LINE_END.split(event):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line == b"data":
            parts.append(b"")
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


class SseUsage:
    """Incremental SSE observer: finds the last usage in an event stream, cut into any chunks.

    Without stripping it only observes: ``feed`` returns its argument, and keeps a copy of just
    the incomplete trailing event. Events are found by a boundary search that resumes where the
    last one stopped (no rescans when an event comes in many pieces), and only events that
    mention a non-null ``"usage"`` are JSON-parsed.

    With ``strip_usage_chunk`` the usage-only chunk (``choices == []`` and a ``usage`` object)
    is removed, so the bytes of an incomplete trailing event are held back until the chunk that
    completes it; ``finish`` returns what is still held. An event that ends in a lone CR is
    complete only once the next byte shows it is not the first half of a CRLF (or at ``finish``).

    An event larger than ``max_event_bytes`` is passed through unparsed rather than buffered
    (never stripped, its usage ignored): a usage event is a few hundred bytes.
    """

    __slots__ = ("_buf", "_max", "_scan", "_sent", "_skipping", "_strip", "usage")

    def __init__(self, strip_usage_chunk: bool = False, *, max_event_bytes: int = 16 << 20) -> None:
        self.usage: Usage | None = None
        self._strip = strip_usage_chunk
        self._max = max_event_bytes
        #: The bytes of the incomplete trailing event (or, while skipping, the last few seen).
        self._buf = bytearray()
        #: Where the search for the end of the trailing event resumes, in ``_buf``.
        self._scan = 0
        #: How many bytes at the front of ``_buf`` were already forwarded (only while skipping).
        self._sent = 0
        #: The trailing event is oversized: it is forwarded as it comes and not parsed.
        self._skipping = False

    def feed(self, chunk: bytes) -> bytes:
        """Observe the next body chunk; returns the bytes to forward now."""
        if not chunk:
            return chunk
        buf = self._buf
        if buf:
            buf += chunk
            data: bytes | bytearray = buf
        else:
            data = chunk
        n = len(data)
        pos = 0  # start of the current event
        scan = self._scan
        sent = self._sent
        cuts: list[tuple[int, int]] = []  # usage-only events to strip
        if self._skipping:
            end = self._skip_end(data, scan)
            if end < 0:  # it goes on: forward the chunk, keep only its last bytes
                keep = max(0, n - _OVERLAP)
                self._keep(data, keep)
                self._scan = 0
                self._sent = n - keep
                return chunk
            self._skipping = False
            pos = scan = end
        while pos < n:
            end = self._event_end(data, pos, scan)
            if end < 0:
                scan = self._scan
                break
            if self._observe(data, pos, end) and self._strip:
                cuts.append((pos, end))
            pos = scan = end
        if n - pos > self._max:  # an oversized event: stop buffering it
            self._skipping = True
            keep = max(pos, n - _OVERLAP)
            out = self._forward(data, chunk, sent, n, cuts)
            self._keep(data, keep)
            self._scan = 0
            self._sent = n - keep
            return out
        out = self._forward(data, chunk, sent, pos, cuts)
        self._keep(data, pos)
        self._scan = scan - pos if pos < n else 0
        self._sent = 0
        return out

    def finish(self) -> bytes:
        """End of stream: the held-back bytes (b"" when none).

        A last event without its blank line (a truncated stream) still counts its usage.
        """
        buf, self._buf = self._buf, bytearray()
        skipping, self._skipping = self._skipping, False
        self._scan = self._sent = 0
        if skipping or not buf:
            return b""
        rest = bytes(buf)
        usage_only = self._observe(rest, 0, len(rest))
        if not self._strip or usage_only:
            return b""
        return rest

    def _event_end(self, data: bytes | bytearray, pos: int, scan: int) -> int:
        """The end of the event at ``pos`` (after its blank line), or -1 (``_scan`` then set)."""
        n = len(data)
        first = data[pos]
        if first == _LF:  # a blank line where an event starts: an empty event
            return pos + 1
        if first == _CR:
            if pos + 1 < n:
                return pos + 2 if data[pos + 1] == _LF else pos + 1
            self._scan = pos
            return -1
        match = _BLANK_LINE.search(data, max(scan, pos))
        if match is None:
            self._scan = max(pos, n - _OVERLAP)
            return -1
        end = match.end()
        if end == n and data[end - 1] == _CR:  # CR, or the first half of a CRLF?
            self._scan = match.start()
            return -1
        return end

    def _skip_end(self, data: bytes | bytearray, scan: int) -> int:
        """The end of the oversized event, or -1. Forwarded, not stripped: a trailing CR will do."""
        match = _BLANK_LINE.search(data, scan)
        return -1 if match is None else match.end()

    def _keep(self, data: bytes | bytearray, start: int) -> None:
        """Keep ``data[start:]`` as the buffer."""
        if data is self._buf:
            del self._buf[:start]
        elif start < len(data):
            self._buf += memoryview(data)[start:]

    def _forward(
        self, data: bytes | bytearray, chunk: bytes, sent: int, upto: int, cuts: list[tuple[int, int]]
    ) -> bytes:
        """``data[sent:upto]`` less the stripped events; the chunk itself when that is all of it."""
        if not self._strip or (data is chunk and sent == 0 and upto == len(data) and not cuts):
            return chunk
        if not cuts:
            return bytes(data[sent:upto])
        parts = []
        start = sent
        for cut_start, cut_end in cuts:
            parts.append(data[start:cut_start])
            start = cut_end
        parts.append(data[start:upto])
        return b"".join(parts)

    def _observe(self, data: bytes | bytearray, start: int, end: int) -> bool:
        """Read the usage of the event ``data[start:end]``; True when it is a usage-only chunk."""
        found = data.find(b'"usage"', start, end)
        if found < 0:
            return False
        mentions = data.count(b'"usage"', found, end)
        if mentions == data.count(b'"usage":null', found, end) + data.count(b'"usage": null', found, end):
            return False
        payload = _event_data(data[start:end])
        if payload is None:
            return False
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        usage = _usage_of(obj)
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices")
        return isinstance(choices, list) and not choices and isinstance(obj.get("usage"), dict)
