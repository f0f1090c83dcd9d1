"""The paged KV cache with prefix caching: hash chains, LRU eviction, hits on free blocks, counts."""

from emulator.engine import KVCacheManager, Request
from emulator.engine.request import RequestState

BLOCK = 16


def state(request_id: str, prompt: list[int], lora: str | None = None, max_tokens: int = 4) -> RequestState:
    return RequestState.from_request(Request(request_id, prompt, max_tokens, lora=lora), 0.0)


def admit(kv: KVCacheManager, request: RequestState) -> int:
    """Look up and allocate a whole prompt, as the scheduler does for a new request; returns tokens hit."""
    blocks, hit_tokens = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - hit_tokens, blocks)
    request.num_computed_tokens = request.num_tokens
    return hit_tokens


def test_block_hashes_chain_over_prefixes() -> None:
    kv = KVCacheManager(64, BLOCK)
    shared = list(range(32))
    a, b = state("a", [*shared, *range(100, 116), 7]), state("b", [*shared, *range(200, 216), 7])
    admit(kv, a)
    admit(kv, b)
    assert a.block_hashes[:2] == b.block_hashes[:2]
    assert a.block_hashes[2] != b.block_hashes[2]
    # Same tokens after a different prefix name a different block: the chain, not the tokens, is the name.
    c = state("c", [*range(300, 316), *shared[16:32], 7])
    admit(kv, c)
    assert c.block_hashes[1] != a.block_hashes[1]


def test_adapter_is_part_of_the_key() -> None:
    kv = KVCacheManager(64, BLOCK)
    prompt = list(range(40))
    admit(kv, state("base", prompt))
    assert admit(kv, state("lora", prompt, lora="sql")) == 0
    assert admit(kv, state("lora2", prompt, lora="sql")) == 32
    assert admit(kv, state("base2", prompt)) == 32


def test_lookup_never_covers_the_whole_prompt() -> None:
    kv = KVCacheManager(64, BLOCK)
    prompt = list(range(32))  # exactly two full blocks
    admit(kv, state("a", prompt))
    assert admit(kv, state("b", prompt)) == 16  # the last token must be computed


def test_hit_on_a_free_cached_block_takes_it_off_the_free_queue() -> None:
    kv = KVCacheManager(8, BLOCK)
    a = state("a", list(range(40)))
    admit(kv, a)
    kv.free(a)
    assert kv.pool.num_free == 8 and kv.usage == 0.0
    b = state("b", list(range(40)))
    assert admit(kv, b) == 32
    first = b.block_ids[0]
    assert first not in kv.pool.free_queue and kv.pool.ref_cnt[first] == 1
    assert kv.pool.num_free == 5  # two hits + one new block for the tail
    assert kv.usage == 3 / 8


def test_shared_blocks_are_reference_counted() -> None:
    kv = KVCacheManager(16, BLOCK)
    a, b = state("a", list(range(40))), state("b", list(range(40)))
    admit(kv, a)
    admit(kv, b)
    assert kv.pool.ref_cnt[a.block_ids[0]] == 2
    kv.free(a)
    assert kv.pool.ref_cnt[b.block_ids[0]] == 1 and b.block_ids[0] not in kv.pool.free_queue


def test_eviction_takes_the_least_recently_freed_and_the_tail_first() -> None:
    kv = KVCacheManager(6, BLOCK)
    a = state("a", list(range(49)))  # 3 full blocks + 1 token: 4 blocks
    admit(kv, a)
    head, middle, tail = a.block_hashes
    kv.free(a)  # free queue: the 2 never-used blocks, then a's blocks tail first
    b = state("b", list(range(1000, 1033)))  # needs 3 blocks: 2 never used + a's partial last block
    admit(kv, b)
    assert {head, middle, tail} <= kv.pool.cached.keys()
    c = state("c", list(range(2000, 2017)))  # 2 blocks: evicts a's tail, then its middle block
    admit(kv, c)
    assert tail not in kv.pool.cached and middle not in kv.pool.cached
    assert head in kv.pool.cached
    assert kv.get_computed_blocks(state("d", list(range(49))))[1] == 16  # the shared head survived


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(4, BLOCK)
    a = state("a", list(range(40)))
    admit(kv, a)  # 3 blocks
    big = state("big", list(range(500, 540)))
    before = (kv.pool.num_free, list(kv.pool.free_queue), dict(kv.pool.cached))
    assert not kv.allocate_slots(big, big.num_tokens)
    assert (kv.pool.num_free, list(kv.pool.free_queue), dict(kv.pool.cached)) == before
    assert big.block_ids == []


def test_prefix_cache_counts_tokens_and_keeps_preempted_lookups_apart() -> None:
    kv = KVCacheManager(32, BLOCK)
    admit(kv, state("a", list(range(50))))
    admit(kv, state("b", list(range(50))))
    assert (kv.stats.queries, kv.stats.hits) == (100, 48)
    resumed = state("c", list(range(50)))
    resumed.num_preemptions = 1
    admit(kv, resumed)
    assert (kv.stats.queries, kv.stats.hits) == (100, 48)
    assert (kv.stats.preempted_queries, kv.stats.preempted_hits) == (50, 48)


def test_disabled_prefix_caching_never_hits() -> None:
    kv = KVCacheManager(32, BLOCK, enable_caching=False)
    admit(kv, state("a", list(range(50))))
    assert admit(kv, state("b", list(range(50)))) == 0
    assert kv.pool.cached == {} and kv.stats.queries == 0
