"""The emulator's KV-cache events (emulator/kv_events.py): vLLM's wire format, read by the gateway's own
subscriber (gateway_plugins/kv_events.py), which tests/real_vllm/test_kv_events.py checks against real vLLM.

The engine-level tests check that the event stream always describes the prefix cache exactly; the live ones
run ``brickyard emulator --kv-events-config`` (one process for the module) with a small KV cache."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from brickyard.stack import Stack, free_port
from emulator import tokens
from emulator.engine import EngineCore, Request
from emulator.engine import kv_cache as engine_kv
from emulator.engine.kv_cache import NONE_HASH, external_hash, hash_block
from emulator.kv_events import (
    KVEventPublisher,
    KVEventsConfig,
    KVEventsConfigError,
    create_publisher,
    encode_batch,
)
from emulator.profile import load_profile
from gateway_plugins.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventSubscriber,
    decode_payload,
)

MODEL = "kv-model"
TOPIC = "kv-test"
BLOCK_SIZE = 16  # the profile's
NUM_BLOCKS = 64  # a small cache: eviction after a few prompts
ADAPTER = "adapter-a"

#: ``msgspec.msgpack.Encoder().encode(KVEventBatch(ts=1.5, events=[...], data_parallel_rank=0))`` in vLLM 0.32
#: (.vllm-cpu) for the events of ``test_encoding_is_vllms_byte_for_byte``, with group_idx=0 and
#: kv_cache_spec_kind="full_attention" on the stored blocks as vLLM's KVCacheManager sets them.
VLLM_PAYLOAD = bytes.fromhex(
    "93cb3ff8000000000000948ba474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739201cfffffffffffffff"
    "ffb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f73697a6502a76c6f72"
    "615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797392c0c0a967726f75705f696478"
    "00b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e8ba474797065ab426c6f636b53746f72"
    "6564ac626c6f636b5f6861736865739105b1706172656e745f626c6f636b5f6861736802a9746f6b656e5f696473920102aa62"
    "6c6f636b5f73697a6502a76c6f72615f696403a66d656469756da3475055a96c6f72615f6e616d65a26164aa65787472615f6b"
    "6579739191a26164a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e7469"
    "6f6e84a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739107a66d656469756da3475055a967726f"
    "75705f6964780081a474797065b0416c6c426c6f636b73436c656172656400"
)


# -- encoding and configuration --------------------------------------------------------------------------


def test_encoding_is_vllms_byte_for_byte() -> None:
    events = [
        engine_kv.BlockStored((1, 2**64 - 1), None, (1, 2, 3, 4), 2, None, None),
        engine_kv.BlockStored((5,), 2, (1, 2), 2, 3, "ad"),
        engine_kv.BlockRemoved(7),
        engine_kv.AllBlocksCleared(),
    ]
    payload = encode_batch(events, 1.5, 0)
    assert payload == VLLM_PAYLOAD
    ts, decoded, rank = decode_payload(payload)
    assert (ts, rank) == (1.5, 0)
    assert [summary(e) for e in decoded] == [
        ((1, 2**64 - 1), None, (1, 2, 3, 4), 2, None, "GPU", None),
        ((5,), 2, (1, 2), 2, 3, "GPU", "ad"),
        BlockRemoved((7,), "GPU"),
        AllBlocksCleared(),
    ]


def summary(event: object) -> object:
    """A decoded ``BlockStored``'s fields that the gateway's decoder has always had; other events as is."""
    if isinstance(event, BlockStored):
        return (
            event.block_hashes,
            event.parent_block_hash,
            event.token_ids,
            event.block_size,
            event.lora_id,
            event.medium,
            event.lora_name,
        )
    return event


def test_config_as_vllm_reads_it() -> None:
    config = KVEventsConfig.from_json('{"enable_kv_cache_events": true, "topic": "kv"}')
    assert config.publisher == "zmq" and config.enabled  # vLLM's default publisher when enabled
    assert (config.endpoint, config.replay_endpoint, config.buffer_steps, config.hwm) == (
        "tcp://*:5557",
        None,
        10_000,
        100_000,
    )
    assert not KVEventsConfig.from_json("{}").enabled
    assert KVEventsConfig.from_json("{}").publisher == "null"
    off = KVEventsConfig.from_json('{"enable_kv_cache_events": true, "publisher": "null"}')
    assert create_publisher(off) is None and create_publisher(None) is None
    ignored = KVEventsConfig.from_json('{"enable_kv_cache_events": true, "max_queue_size": 5}')
    assert ignored.max_queue_size == 5  # vLLM's thread queue: accepted, nothing to bound here


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{enable", "not JSON"),
        ("[1]", "JSON object"),
        ('{"enable_kv_cache_events": true, "endpiont": "tcp://*:1"}', "unknown --kv-events-config field"),
        ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events must be a bool"),
        ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "unknown KV event publisher"),
        ('{"enable_kv_cache_events": true, "buffer_steps": -1}', "buffer_steps must not be negative"),
        ('{"enable_kv_cache_events": true, "hwm": true}', "hwm must be a int"),
        ('{"enable_kv_cache_events": true, "endpoint": "localhost:5557"}', "not a ZMQ endpoint"),
        ('{"enable_kv_cache_events": true, "topic": 3}', "topic must be a str"),
    ],
)
def test_bad_config_is_refused(text: str, complaint: str) -> None:
    with pytest.raises(KVEventsConfigError, match=complaint):
        KVEventsConfig.from_json(text)


# -- the engine's events ---------------------------------------------------------------------------------


def signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def check_chain(event: engine_kv.BlockStored) -> None:
    """Each hash is the engine's chain hash of its block's tokens over the previous one (or the parent)."""
    parent = NONE_HASH if event.parent_block_hash is None else signed(event.parent_block_hash)
    lora = 0 if event.lora_name is None else event.lora_id
    size = event.block_size
    assert len(event.token_ids) == size * len(event.block_hashes)
    for index, block_hash in enumerate(event.block_hashes):
        parent = hash_block(parent, tuple(event.token_ids[index * size : (index + 1) * size]), lora)
        assert external_hash(parent) == block_hash


def test_engine_events_describe_the_cache_exactly() -> None:
    """Stored minus removed is the cache's set of names after every step, under eviction, preemption,
    resets (with running requests preempted), decode jumps, adapters and identical prompts in flight."""
    rng = random.Random(3)
    core = EngineCore(load_profile("llama-3.1-8b_h100"), num_blocks=128, max_model_len=2048, max_loras=2)
    core.enable_kv_events()
    prefixes = [[rng.randrange(1000, 30000) for _ in range(rng.randrange(20, 200))] for _ in range(6)]
    resident: set[int] = set()
    seen: dict[str, int] = {}
    now = 0.0

    def apply(events: list[engine_kv.KVCacheEvent]) -> None:
        for event in events:
            seen[type(event).__name__] = seen.get(type(event).__name__, 0) + 1
            if isinstance(event, engine_kv.BlockStored):
                check_chain(event)
                assert event.block_size == BLOCK_SIZE
                assert not resident & set(event.block_hashes)
                resident.update(event.block_hashes)
            elif isinstance(event, engine_kv.BlockRemoved):
                resident.remove(event.block_hash)
            else:
                resident.clear()
        assert resident == {external_hash(h) for h in core.kv.pool.cached}

    prompt: list[int] = []
    for index in range(400):
        if index % 5 or not prompt:  # else the previous prompt again: identical requests in flight
            prompt = rng.choice(prefixes) + [rng.randrange(1000, 30000) for _ in range(rng.randrange(1, 120))]
        lora = rng.choice([None, None, "a", "b"])
        core.add_request(Request(f"r{index}", prompt, rng.randrange(1, 80), lora), now)
        if index % 97 == 50:
            assert core.reset_prefix_cache(reset_running_requests=True)
            apply(core.take_kv_events())
        for _ in range(rng.randrange(0, 2)):
            out = core.step(now) if rng.random() < 0.7 else core.advance(now, now + 0.2)
            now = out.end
            apply(core.take_kv_events())
    while core.has_unfinished_requests:
        now = core.step(now).end
        apply(core.take_kv_events())
    assert core.metrics.num_preemptions > 0
    assert seen["BlockStored"] > 100 and seen["BlockRemoved"] > 100 and seen["AllBlocksCleared"] == 4
    assert core.reset_prefix_cache() and not core.kv.pool.cached  # idle: nothing holds a block
    assert core.take_kv_events() == [engine_kv.AllBlocksCleared()]


def test_no_events_without_a_listener() -> None:
    core = EngineCore(load_profile("llama-3.1-8b_h100"), num_blocks=64, max_model_len=1024)
    core.add_request(Request("a", list(range(100, 200)), 20), 0.0)
    now = 0.0
    while core.has_unfinished_requests:
        now = core.step(now).end
    assert core.kv.pool.events is None and core.take_kv_events() == []
    assert core.kv.pool.cached  # the cache works as before


# -- the publisher's sockets -----------------------------------------------------------------------------


async def test_publisher_connects_to_a_subscriber_that_binds_and_keeps_a_bounded_replay() -> None:
    """Without a wildcard the PUB socket connects (vLLM's rule): one subscriber can bind for all engines.
    The replay buffer keeps the last ``buffer_steps`` batches."""
    port = free_port()
    config = KVEventsConfig.from_dict(
        {
            "enable_kv_cache_events": True,
            "endpoint": f"tcp://127.0.0.1:{port}",
            "replay_endpoint": f"tcp://*:{free_port()}",
            "topic": TOPIC,
            "buffer_steps": 3,
        }
    )
    subscriber = KVEventSubscriber(f"tcp://127.0.0.1:{port}", bind=True).start()
    publisher = KVEventPublisher(config)
    publisher.start()
    try:
        stored = engine_kv.BlockStored((11, 12), None, tuple(range(32)), 16, None, None)
        for _ in range(100):  # until the connection is up (a PUB drops what it sends before)
            publisher.publish([stored])
            try:
                async with asyncio.timeout(0.1):
                    batch = await subscriber.recv()
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("the subscriber never received a batch")
        assert batch.topic == TOPIC and batch.data_parallel_rank == 0
        assert [summary(e) for e in batch.events] == [
            ((11, 12), None, tuple(range(32)), 16, None, "GPU", None)
        ]
        last = publisher.publish([engine_kv.BlockRemoved(11)])
        assert (await subscriber.recv()).seq == last == batch.seq + 1
        assert publisher.replay_endpoint is not None
        replay = publisher.replay_endpoint.replace("0.0.0.0", "127.0.0.1")
        replayed = await subscriber.replay(replay, 0)
        assert [b.seq for b in replayed] == [last - 2, last - 1, last]
        assert replayed[-1].events == (BlockRemoved((11,), "GPU"),)
        assert await subscriber.replay(replay, last + 1) == []
    finally:
        subscriber.close()
        await publisher.close()


# -- a live emulator -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveEmulator:
    url: str
    events: str
    replay: str


@pytest.fixture(scope="module")
def live_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveEmulator]:
    pub, replay = free_port(), free_port()
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{pub}",
        "replay_endpoint": f"tcp://*:{replay}",
        "topic": TOPIC,
    }
    workdir = tmp_path_factory.mktemp("kv-events")
    adapter = workdir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with Stack(workdir) as stack:
        engine = stack.start_engine(
            "kv-engine",
            MODEL,
            None,
            "--kv-events-config",
            json.dumps(config),
            "--num-blocks",
            str(NUM_BLOCKS),
            "--max-model-len",
            str(NUM_BLOCKS * BLOCK_SIZE),
            "--speed",
            "20",
            "--enable-lora",
        )
        load = {"lora_name": ADAPTER, "lora_path": str(adapter)}
        httpx.post(f"{engine.url}/v1/load_lora_adapter", json=load, timeout=10).raise_for_status()
        yield LiveEmulator(engine.url, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}")


@pytest.fixture
async def http(live_emulator: LiveEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_emulator.url, timeout=30) as client:
        yield client


def words(seed: int, count: int) -> str:
    """``count`` one-token words."""
    vocabulary = tokens.vocabulary().words
    rng = random.Random(seed)
    return "".join(rng.choice(vocabulary) for _ in range(count))


async def complete(http: httpx.AsyncClient, prompt: str, max_tokens: int = 1, model: str = MODEL) -> None:
    response = await http.post(
        "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens}
    )
    response.raise_for_status()


async def tokenize(http: httpx.AsyncClient, prompt: str) -> list[int]:
    response = await http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
    ids = response.json()["tokens"]
    assert ids == tokens.encode(prompt)
    return ids


async def reset(http: httpx.AsyncClient, **query: str) -> bool:
    response = await http.post("/reset_prefix_cache", params=query)
    response.raise_for_status()
    return response.json()["success"]


async def drain(subscriber: KVEventSubscriber, idle: float = 0.3) -> list[KVEventBatch]:
    """Every batch until none comes for ``idle`` seconds."""
    batches = []
    while True:
        try:
            async with asyncio.timeout(idle):
                batches.append(await subscriber.recv())
        except TimeoutError:
            return batches


@pytest.fixture
async def subscriber(
    live_emulator: LiveEmulator, http: httpx.AsyncClient
) -> AsyncIterator[KVEventSubscriber]:
    """A subscriber connected to the engine, known to receive (a PUB drops what it sends before the
    connection is up), with nothing pending."""
    sub = KVEventSubscriber(live_emulator.events, bind=False, topics=(TOPIC,)).start()
    try:
        for attempt in range(50):
            await complete(http, words(10_000 + attempt, 40))
            try:
                async with asyncio.timeout(0.5):
                    await sub.recv()
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no KV events from the emulator")
        await drain(sub)
        yield sub
    finally:
        sub.close()


def stored(batches: list[KVEventBatch]) -> list[BlockStored]:
    return [e for b in batches for e in b.events if isinstance(e, BlockStored)]


async def test_shared_prefix_blocks_carry_the_prompt_tokens_and_chain(
    http: httpx.AsyncClient, subscriber: KVEventSubscriber
) -> None:
    assert await reset(http)
    prefix = words(1, 100)  # six whole blocks, then a partial one
    first, second = prefix + words(2, 60), prefix + words(3, 45)
    first_ids, second_ids = await tokenize(http, first), await tokenize(http, second)

    await complete(http, first)
    events = stored(await drain(subscriber))
    full = len(first_ids) // BLOCK_SIZE  # max_tokens=1: the reply's token is never computed
    assert [e.token_ids for e in events] and sum((e.token_ids for e in events), ()) == tuple(
        first_ids[: full * BLOCK_SIZE]
    )
    assert events[0].parent_block_hash is None
    chain = [h for e in events for h in e.block_hashes]
    for event in events[1:]:  # a later event continues the chain where the previous one stopped
        assert event.parent_block_hash == chain[chain.index(event.block_hashes[0]) - 1]
    for event in events:
        assert event.block_size == BLOCK_SIZE and event.medium == "GPU"
        assert event.lora_id is None and event.lora_name is None
        assert all(isinstance(h, int) and 0 <= h < 2**64 for h in event.block_hashes)
    assert len(chain) == full

    # The second prompt hits the shared whole blocks and stores only the rest, chained onto them.
    await complete(http, second)
    events = stored(await drain(subscriber))
    shared = 100 // BLOCK_SIZE
    assert events[0].parent_block_hash == chain[shared - 1]
    tail = sum((e.token_ids for e in events), ())
    assert tail == tuple(second_ids[shared * BLOCK_SIZE : len(second_ids) // BLOCK_SIZE * BLOCK_SIZE])
    assert not set(chain) & {h for e in events for h in e.block_hashes}

    # The same prompt under an adapter is another chain, from the first block on.
    await complete(http, first, model=ADAPTER)
    events = stored(await drain(subscriber))
    assert events[0].parent_block_hash is None
    assert {e.lora_name for e in events} == {ADAPTER} and all(e.lora_id is not None for e in events)
    assert sum((e.token_ids for e in events), ()) == tuple(first_ids[: full * BLOCK_SIZE])
    assert not set(chain) & {h for e in events for h in e.block_hashes}


async def test_eviction_removes_blocks_stored_before(
    http: httpx.AsyncClient, subscriber: KVEventSubscriber
) -> None:
    assert await reset(http)
    await drain(subscriber)
    prompts = [words(100 + i, 250) for i in range(6)]  # 15 whole blocks each: 90 > 64 blocks in all
    resident: set[int] = set()
    removed: list[int] = []
    first_blocks: list[int] = []
    for prompt in prompts:
        await complete(http, prompt)
        for batch in await drain(subscriber, 0.2):
            for event in batch.events:
                if isinstance(event, BlockStored):
                    resident.update(event.block_hashes)
                    first_blocks = first_blocks or list(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    for block_hash in event.block_hashes:
                        assert block_hash in resident, "removed a block never stored"
                        resident.remove(block_hash)
                        removed.append(block_hash)
    assert removed and len(resident) <= NUM_BLOCKS
    assert set(first_blocks) & set(removed)  # the oldest prompt lost blocks (LRU)

    # Sent again, the first prompt stores what it lost under the very same hashes.
    await complete(http, prompts[0])
    again = {h for e in stored(await drain(subscriber)) for h in e.block_hashes}
    assert again and again <= set(first_blocks) and again <= set(removed)


async def test_sequence_numbers_are_consecutive_and_replay_resends_them(
    http: httpx.AsyncClient, subscriber: KVEventSubscriber, live_emulator: LiveEmulator
) -> None:
    for i in range(3):
        await complete(http, words(200 + i, 70), max_tokens=40)  # prompt and reply blocks
    batches = await drain(subscriber)
    assert len(batches) >= 3
    seqs = [b.seq for b in batches]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert subscriber.missed == 0 and subscriber.malformed == 0
    assert all(b.topic == TOPIC and b.data_parallel_rank == 0 and b.ts > 1e9 for b in batches)

    # The engine is idle: a replay from an earlier batch on returns exactly what was received, then END.
    assert await subscriber.replay(live_emulator.replay, seqs[1]) == batches[1:]
    everything = await subscriber.replay(live_emulator.replay, 0)
    assert [b.seq for b in everything] == list(range(seqs[-1] + 1))  # numbered from 0, all still buffered
    assert everything[-len(batches) :] == batches


async def test_reset_prefix_cache_announces_all_blocks_cleared(
    http: httpx.AsyncClient, subscriber: KVEventSubscriber
) -> None:
    # Idle: the reset goes out at once, alone in its batch.
    assert await reset(http)
    async with asyncio.timeout(5):
        batch = await subscriber.recv()
    assert batch.events == (AllBlocksCleared(),)

    # With a request holding blocks, vLLM refuses, unless running requests are preempted first.
    prompt = words(300, 60)
    max_tokens = NUM_BLOCKS * BLOCK_SIZE - 61
    async with http.stream(
        "POST",
        "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True},
    ) as response:
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data: "):
                break  # the first token: the request is running
        assert not await reset(http)
        assert await reset(http, reset_running_requests="true")
        chunks = 1 + sum([1 async for line in lines if line.startswith("data: {")])
    assert chunks == max_tokens  # preempted, recomputed, finished
    batches = await drain(subscriber)
    events = [e for b in batches for e in b.events]
    cleared = events.index(AllBlocksCleared())
    recomputed = [e for e in events[cleared:] if isinstance(e, BlockStored)]
    assert recomputed[0].parent_block_hash is None
    assert recomputed[0].token_ids[:BLOCK_SIZE] == tuple(tokens.encode(prompt)[:BLOCK_SIZE])


def test_emulator_refuses_a_bad_config_or_a_busy_endpoint(live_emulator: LiveEmulator) -> None:
    def run(config: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "brickyard", "emulator", "--port", str(free_port())]
        return subprocess.run(
            [*argv, "--kv-events-config", config], capture_output=True, text=True, timeout=60, check=False
        )

    bad = run('{"enable_kv_cache_events": true, "publisher": "kafka"}')
    assert bad.returncode != 0 and "unknown KV event publisher 'kafka'" in bad.stderr
    port = live_emulator.events.rsplit(":", 1)[1]
    busy = run(json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{port}"}))
    assert busy.returncode != 0 and "cannot open the KV-event sockets" in busy.stderr
