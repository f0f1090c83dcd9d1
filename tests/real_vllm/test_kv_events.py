"""KV-cache events from real vLLM, received and decoded by the gateway's subscriber
(gateway_plugins/kv_events.py).

Both engines' publishers connect to one endpoint that the subscriber binds (topic = engine name)."""

from __future__ import annotations

import asyncio
import random

from gateway_plugins.kv_events import AllBlocksCleared, BlockStored, KVEventBatch, KVEventSubscriber
from tests.real_vllm.conftest import MODEL, RealFleet, post
from tests.real_vllm.test_routing import text


async def stored_after(
    subscriber: KVEventSubscriber, fleet: RealFleet, engine: str, prompt: str
) -> tuple[KVEventBatch, BlockStored]:
    """Send ``prompt`` to ``engine`` until its BlockStored arrives (a PUB drops what it sends before the
    subscriber's connection is up, so the first tries may be lost)."""
    url = fleet.engine(engine).url
    for _ in range(20):
        await asyncio.to_thread(fleet.reset_prefix_caches)  # the same prompt stores its blocks again
        await asyncio.to_thread(
            post, url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        )
        try:
            async with asyncio.timeout(1.0):
                while True:
                    batch = await subscriber.recv()
                    stored = [e for e in batch.events if isinstance(e, BlockStored)]
                    if batch.topic == engine and stored:
                        return batch, stored[0]
        except TimeoutError:
            continue
    raise AssertionError(f"no BlockStored from {engine}")


async def test_block_stored_events_from_both_real_engines(fleet: RealFleet) -> None:
    subscriber = KVEventSubscriber(fleet.kv_endpoint).start()
    try:
        for engine in fleet.engines:
            prompt = text(random.randrange(1 << 30), 260)  # ~300 tokens: two whole 128-token blocks
            tokens = (
                await asyncio.to_thread(post, engine.url, "/tokenize", {"model": MODEL, "prompt": prompt})
            ).json()
            batch, stored = await stored_after(subscriber, fleet, engine.name, prompt)

            assert batch.ts > 1e9 and batch.data_parallel_rank == 0
            assert stored.block_size == 128
            assert len(stored.block_hashes) == tokens["count"] // 128 == 2
            assert all(isinstance(h, int) for h in stored.block_hashes)
            assert stored.parent_block_hash is None  # the prompt's first block has no parent
            assert list(stored.token_ids) == tokens["tokens"][:256]
            assert stored.lora_name is None

            # The engine's replay socket resends the same batch, decoded the same way.
            replayed = await subscriber.replay(fleet.kv_replay[engine.name], batch.seq)
            assert replayed[0] == batch

            # Resetting the prefix cache is announced too, with the engine's next step.
            await asyncio.to_thread(fleet.reset_prefix_caches)
            await asyncio.to_thread(
                post, engine.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}
            )
            async with asyncio.timeout(10):
                while True:
                    later = await subscriber.recv()
                    if later.topic == engine.name and AllBlocksCleared() in later.events:
                        break
        assert subscriber.malformed == 0
    finally:
        subscriber.close()
