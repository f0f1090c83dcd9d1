"""vLLM's KV-cache events over ZMQ: a subscriber, and a decoder into typed events.

A vLLM engine started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": ..., "topic": ...}'`` publishes, after each engine step that changed its prefix cache, one
message of three frames::

    [topic, sequence number (8 bytes, big-endian), msgpack payload [ts, [event, ...], data_parallel_rank]]

Events are ``BlockStored`` (blocks of ``block_size`` tokens entered the prefix cache: their hashes, the
parent block's hash, the tokens, the LoRA adapter), ``BlockRemoved`` (evicted) and ``AllBlocksCleared``.
vLLM 0.10 and later encode each event as a msgpack map with a ``type`` key; older releases as an array
whose first element is the type name, the fields following by position (trailing defaults omitted).
Both decode to the same dataclasses here; event types this module does not know are skipped, so a newer
engine does not break an older gateway. Block hashes are kept as sent (``int``, or ``bytes`` in some
releases).

Who binds: vLLM's PUB socket binds only when its endpoint has a wildcard (``tcp://*:5557``) or is
``ipc://``/``inproc://``; with a host address (``tcp://10.0.0.5:5557``) it *connects*. So either the
subscriber binds one endpoint and every engine connects to it (give each engine its own ``topic``, for
instance its pod name, to tell them apart), or the engines bind and the subscriber connects to each.

Replay: with a ``replay_endpoint`` the engine binds a ROUTER socket that resends buffered batches from
a sequence number on; ``KVEventSubscriber.replay`` asks it (after a gap in sequence numbers, say).

Needs ``pyzmq`` and ``msgpack``; the gateway imports this module only when KV events are used.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

BlockHash = int | bytes

#: The sequence number vLLM's replay socket sends after the last buffered batch.
END_OF_REPLAY = -1


class KVEventDecodeError(ValueError):
    """A message that is not a vLLM KV-event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # "GPU", "CPU" (offloaded), ...; None from older engines
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """One published message: the events of one engine step."""

    topic: str
    seq: int
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


# Field order of the array encoding (older vLLM), after the type name.
_ARRAY_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def decode_event(raw: Any) -> KVEvent | None:
    """One event, from either encoding; ``None`` for an event type this module does not know."""
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _ARRAY_FIELDS.get(kind)
        if names is None:
            return None
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise KVEventDecodeError(f"an event is a map or a tagged array, not {type(raw).__name__}")
    try:
        if kind == "BlockStored":
            return BlockStored(
                block_hashes=_hashes(fields["block_hashes"]),
                parent_block_hash=fields.get("parent_block_hash"),
                token_ids=tuple(int(t) for t in fields["token_ids"]),
                block_size=int(fields["block_size"]),
                lora_id=fields.get("lora_id"),
                medium=fields.get("medium"),
                lora_name=fields.get("lora_name"),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(block_hashes=_hashes(fields["block_hashes"]), medium=fields.get("medium"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
    except (KeyError, TypeError, ValueError) as exc:
        raise KVEventDecodeError(f"malformed {kind} event: {exc!r}") from exc
    return None


def _hashes(values: Any) -> tuple[BlockHash, ...]:
    if not isinstance(values, list | tuple) or not all(isinstance(v, int | bytes) for v in values):
        raise TypeError("block_hashes must be a list of integers or byte strings")
    return tuple(values)


def decode_payload(payload: bytes) -> tuple[float, tuple[KVEvent, ...], int | None]:
    """(timestamp, events, data-parallel rank) of a batch's msgpack payload."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise KVEventDecodeError(f"not msgpack: {exc}") from exc
    if isinstance(batch, dict):  # a map-encoded batch (not sent by any vLLM seen, but cheap to accept)
        batch = [batch.get("ts"), batch.get("events"), batch.get("data_parallel_rank")]
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise KVEventDecodeError("a batch is [ts, [events...], data_parallel_rank]")
    ts = batch[0]
    if not isinstance(ts, int | float):
        raise KVEventDecodeError("a batch's timestamp must be a number")
    rank = batch[2] if len(batch) > 2 else None
    events = tuple(e for e in map(decode_event, batch[1]) if e is not None)
    return float(ts), events, rank


def decode_message(frames: Sequence[bytes]) -> KVEventBatch:
    """A ``[topic, seq, payload]`` message as received from the SUB socket."""
    if len(frames) != 3:
        raise KVEventDecodeError(f"a KV-event message has 3 frames, not {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise KVEventDecodeError("the sequence frame must be 8 bytes")
    ts, events, rank = decode_payload(payload)
    return KVEventBatch(
        topic=topic.decode("utf-8", "replace"),
        seq=int.from_bytes(seq, "big", signed=True),
        ts=ts,
        events=events,
        data_parallel_rank=rank,
    )


@dataclass
class KVEventSubscriber:
    """An asyncio ZMQ SUB socket yielding ``KVEventBatch``es.

    ``bind=True`` (the default) binds ``endpoint`` for engines configured to connect to it; ``False``
    connects to an engine that binds. ``topics`` filters by topic prefix (all by default). Malformed
    messages are logged once, counted in ``malformed`` and skipped; a jump in a topic's sequence numbers
    (messages dropped at a high-water mark, or sent before the subscriber was there) adds to ``missed``.
    """

    endpoint: str
    bind: bool = True
    topics: Sequence[str] = ("",)
    context: zmq.asyncio.Context | None = None
    malformed: int = 0
    missed: int = 0
    _socket: zmq.asyncio.Socket | None = field(default=None, repr=False)
    _last_seq: dict[str, int] = field(default_factory=dict, repr=False)

    def start(self) -> KVEventSubscriber:
        """Open the socket (idempotent); returns self."""
        if self._socket is None:
            self.context = self.context or zmq.asyncio.Context.instance()
            sock = self.context.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            for topic in self.topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
            if self.bind:
                sock.bind(self.endpoint)
            else:
                sock.connect(self.endpoint)
            self._socket = sock
        return self

    async def recv(self) -> KVEventBatch:
        """The next well-formed batch."""
        sock = self.start()._socket
        assert sock is not None
        while True:
            frames = await sock.recv_multipart()
            try:
                batch = decode_message(frames)
            except KVEventDecodeError as exc:
                if not self.malformed:
                    log.warning("skipping a malformed KV-event message: %s", exc)
                self.malformed += 1
                continue
            last = self._last_seq.get(batch.topic)
            if last is not None and batch.seq > last + 1:
                self.missed += batch.seq - last - 1
            self._last_seq[batch.topic] = batch.seq
            return batch

    async def __aiter__(self) -> AsyncIterator[KVEventBatch]:
        while True:
            yield await self.recv()

    async def replay(
        self, replay_endpoint: str, start_seq: int = 0, *, wait_seconds: float = 5.0
    ) -> list[KVEventBatch]:
        """Batches from ``start_seq`` on, still buffered by the engine whose replay socket is given."""
        self.start()
        assert self.context is not None
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(replay_endpoint)
        batches = []
        try:
            await sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
            while True:
                if not await sock.poll(wait_seconds * 1000):
                    raise TimeoutError(f"no replay from {replay_endpoint} within {wait_seconds} s")
                frames = await sock.recv_multipart()
                if len(frames) == 4 and frames[0] == b"":
                    frames = frames[1:]
                if len(frames) == 3 and int.from_bytes(frames[1], "big", signed=True) == END_OF_REPLAY:
                    return batches
                batches.append(decode_message(frames))
        finally:
            sock.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
