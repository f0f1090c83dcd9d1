"""An asyncio ZMQ subscriber of vLLM's KV-cache events, with replay.

Who binds: vLLM's PUB socket binds only when its endpoint has a wildcard (``tcp://*:5557``) or is
``ipc://``/``inproc://``; with a host address (``tcp://10.0.0.5:5557``) it *connects*. So either the
subscriber binds one endpoint and every engine connects to it (give each engine its own ``topic``, for
instance its pod name, to tell them apart), or the engines bind and the subscriber connects to each.

Replay: with a ``replay_endpoint`` the engine binds a ROUTER socket that resends buffered batches from
a sequence number on; ``KVEventSubscriber.replay`` asks it (after a gap in sequence numbers, say).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from gateway_plugins.kv_events.decode import KVEventBatch, KVEventDecodeError, decode_message

log = logging.getLogger(__name__)

#: The sequence number vLLM's replay socket sends after the last buffered batch.
END_OF_REPLAY = -1


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
