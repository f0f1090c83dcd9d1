"""vLLM's KV-cache events, published by the emulator over ZMQ in vLLM's own wire format.

A gateway that keeps an exact prefix index from real engines' events (``gateway_plugins/kv_events.py``) must
get the same stream from emulated engines, so live runs exercise that path. The configuration is vLLM's
``--kv-events-config`` JSON (``KVEventsConfig``); what goes out is what vLLM 0.32's ``ZmqEventPublisher``
sends:

* after each engine step that changed the prefix cache, one PUB message ``[topic, seq, payload]``: ``seq``
  counts the publisher's batches from 0 (8 bytes, big-endian), ``payload`` is the msgpack array
  ``[ts, [event, ...], data_parallel_rank]``, each event a map whose first key is ``type``
  (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``), the other keys in vLLM's field order, fields at
  their default left out;
* the PUB socket binds when the endpoint has a wildcard (``*``, ``::``) or is ``ipc://``/``inproc://`` and
  connects otherwise;
* with a ``replay_endpoint``, a ROUTER socket: a DEALER sends ``[b"", start_seq]`` and gets every batch
  still buffered (the last ``buffer_steps``) from ``start_seq`` on, each ``[b"", topic, seq, payload]``,
  then ``[b"", b"", seq -1, b""]``.

Nothing here blocks the event loop: sends are non-blocking (a PUB drops at its high-water mark, as vLLM's
does) and replays are served by an asyncio task that yields between messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from emulator.engine.kv_cache import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent

log = logging.getLogger(__name__)

#: The sequence number of the message that ends a replay.
END_SEQ = (-1).to_bytes(8, "big", signed=True)
#: vLLM's storage tier names; the emulator models the GPU tier only.
MEDIUM_GPU = "GPU"
#: vLLM tags stored blocks with their KV-cache group's kind; a plain decoder has one full-attention group.
KV_CACHE_SPEC_KIND = "full_attention"
#: Replay messages sent between yields to the event loop.
_REPLAY_CHUNK = 256


class KVEventsConfigError(ValueError):
    """A ``--kv-events-config`` that vLLM would refuse too."""


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """vLLM's ``KVEventsConfig``: same fields, defaults and meaning.

    ``max_queue_size`` bounds vLLM's queue to its publisher thread; the emulator publishes from its event
    loop and has no such queue, so the field is accepted and ignored.
    """

    enable_kv_cache_events: bool = False
    #: "zmq" or "null"; vLLM's default is "zmq" when events are enabled, else "null".
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    #: Batches kept for replay.
    buffer_steps: int = 10_000
    #: The PUB socket's send high-water mark (messages); beyond it, batches are dropped.
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def enabled(self) -> bool:
        """Whether anything is published (vLLM's ``EventPublisherFactory`` answers a null publisher else)."""
        return self.enable_kv_cache_events and self.publisher == "zmq"

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parse ``--kv-events-config``; ``KVEventsConfigError`` names what is wrong."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KVEventsConfigError(f"--kv-events-config is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise KVEventsConfigError("--kv-events-config must be a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> KVEventsConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:  # vLLM's config forbids extra fields
            raise KVEventsConfigError(
                f"unknown --kv-events-config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        _check(raw, "enable_kv_cache_events", bool)
        _check(raw, "publisher", str, optional=True)
        _check(raw, "endpoint", str)
        _check(raw, "replay_endpoint", str, optional=True)
        _check(raw, "topic", str)
        for name in ("buffer_steps", "hwm", "max_queue_size"):
            _check(raw, name, int)
            if name in raw and raw[name] < 0:
                raise KVEventsConfigError(f"--kv-events-config {name} must not be negative, not {raw[name]}")
        config = cls(**raw)
        publisher = config.publisher
        if publisher is None:
            publisher = "zmq" if config.enable_kv_cache_events else "null"
        if publisher not in ("zmq", "null"):
            raise KVEventsConfigError(f"unknown KV event publisher {publisher!r}: 'zmq' or 'null'")
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(config, name)
            if value is not None and not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise KVEventsConfigError(f"--kv-events-config {name} {value!r} is not a ZMQ endpoint")
        return cls(**{**raw, "publisher": publisher})


def _check(raw: dict[str, Any], name: str, kind: type, *, optional: bool = False) -> None:
    if name not in raw or (optional and raw[name] is None):
        return
    value = raw[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise KVEventsConfigError(f"--kv-events-config {name} must be a {kind.__name__}, not {value!r}")


def encode_event(event: KVCacheEvent) -> dict[str, Any]:
    """One engine event as vLLM encodes it: a ``type``-tagged map, fields in vLLM's order."""
    if isinstance(event, BlockStored):
        lora = event.lora_name
        num_blocks = len(event.block_hashes)
        return {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": MEDIUM_GPU,
            "lora_name": lora,
            # The block hash's extra keys, one entry per block: the adapter's name, or nothing.
            "extra_keys": [[lora] if lora is not None else None for _ in range(num_blocks)],
            "group_idx": 0,
            "kv_cache_spec_kind": KV_CACHE_SPEC_KIND,
        }
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": [event.block_hash],
            "medium": MEDIUM_GPU,
            "group_idx": 0,
        }
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV-cache event: {event!r}")


def encode_batch(events: Sequence[KVCacheEvent], ts: float, data_parallel_rank: int = 0) -> bytes:
    """The msgpack payload of one batch: ``[ts, [event, ...], data_parallel_rank]``."""
    return msgpack.packb([ts, [encode_event(e) for e in events], data_parallel_rank], use_bin_type=True)


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: wildcard and ipc/inproc endpoints are bound, the rest connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """vLLM's ZMQ publisher, on the caller's asyncio loop. Sockets are set up (bound) at construction, so a
    port in use fails at start; ``start`` (on the running loop) serves replays; ``close`` ends it all."""

    def __init__(
        self,
        config: KVEventsConfig,
        *,
        data_parallel_rank: int = 0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        if not config.enabled:
            raise ValueError("KV events are not enabled in this config (publisher 'null')")
        self.config = config
        self.data_parallel_rank = data_parallel_rank
        self.topic = config.topic.encode()
        #: (seq, payload) of the last ``buffer_steps`` batches.
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self.next_seq = 0
        #: Batches the PUB socket refused without blocking (vLLM drops these too).
        self.dropped = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._replay_task: asyncio.Task[None] | None = None
        # The PUB socket is a plain (synchronous) one on the same context: a non-blocking send either
        # queues the message or raises at once, with no future to await.
        pub = zmq.Context.shadow(self._context.underlying).socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, config.hwm)
        router: zmq.asyncio.Socket | None = None
        try:
            if is_bind_endpoint(config.endpoint):
                pub.bind(config.endpoint)
            else:
                pub.connect(config.endpoint)
            if config.replay_endpoint is not None:
                router = self._context.socket(zmq.ROUTER)
                router.setsockopt(zmq.LINGER, 0)
                # A whole buffer must fit in the ROUTER's queue: past its high-water mark it would drop.
                router.setsockopt(zmq.SNDHWM, config.buffer_steps + 1)
                router.bind(config.replay_endpoint)
        except zmq.ZMQError:
            pub.close()
            if router is not None:
                router.close()
            raise
        self._pub = pub
        self._router = router

    @property
    def endpoint(self) -> str:
        """Where the PUB socket is bound or connected (the actual port for ``tcp://*:0``)."""
        return self._pub.getsockopt_string(zmq.LAST_ENDPOINT) or self.config.endpoint

    @property
    def replay_endpoint(self) -> str | None:
        if self._router is None:
            return None
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    def start(self) -> None:
        """Serve replay requests from the running loop (idempotent)."""
        if self._router is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(
                self._serve_replays(), name="kv-replay"
            )

    def publish(self, events: Sequence[KVCacheEvent]) -> int:
        """Send one batch (the events of one engine step) now; returns its sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        payload = encode_batch(events, time.time(), self.data_parallel_rank)
        try:
            self._pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        self.buffer.append((seq, payload))
        return seq

    async def _serve_replays(self) -> None:
        router = self._router
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:  # [identity, b"", start_seq]
                log.warning("ignoring a malformed KV-event replay request of %d frames", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            batches = [(seq, payload) for seq, payload in self.buffer if seq >= start_seq]
            for count, (seq, payload) in enumerate(batches, 1):
                await router.send_multipart([identity, b"", self.topic, seq.to_bytes(8, "big"), payload])
                if count % _REPLAY_CHUNK == 0:
                    await asyncio.sleep(0)  # let the engine's steps run during a long replay
            await router.send_multipart([identity, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        """Stop serving replays and close the sockets."""
        task, self._replay_task = self._replay_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pub.close(linger=0)
        if self._router is not None:
            self._router.close(linger=0)


def create_publisher(config: KVEventsConfig | None) -> KVEventPublisher | None:
    """A publisher for ``config``, or None where vLLM would use its null publisher."""
    if config is None or not config.enabled:
        return None
    return KVEventPublisher(config)
