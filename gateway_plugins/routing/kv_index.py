"""The engines' own prefix caches, mirrored exactly from their KV-cache events.

Each engine reports every block that enters its prefix cache (``BlockStored``: the block's tokens, its
parent) and every block it evicts (``BlockRemoved``), in its own block size. This index keeps, per pod,
the set of resident blocks, each named by *our* chained hash of its token ids: xxhash64 over the block's
ids, seeded by the parent block's name (by the LoRA adapter's name for a first block). A request's
prompt, tokenized as the engine tokenizes it, is cut into blocks of the pod's block size and named the
same way, so a lookup needs no engine hash function, salt or Python hash seed: equal names mean the same
tokens after the same prefix, under the same adapter.

The engines' names for blocks are kept only to translate parents and evictions (``BlockRemoved`` names
blocks by the engine's hash). All pods share one table from a block name to the pods holding it (a bit
mask), so matching a prompt walks its blocks once, whatever the number of pods.

Which pods' entries are trusted: a pod is ``live`` once the index has its complete event history (its
first batch is sequence 0, or a replay from 0 covered it) or its cache was cleared, and stays live
while sequence numbers follow each other. A gap (messages dropped at a high-water mark, a reconnect)
makes it ``uncertain`` for ``resync_seconds``: what was missed heals as blocks are stored and evicted
again, and meanwhile strategies route that pod on the approximate index.

Between routing a request and its blocks' events arriving, the request's blocks are held
*speculatively* for the chosen pod for ``speculative_seconds``, so a burst of one new prefix does not
scatter; predictions of cached tokens (what the engine will report) use confirmed blocks only.

Pure data and plain calls, no I/O: the gateway's event feed and the simulator drive it the same way.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import xxhash

from gateway_plugins.kv_events.decode import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent
from gateway_plugins.routing.types import PodState

PodKey = tuple[str, str]  # (namespace, name)

#: The medium of blocks in the engine's own KV cache (``None`` from engines that do not say).
_RESIDENT_MEDIA = frozenset({None, "GPU"})


class PodSync(StrEnum):
    """How far a pod's entries can be trusted."""

    LIVE = "live"  # complete history, no gap: routed on the exact index
    UNCERTAIN = "uncertain"  # a gap or an incomplete start: routed approximately until it heals


@dataclass(slots=True)
class _PodBlocks:
    bit: int
    sync: PodSync = PodSync.UNCERTAIN
    uncertain_until: float = float("inf")
    block_size: int = 0
    #: The engine's block name -> ours, for the blocks resident now.
    names: dict[BlockHash, int] = field(default_factory=dict)
    #: Engine names held in more than one block (vLLM may cache equal blocks twice): how many.
    copies: dict[BlockHash, int] = field(default_factory=dict)
    last_seq: int | None = None


class KvBlockIndex:
    """Which blocks each pod's engine holds, from its KV events (module docstring)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        resync_seconds: float = 30.0,
        speculative_seconds: float = 2.0,
    ) -> None:
        self.clock = clock
        self.resync_seconds = resync_seconds
        self.speculative_seconds = speculative_seconds
        self._pods: dict[PodKey, _PodBlocks] = {}
        self._free_bits: list[int] = []
        #: Block name -> mask of the pods holding it (confirmed by events).
        self._holders: dict[int, int] = {}
        #: Block name -> mask of the pods it was routed to and whose events have not confirmed it yet.
        self._speculative: dict[int, int] = {}
        self._speculation: deque[tuple[float, int, Sequence[int]]] = deque()
        self._seeds: dict[str, int] = {}
        #: Blocks whose parent the index does not know (stored before its history began): not indexed.
        self.orphan_blocks = 0
        #: Gaps in a pod's sequence numbers that no replay closed.
        self.gaps = 0
        #: Blocks the engines reported stored and evicted (their own cache's churn).
        self.stored_blocks = 0
        self.removed_blocks = 0

    # -- the event side ------------------------------------------------------------------------

    def _pod(self, key: PodKey) -> _PodBlocks:
        pod = self._pods.get(key)
        if pod is None:
            bit = self._free_bits.pop() if self._free_bits else len(self._pods)
            pod = self._pods[key] = _PodBlocks(1 << bit)
        return pod

    def apply(self, key: PodKey, seq: int, events: Iterable[KVEvent]) -> None:
        """One batch of a pod's events, in sequence order (replayed batches included)."""
        pod = self._pod(key)
        if pod.last_seq is None:
            if seq == 0:  # the engine's first batch ever: the history is complete
                self._set_live(pod)
            else:
                self._set_uncertain(pod)
        elif seq <= pod.last_seq:
            return  # already applied (a replay overlapping what arrived live)
        elif seq != pod.last_seq + 1:
            self.gaps += 1
            self._set_uncertain(pod)
        pod.last_seq = seq
        for event in events:
            if isinstance(event, BlockStored):
                self._store(pod, event)
            elif isinstance(event, BlockRemoved):
                if event.medium in _RESIDENT_MEDIA:
                    self.removed_blocks += len(event.block_hashes)
                    self._remove(pod, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                pod.copies.clear()
                self._remove(pod, list(pod.names))
                self._set_live(pod)

    def complete(self, key: PodKey) -> None:
        """The pod's history up to its last applied batch is known complete (a replay from 0 covered it,
        or the engine just started): it is live."""
        self._set_live(self._pod(key))

    def last_seq(self, key: PodKey) -> int | None:
        """The sequence number of the pod's last applied batch; None before its first."""
        pod = self._pods.get(key)
        return pod.last_seq if pod is not None else None

    def forget(self, key: PodKey) -> None:
        """The pod left: drop its blocks and free its bit for the next pod."""
        pod = self._pods.pop(key, None)
        if pod is None:
            return
        pod.copies.clear()
        self._remove(pod, list(pod.names))
        for name, mask in list(self._speculative.items()):
            if mask & pod.bit:
                self._unmark(self._speculative, name, pod.bit)
        self._free_bits.append(pod.bit.bit_length() - 1)

    def _set_live(self, pod: _PodBlocks) -> None:
        pod.sync, pod.uncertain_until = PodSync.LIVE, float("inf")

    def _set_uncertain(self, pod: _PodBlocks) -> None:
        pod.sync, pod.uncertain_until = PodSync.UNCERTAIN, self.clock() + self.resync_seconds

    def _store(self, pod: _PodBlocks, event: BlockStored) -> None:
        if event.medium not in _RESIDENT_MEDIA:
            return  # another tier (offloaded to CPU, ...): not a hit in the engine's own cache
        size = event.block_size
        pod.block_size = size
        parent = event.parent_block_hash
        lora = event.lora_name
        if parent is None:
            name = self._seed(lora or "")
        else:
            known = pod.names.get(parent)
            if known is None:
                self.orphan_blocks += len(event.block_hashes)
                return
            name = known
        extra = event.extra_keys
        plain = (lora,)  # vLLM names an adapter's blocks by its name too: the seed already says it
        tokens = array("I", event.token_ids).tobytes()
        step = 4 * size
        holders, bit, names, copies = self._holders, pod.bit, pod.names, pod.copies
        for i, engine_name in enumerate(event.block_hashes):
            if extra is not None and i < len(extra) and extra[i] is not None and tuple(extra[i]) != plain:
                # Named by more than tokens (media, a cache salt): no prompt matches it, nor its children.
                self.orphan_blocks += len(event.block_hashes) - i
                return
            name = xxhash.xxh64_intdigest(tokens[i * step : (i + 1) * step], name)
            if engine_name in names:  # the engine holds the same block twice: one removal each
                copies[engine_name] = copies.get(engine_name, 1) + 1
                continue
            names[engine_name] = name
            holders[name] = holders.get(name, 0) | bit
            self.stored_blocks += 1
            self._unmark(self._speculative, name, bit)

    def _remove(self, pod: _PodBlocks, engine_names: Iterable[BlockHash]) -> None:
        names, bit, copies = pod.names, pod.bit, pod.copies
        for engine_name in engine_names:
            count = copies.get(engine_name)
            if count is not None:
                if count > 2:
                    copies[engine_name] = count - 1
                else:
                    del copies[engine_name]
                continue
            name = names.pop(engine_name, None)
            if name is not None:
                self._unmark(self._holders, name, bit)

    @staticmethod
    def _unmark(table: dict[int, int], name: int, bit: int) -> None:
        mask = table.get(name, 0)
        if mask & bit:
            if mask == bit:
                del table[name]
            else:
                table[name] = mask & ~bit

    # -- the request side ----------------------------------------------------------------------

    def live(self, pod: PodState) -> bool:
        """Whether ``pod`` is routed on this index: its events are in sync and its block size known."""
        blocks = self._pods.get((pod.namespace, pod.name))
        if blocks is None or not blocks.block_size:
            return False
        if blocks.sync is PodSync.UNCERTAIN and self.clock() >= blocks.uncertain_until:
            self._set_live(blocks)
        return blocks.sync is PodSync.LIVE

    def block_size(self, pod: PodState) -> int:
        blocks = self._pods.get((pod.namespace, pod.name))
        return blocks.block_size if blocks is not None else 0

    def sync_states(self) -> dict[PodKey, PodSync]:
        return {key: pod.sync for key, pod in self._pods.items()}

    def block_names(self, ids: Sequence[int], block_size: int, adapter: str | None) -> list[int]:
        """The names of the full blocks of ``ids`` under ``adapter`` (None: the base model)."""
        data = array("I", ids).tobytes()
        step = 4 * block_size
        name = self._seed(adapter or "")
        digest = xxhash.xxh64_intdigest
        view = memoryview(data)
        names = []
        for start in range(0, len(data) // step * step, step):
            name = digest(view[start : start + step], name)
            names.append(name)
        return names

    def matched_blocks(
        self, names: Sequence[int], pods: Sequence[PodState], *, speculative: bool = True
    ) -> list[int]:
        """For each pod, how many leading blocks of ``names`` it holds (confirmed, or also speculative)."""
        bits = []
        alive = 0
        for pod in pods:
            blocks = self._pods.get((pod.namespace, pod.name))
            bit = blocks.bit if blocks is not None else 0
            bits.append(bit)
            alive |= bit
        depth: dict[int, int] = {}
        if speculative:
            self._expire(self.clock())
        holders, guesses = self._holders, self._speculative if speculative else {}
        for i, name in enumerate(names):
            if not alive:
                break
            held = alive & (holders.get(name, 0) | guesses.get(name, 0))
            dropped = alive & ~held
            while dropped:
                low = dropped & -dropped
                depth[low] = i
                dropped ^= low
            alive = held
        return [depth.get(bit, len(names)) if bit else 0 for bit in bits]

    def speculate(self, names: Sequence[int], pod: PodState) -> None:
        """``pod`` was sent a prompt with these blocks: count them held until its events say otherwise."""
        blocks = self._pods.get((pod.namespace, pod.name))
        if blocks is None or not names:
            return
        bit, guesses = blocks.bit, self._speculative
        fresh = [name for name in names if not self._holders.get(name, 0) & bit]
        for name in fresh:
            guesses[name] = guesses.get(name, 0) | bit
        if fresh:
            self._speculation.append((self.clock() + self.speculative_seconds, bit, fresh))

    def _expire(self, now: float) -> None:
        queue = self._speculation
        while queue and queue[0][0] <= now:
            _, bit, names = queue.popleft()
            for name in names:
                self._unmark(self._speculative, name, bit)

    def _seed(self, adapter: str) -> int:
        seed = self._seeds.get(adapter)
        if seed is None:
            seed = self._seeds[adapter] = xxhash.xxh64_intdigest(adapter.encode())
        return seed

    def blocks_held(self, pod: PodState) -> int:
        blocks = self._pods.get((pod.namespace, pod.name))
        return len(blocks.names) if blocks is not None else 0
