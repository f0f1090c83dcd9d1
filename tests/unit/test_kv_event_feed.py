"""The gateway's KV-event feed against real ZMQ publishers (the emulator's, vLLM's wire format): it follows
discovery, replays an engine's history when it joins late and after a gap, and forgets pods that leave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from brickyard.stack import free_port
from emulator.engine.kv_cache import BlockRemoved, BlockStored
from emulator.kv_events import KVEventPublisher, KVEventsConfig
from gateway_plugins.config import KvEventSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.kv_events.feed import PORT_ANNOTATION, REPLAY_PORT_ANNOTATION, KvEventFeed
from gateway_plugins.routing.kv_index import KvBlockIndex

BLOCK = 4
KEY = ("default", "engine-a")


def stored(first: int, tokens: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(
        tuple(range(first, first + len(tokens) // BLOCK)), parent, tuple(tokens), BLOCK, None, None
    )


class Engine:
    """A publisher bound as vLLM binds a wildcard endpoint, with a replay socket."""

    def __init__(self) -> None:
        self.port, self.replay_port = free_port(), free_port()
        self.publisher = KVEventPublisher(
            KVEventsConfig.from_dict(
                {
                    "enable_kv_cache_events": True,
                    "publisher": "zmq",
                    "endpoint": f"tcp://*:{self.port}",
                    "replay_endpoint": f"tcp://*:{self.replay_port}",
                    "topic": "engine-a",
                }
            )
        )
        self.publisher.start()

    def pod(self, name: str = "engine-a") -> PodInfo:
        annotations = {PORT_ANNOTATION: str(self.port), REPLAY_PORT_ANNOTATION: str(self.replay_port)}
        return PodInfo(name, "127.0.0.1:8000", "m", annotations=annotations)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = Engine()
    yield engine
    await engine.publisher.close()


@pytest.fixture
async def feed() -> AsyncIterator[KvEventFeed]:
    feed = KvEventFeed(PodRegistry(), KvBlockIndex(time.monotonic), KvEventSettings(enabled=True))
    task = asyncio.create_task(feed.run())
    yield feed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_a_late_subscriber_replays_the_history_and_is_live(engine: Engine, feed: KvEventFeed) -> None:
    engine.publisher.publish([stored(1, [1, 2, 3, 4, 5, 6, 7, 8])])  # before the gateway knows the pod
    feed.registry.replace_all([engine.pod()])
    await until(lambda: feed.index.blocks_held(feed.registry.state(*KEY)) == 2)  # type: ignore[arg-type]
    assert feed.index.sync_states()[KEY] == "live"
    assert feed.replays == 1


async def test_a_gap_is_closed_by_a_replay(engine: Engine, feed: KvEventFeed) -> None:
    feed.registry.replace_all([engine.pod()])
    await until(lambda: feed.replays == 1)
    await asyncio.sleep(0.2)  # the subscription is up
    engine.publisher.publish([stored(1, [1, 2, 3, 4])])
    await until(lambda: feed.index.last_seq(KEY) == 0)
    # A batch the gateway never receives (dropped at a high-water mark, say), then the next one.
    engine.publisher.next_seq += 1
    engine.publisher.buffer.append((1, engine.publisher.buffer[0][1]))
    engine.publisher.publish([BlockRemoved(1)])
    await until(lambda: feed.index.last_seq(KEY) == 2)
    assert feed.replays == 2 and feed.index.gaps == 0
    assert feed.index.sync_states()[KEY] == "live"


async def test_pods_that_leave_are_forgotten(engine: Engine, feed: KvEventFeed) -> None:
    engine.publisher.publish([stored(1, [1, 2, 3, 4])])
    feed.registry.replace_all([engine.pod()])
    await until(lambda: KEY in feed.index.sync_states())
    feed.registry.replace_all([])
    await until(lambda: KEY not in feed.index.sync_states())
