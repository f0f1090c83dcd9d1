"""Paged KV cache with automatic prefix caching, shaped like vLLM V1's ``BlockPool`` and ``KVCacheManager``.

Blocks hold ``block_size`` tokens. A full block is named by a chain hash of its parent's hash, its token ids
and the LoRA adapter, so equal prefixes (under the same adapter) map to equal names. Blocks nobody uses stay
cached in an LRU free queue until an allocation needs them: a request frees its blocks tail first, so the
private end of a prompt is evicted before the shared head.

With ``BlockPool.events`` set to a list, every change to the prefix cache is appended to it as it happens,
in vLLM's KV-event terms (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``; ``emulator/kv_events.py``
publishes them). Left ``None`` (the fleet simulator), recording costs one ``None`` check per eviction or
naming and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emulator.engine.request import RequestState, reply_windows

#: Parent hash of a request's first block.
NONE_HASH = 0

#: Events carry block hashes as unsigned 64-bit ints, as vLLM does (it keeps the low 64 bits of its hashes).
_UINT64 = (1 << 64) - 1


def external_hash(block_hash: int) -> int:
    """A block hash as KV events carry it: Python's signed 64-bit hash mapped onto unsigned 64 bits."""
    return block_hash & _UINT64


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive blocks of one request entered the prefix cache (vLLM's event of the same name).

    ``token_ids`` are all their tokens, concatenated; ``parent_block_hash`` is the hash of the block before
    the first one, None for a request's first block. Hashes are ``external_hash`` values.
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    lora_name: str | None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """A cached block lost its name to an allocation (eviction); one event per block, as vLLM sends them."""

    block_hash: int


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The prefix cache was reset."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


def hash_block(parent: int, token_ids: tuple[int, ...], lora_id: int) -> int:
    """Name of a full block. Python's tuple-of-int hash is stable across processes and fast."""
    return hash((parent, token_ids, lora_id))


class BlockPool:
    """All KV blocks of the GPU: reference counts, the prefix-cache map, and the free queue.

    The free queue is ordered least recently freed first. Allocation takes from its head; a block that
    still holds a cached prefix loses its name then (eviction). A cache hit on a free block takes it out
    of the queue.

    A block is free (in the queue, no reference), or held by one request, or shared by several through
    prefix hits; only the last kind stores a count (``shared``: references beyond the first), so
    allocating and freeing unshared blocks, nearly all of them, writes no count.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        #: The name each block holds; ``block_hash[b] == h`` exactly when ``cached[h] == b``.
        self.block_hash: list[int | None] = [None] * num_blocks
        #: hash -> block holding it (one block per hash; see docs/emulator-model.md).
        self.cached: dict[int, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        #: block -> references beyond the first, for blocks several requests hold.
        self.shared: dict[int, int] = {}
        #: Prefix-cache changes in the order they happened, when someone listens (see the module docstring).
        self.events: list[KVCacheEvent] | None = None

    @property
    def ref_cnt(self) -> _RefCounts:
        """``ref_cnt[block]``: how many requests hold the block (0: it is free)."""
        return _RefCounts(self)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's ``kv_cache_usage_perc``); cached free ones are free."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        shared, free_queue = self.shared, self.free_queue
        for block in block_ids:
            if block in free_queue:
                del free_queue[block]
            else:
                shared[block] = shared.get(block, 0) + 1

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the head of the free queue, evicting the prefixes they cached."""
        popitem, block_hash, cached = self.free_queue.popitem, self.block_hash, self.cached
        blocks = [popitem(False)[0] for _ in range(count)]  # positional: no keyword parsing per block
        for block in blocks:
            cached_hash = block_hash[block]
            if cached_hash is not None:
                block_hash[block] = None
                del cached[cached_hash]
                if self.events is not None:
                    self.events.append(BlockRemoved(cached_hash & _UINT64))
        return blocks

    def allocate_one(self) -> int:
        """``allocate(1)`` without the list: a decode crossing into a new block."""
        block = self.free_queue.popitem(False)[0]
        cached_hash = self.block_hash[block]
        if cached_hash is not None:
            self.block_hash[block] = None
            del self.cached[cached_hash]
            if self.events is not None:
                self.events.append(BlockRemoved(cached_hash & _UINT64))
        return block

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference; blocks nobody uses join the tail of the free queue in the given order."""
        shared, free_queue = self.shared, self.free_queue
        if not shared:
            for block in block_ids:
                free_queue[block] = None
            return
        for block in block_ids:
            extra = shared.get(block)
            if extra is None:
                free_queue[block] = None
            elif extra == 1:
                del shared[block]
            else:
                shared[block] = extra - 1

    def cache(self, block: int, block_hash: int) -> bool:
        """Name a block that just became full, unless another block already holds that prefix (False)."""
        if block_hash in self.cached:
            return False
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        return True

    def reset(self) -> bool:
        """Forget every name (vLLM's ``reset_prefix_cache``); refused (False) while any block is held."""
        if len(self.free_queue) != self.num_blocks:
            return False
        self.cached.clear()
        self.block_hash[:] = [None] * self.num_blocks
        if self.events is not None:
            self.events.append(AllBlocksCleared())
        return True


class _RefCounts:
    """Read-only view of the reference counts (``BlockPool.ref_cnt``), for tests and inspection."""

    __slots__ = ("_pool",)

    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool

    def __getitem__(self, block: int) -> int:
        pool = self._pool
        return 0 if block in pool.free_queue else 1 + pool.shared.get(block, 0)

    def __len__(self) -> int:
        return self._pool.num_blocks


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
        #: Every block-sized window of the reply ordering: a reply block's tokens, by phase.
        self._reply_blocks = reply_windows(block_size)
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
            evictable = sum(1 for block in computed_blocks if block in pool.free_queue)
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
        block_ids, hashes = request.block_ids, request.block_hashes
        cached, names = self.pool.cached, self.pool.block_hash
        for index in range(start, num_full):
            block_hash = hashes[index]
            if block_hash not in cached:  # else another block holds this prefix: it keeps the name
                block = block_ids[index]
                cached[block_hash] = block
                names[block] = block_hash
        request.num_cached_blocks = num_full
        if self.pool.events is not None:
            self.record_stored(request, start, num_full)

    def cache_next_block(self, request: RequestState) -> None:
        """``cache_full_blocks`` for a decode whose token just filled the block after its cached ones."""
        index = request.num_cached_blocks
        self._hash_blocks(request, index + 1)
        pool = self.pool
        if pool.cache(request.block_ids[index], request.block_hashes[index]) and pool.events is not None:
            self.record_stored(request, index, index + 1)
        request.num_cached_blocks = index + 1

    def record_stored(self, request: RequestState, start: int, end: int) -> None:
        """``BlockStored`` events for the request's blocks ``start .. end-1`` that were just named.

        A block whose name another block already held stays unnamed (one block per hash), so it is left
        out, splitting the run: what was stored minus what was removed is always exactly the cached set.
        """
        events = self.pool.events
        assert events is not None
        names, block_ids, hashes = self.pool.block_hash, request.block_ids, request.block_hashes
        block_size, lora = self.block_size, request.lora
        lora_id = request.lora_id if lora is not None else None
        run: list[int] = []
        tokens: list[int] = []
        first = start
        for index in range(start, end + 1):
            if index < end and names[block_ids[index]] == hashes[index]:
                if not run:
                    first = index
                run.append(hashes[index] & _UINT64)
                tokens.extend(request.token_ids(index * block_size, (index + 1) * block_size))
            elif run:
                parent = hashes[first - 1] & _UINT64 if first else None
                events.append(BlockStored(tuple(run), parent, tuple(tokens), block_size, lora_id, lora))
                run, tokens = [], []

    def hash_ahead(self, request: RequestState) -> None:
        """Hash every block the request will fill, reply included (its reply is fixed by its prompt).

        Done once when a request starts decoding, in one loop, so that naming the block a decode fills,
        every ``block_size`` steps of every running request, is a list lookup. Lookups never read hashes
        beyond the request's current tokens, so hashing early changes nothing else.
        """
        if self.enable_caching:
            last_computed = request.num_prompt_tokens + request.max_tokens - 1
            self._hash_blocks(request, last_computed // self.block_size)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; False (nothing changes) while a request holds blocks, as in vLLM."""
        return self.pool.reset()

    def free(self, request: RequestState) -> None:
        """Release a finished or preempted request's blocks, tail first (evicted first)."""
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_cached_blocks = 0

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
        if start < num_blocks and start * block_size < request.num_prompt_tokens:
            # The block holding the end of the prompt and the start of the reply.
            lo = start * block_size
            parent = hash_block(parent, request.token_ids(lo, lo + block_size), lora)
            hashes.append(parent)
            start += 1
        # Whole reply blocks: windows of the reply ordering.
        reply_blocks = self._reply_blocks
        phase = request.reply_phase - request.num_prompt_tokens
        for index in range(start, num_blocks):
            parent = hash((parent, reply_blocks[(phase + index * block_size) % len(reply_blocks)], lora))
            hashes.append(parent)
