"""Paged KV cache with automatic prefix caching, shaped like vLLM V1's ``BlockPool`` and ``KVCacheManager``.

Blocks hold ``block_size`` tokens. A full block is named by a chain hash of its parent's hash, its token ids
and the LoRA adapter, so equal prefixes (under the same adapter) map to equal names. Blocks nobody uses stay
cached in an LRU free queue until an allocation needs them: a request frees its blocks tail first, so the
private end of a prompt is evicted before the shared head.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emulator.engine.request import RequestState

#: Parent hash of a request's first block.
NONE_HASH = 0


def hash_block(parent: int, token_ids: tuple[int, ...], lora_id: int) -> int:
    """Name of a full block. Python's tuple-of-int hash is stable across processes and fast."""
    return hash((parent, token_ids, lora_id))


class BlockPool:
    """All KV blocks of the GPU: reference counts, the prefix-cache map, and the free queue.

    The free queue is ordered least recently freed first. Allocation takes from its head; a block that
    still holds a cached prefix loses its name then (eviction). A cache hit on a free block takes it out
    of the queue.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        #: hash -> block holding it (one block per hash; see docs/emulator-model.md).
        self.cached: dict[int, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's ``kv_cache_usage_perc``); cached free ones are free."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        ref_cnt, free_queue = self.ref_cnt, self.free_queue
        for block in block_ids:
            if ref_cnt[block] == 0:
                del free_queue[block]
            ref_cnt[block] += 1

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the head of the free queue, evicting the prefixes they cached."""
        popitem, ref_cnt, block_hash = self.free_queue.popitem, self.ref_cnt, self.block_hash
        blocks = []
        for _ in range(count):
            block = popitem(last=False)[0]
            cached_hash = block_hash[block]
            if cached_hash is not None:
                block_hash[block] = None
                if self.cached.get(cached_hash) == block:
                    del self.cached[cached_hash]
            ref_cnt[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference; blocks nobody uses join the tail of the free queue in the given order."""
        ref_cnt, free_queue = self.ref_cnt, self.free_queue
        for block in block_ids:
            ref_cnt[block] -= 1
            if ref_cnt[block] == 0:
                free_queue[block] = None

    def cache(self, block: int, block_hash: int) -> None:
        """Name a block that just became full, unless another block already holds that prefix."""
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash


@dataclass(slots=True)
class PrefixCacheStats:
    """Token counts of prefix-cache lookups, vLLM semantics; re-lookups of preempted requests kept apart."""

    queries: int = 0
    hits: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0


class KVCacheManager:
    """Per-request block tables over a ``BlockPool``: lookup of cached prefixes, allocation, freeing."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: RequestState) -> tuple[list[int], int]:
        """Longest run of leading full blocks already cached, and the tokens they cover.

        Never the whole prompt: the last token must be computed to produce logits, as in vLLM.
        """
        if not self.enable_caching:
            return [], 0
        block_size = self.block_size
        max_blocks = (request.num_tokens - 1) // block_size
        self._hash_blocks(request, max_blocks)
        cached = self.pool.cached
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * block_size
        stats = self.stats
        if request.num_preemptions:
            stats.preempted_queries += request.num_tokens
            stats.preempted_hits += num_hit_tokens
        else:
            stats.queries += request.num_tokens
            stats.hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self, request: RequestState, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens (after ``computed_blocks``, the prefix
        hits of a request being admitted). False, changing nothing, when the free blocks do not suffice."""
        block_size = self.block_size
        num_computed = request.num_computed_tokens + len(computed_blocks) * block_size
        total = num_computed + num_new_tokens
        pool = self.pool
        num_needed = -(-total // block_size) - len(request.block_ids) - len(computed_blocks)
        if computed_blocks:
            evictable = sum(1 for block in computed_blocks if pool.ref_cnt[block] == 0)
            if num_needed > len(pool.free_queue) - evictable:
                return False
            pool.touch(computed_blocks)
            request.block_ids.extend(computed_blocks)
            request.num_cached_blocks = len(computed_blocks)
        elif num_needed > len(pool.free_queue):
            return False
        if num_needed > 0:
            request.block_ids.extend(pool.allocate(num_needed))
        if self.enable_caching:
            # vLLM names blocks when they are scheduled, so a request admitted in the same step can hit them.
            self.cache_full_blocks(request, min(total, request.num_tokens))
        return True

    def cache_full_blocks(self, request: RequestState, num_tokens: int) -> None:
        """Register the request's blocks that ``num_tokens`` tokens fill completely."""
        num_full = num_tokens // self.block_size
        start = request.num_cached_blocks
        if num_full <= start:
            return
        self._hash_blocks(request, num_full)
        cache, block_ids, hashes = self.pool.cache, request.block_ids, request.block_hashes
        for index in range(start, num_full):
            cache(block_ids[index], hashes[index])
        request.num_cached_blocks = num_full

    def free(self, request: RequestState) -> None:
        """Release a finished or preempted request's blocks, tail first (evicted first)."""
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_cached_blocks = 0

    def blocks_needed(self, request: RequestState, num_new_tokens: int) -> int:
        """New blocks the request would need to hold ``num_new_tokens`` more tokens."""
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_ids))

    def _hash_blocks(self, request: RequestState, num_blocks: int) -> None:
        """Extend the request's chain of block hashes to its first ``num_blocks`` full blocks."""
        hashes = request.block_hashes
        start = len(hashes)
        if start >= num_blocks:
            return
        block_size, lora = self.block_size, request.lora_id
        parent = hashes[-1] if hashes else NONE_HASH
        prompt_blocks = min(num_blocks, request.num_prompt_tokens // block_size)
        if start < prompt_blocks:
            # Whole prompt blocks, cut by zip over one iterator: the common, hot case.
            tokens = iter(request.prompt[start * block_size : prompt_blocks * block_size])
            for token_ids in zip(*[tokens] * block_size, strict=False):
                parent = hash((parent, token_ids, lora))
                hashes.append(parent)
            start = prompt_blocks
        for index in range(start, num_blocks):
            lo = index * block_size
            parent = hash_block(parent, request.token_ids(lo, lo + block_size), lora)
            hashes.append(parent)
