"""vLLM's KV-cache events: the wire format, decoded into typed events.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

BlockHash = int | bytes


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
    #: Per block, what besides tokens went into its hash (multimodal hashes, a cache salt); None if nothing.
    extra_keys: tuple[Any, ...] | None = None


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
                extra_keys=_extra_keys(fields.get("extra_keys")),
            )
        if kind == "BlockRemoved":
            return BlockRemoved(block_hashes=_hashes(fields["block_hashes"]), medium=fields.get("medium"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
    except (KeyError, TypeError, ValueError) as exc:
        raise KVEventDecodeError(f"malformed {kind} event: {exc!r}") from exc
    return None


def _extra_keys(values: Any) -> tuple[Any, ...] | None:
    """None unless some block has extra keys (vLLM sends a list with one entry per block, None for none)."""
    if not isinstance(values, list | tuple) or all(v is None for v in values):
        return None
    return tuple(values)


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
