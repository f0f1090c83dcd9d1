"""vLLM's KV-cache events: the wire format (``decode``), a ZMQ subscriber (``subscriber``), and the
gateway's feed of them into the exact prefix index (``feed``)."""

from gateway_plugins.kv_events.decode import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVEventDecodeError,
    decode_event,
    decode_message,
    decode_payload,
)
from gateway_plugins.kv_events.subscriber import END_OF_REPLAY, KVEventSubscriber

__all__ = [
    "END_OF_REPLAY",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
    "KVEventBatch",
    "KVEventDecodeError",
    "KVEventSubscriber",
    "decode_event",
    "decode_message",
    "decode_payload",
]
