"""Prefix-cache-aware routing: send a prompt where its prefix is probably still cached.

``PrefixIndex`` is the gateway's approximate mirror of each engine's prefix
cache. A prompt is cut into blocks (``block_tokens`` token ids when they are
known: the client sent ids or the model's tokenizer is configured; else ``block_tokens`` x 4 bytes of
text); block i is identified by an
xxhash64 chained through blocks 0..i and seeded by the model (or adapter) name,
so equal hashes mean equal prefixes. When a pod is chosen, the prompt's blocks
are recorded against it in a per-pod LRU; blocks expire after a TTL. Blocks are
recorded deepest first, so a pod's LRU evicts the tail of a prefix before its
head, as engines do: what a pod holds stays prefix-closed, and the longest
match is found by binary search.

Two strategies read it:

* ``prefix-cache``: the longest match wins, unless the pod is overloaded (the
  load guard) or the match covers under ``min_match_ratio`` of the prompt; ties
  and non-matches go to the pod with the fewest requests in flight.
* ``prefix-cache-and-load``: the Preble idea, cost-based. Each pod's cost is the
  prefill work this request would queue behind plus its own uncached tokens,
  in seconds at that pod's measured prefill speed; the cheapest pod wins.
"""

from __future__ import annotations

import math
import statistics
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar, Self

import xxhash

from gateway_plugins.config import LoadGuardSettings, PrefixCacheSettings
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.strategies.base import FallbackScores, Stateless, StrategyContext, overloaded
from gateway_plugins.routing.strategies.registry import strategy
from gateway_plugins.routing.types import CHARS_PER_TOKEN, PodState, PrefixPrediction, RoutingRequest


class PrefixIndex:
    """Which prompt blocks each pod was recently sent: an approximation of its prefix cache."""

    def __init__(
        self,
        settings: PrefixCacheSettings,
        clock: Callable[[], float],
    ) -> None:
        self.block_tokens = settings.block_tokens
        self.max_blocks = settings.max_blocks
        self.capacity_blocks = settings.capacity_blocks
        self.ttl = settings.ttl_seconds
        self.clock = clock
        #: Per pod: block hash -> time last sent, least recently sent first.
        self._pods: weakref.WeakKeyDictionary[PodState, OrderedDict[int, float]] = weakref.WeakKeyDictionary()
        self._seeds: dict[str, int] = {}

    def block_hashes(self, request: RoutingRequest) -> list[int]:
        """The chained hashes of the prompt's full blocks (at most ``max_blocks``); memoised per request."""
        hashes = request.memo.get(self)
        if hashes is not None:
            return hashes
        ids = request.prompt_token_ids
        if ids is not None:
            data = array("I", ids[: self.block_tokens * self.max_blocks]).tobytes()
            step = 4 * self.block_tokens
        else:
            data = request.prompt_text.encode()
            step = CHARS_PER_TOKEN * self.block_tokens
        seed = self._seeds.get(request.model)
        if seed is None:
            seed = self._seeds[request.model] = xxhash.xxh64_intdigest(request.model.encode())
        view = memoryview(data)
        digest = xxhash.xxh64_intdigest
        hashes = []
        for start in range(0, min(len(data) // step, self.max_blocks) * step, step):
            seed = digest(view[start : start + step], seed)
            hashes.append(seed)
        request.memo[self] = hashes
        return hashes

    def matched_blocks(self, hashes: Sequence[int], pods: Sequence[PodState]) -> list[int]:
        """For each pod, how many leading blocks of ``hashes`` it holds."""
        if not hashes:
            return [0] * len(pods)
        now = self.clock()
        first = hashes[0]
        result = []
        for pod in pods:
            blocks = self._pods.get(pod)
            if blocks is None or first not in blocks:
                result.append(0)
                continue
            self._expire(blocks, now)
            low, high = 0, len(hashes)  # invariant: holds hashes[:low], lacks hashes[high] if high < len
            while low < high:
                middle = (low + high + 1) // 2
                if hashes[middle - 1] in blocks:
                    low = middle
                else:
                    high = middle - 1
            result.append(low)
        return result

    def record(self, hashes: Sequence[int], pod: PodState) -> None:
        """``pod`` was sent a prompt with these blocks: they are its most recently used."""
        if not hashes:
            return
        blocks = self._pods.get(pod)
        if blocks is None:
            blocks = self._pods[pod] = OrderedDict()
        now = self.clock()
        move = blocks.move_to_end
        for block in reversed(hashes):  # deepest first: the head of the prefix is evicted last
            if block in blocks:
                move(block)
            blocks[block] = now
        capacity = self.capacity_blocks
        metrics = pod.metrics
        if metrics is not None and metrics.num_blocks:
            capacity = max(1, metrics.num_blocks * metrics.block_size // self.block_tokens)
        while len(blocks) > capacity:
            blocks.popitem(last=False)
        self._expire(blocks, now)

    def _expire(self, blocks: OrderedDict[int, float], now: float) -> None:
        oldest = now - self.ttl
        while blocks and next(iter(blocks.values())) < oldest:
            blocks.popitem(last=False)

    def blocks_held(self, pod: PodState) -> int:
        """Blocks remembered for ``pod``."""
        blocks = self._pods.get(pod)
        return len(blocks) if blocks is not None else 0

    def size(self) -> int:
        """Blocks remembered over all pods."""
        return sum(len(blocks) for blocks in self._pods.values())

    @staticmethod
    def shared(context: StrategyContext) -> PrefixIndex:
        """The one index every strategy of a gateway reads (and teaches), whatever number use it."""
        settings = context.settings.prefix_cache
        return context.shared(PrefixIndex, lambda: PrefixIndex(settings, context.clock))


class PrefixMatcher:
    """How many of a prompt's tokens each pod holds: from the engines' own events (``KvBlockIndex``) for
    pods whose events are live and the prompt's token ids are known, from the approximate index otherwise.

    Matches are in tokens, capped as the engine caps a prefix hit (never the prompt's last token, in
    whole blocks), so pods of either kind compare. Leaves on the request which index the chosen pod was
    matched on and what it is expected to report as cached (``RoutingRequest.predicted``).
    """

    def __init__(self, approximate: PrefixIndex, exact: KvBlockIndex | None) -> None:
        self.approximate = approximate
        self.exact = exact

    @staticmethod
    def shared(context: StrategyContext) -> PrefixMatcher:
        """The one matcher (and indexes) every prefix strategy of a gateway reads and teaches."""
        return context.shared(
            PrefixMatcher, lambda: PrefixMatcher(PrefixIndex.shared(context), context.kv_index)
        )

    def matched_tokens(self, request: RoutingRequest, pods: Sequence[PodState]) -> list[int]:
        """Per pod, the prompt tokens it holds (memoised per request and candidate list)."""
        memo = request.memo.get(self)
        if memo is not None and memo[0] is pods:
            return memo[1]
        by_position = self._exact_pods(request, pods)
        others = [i for i in range(len(pods)) if i not in by_position]
        if others:
            guessed = self._approximate(request, [pods[i] for i in others])
            by_position.update(zip(others, guessed, strict=True))
        matched = [by_position[i] for i in range(len(pods))]
        request.memo[self] = (pods, matched)
        return matched

    def _approximate(self, request: RoutingRequest, pods: Sequence[PodState]) -> list[int]:
        index = self.approximate
        step, cap = index.block_tokens, max(0, request.prompt_tokens - 1)
        return [min(blocks * step, cap) for blocks in index.matched_blocks(index.block_hashes(request), pods)]

    def _exact_pods(self, request: RoutingRequest, pods: Sequence[PodState]) -> dict[int, int]:
        """Matched tokens of the pods routed on the exact index, by position."""
        index = self.exact
        if index is None:
            return {}
        live = [i for i, pod in enumerate(pods) if index.live(pod)]
        if not live or request.prompt_token_ids is None:
            return {}
        result: dict[int, int] = {}
        for size, positions in _by_block_size(index, pods, live).items():
            names = self._names(request, size, pods[positions[0]])
            cap = (len(request.prompt_token_ids) - 1) // size
            for i, blocks in zip(
                positions, index.matched_blocks(names, [pods[i] for i in positions]), strict=True
            ):
                result[i] = min(blocks, cap) * size
        return result

    def _names(self, request: RoutingRequest, size: int, pod: PodState) -> list[int]:
        key = (self, size)
        names = request.memo.get(key)
        if names is None:
            ids = request.prompt_token_ids
            assert ids is not None and self.exact is not None
            adapter = request.model if request.model != pod.model else None
            names = request.memo[key] = self.exact.block_names(ids, size, adapter)
        return names

    def record(self, request: RoutingRequest, pod: PodState) -> None:
        """``pod`` was chosen: predict what its engine will report cached, and teach both indexes."""
        approximate = self.approximate
        guessed = self._approximate(request, [pod])[0]
        index = self.exact
        if index is not None and index.live(pod) and request.prompt_token_ids is not None:
            size = index.block_size(pod)
            names = self._names(request, size, pod)
            confirmed = index.matched_blocks(names, [pod], speculative=False)[0]
            cached = min(confirmed, (len(request.prompt_token_ids) - 1) // size) * size
            request.predicted = PrefixPrediction("exact", cached, guessed // size * size)
            index.speculate(names, pod)
        else:
            size = pod.metrics.block_size if pod.metrics is not None and pod.metrics.block_size else 1
            guessed = guessed // size * size  # engines hit whole blocks
            request.predicted = PrefixPrediction("approximate", guessed, guessed)
        approximate.record(approximate.block_hashes(request), pod)


def _by_block_size(
    index: KvBlockIndex, pods: Sequence[PodState], positions: Sequence[int]
) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i in positions:
        groups.setdefault(index.block_size(pods[i]), []).append(i)
    return groups


class _PrefixLearner(Stateless):
    """Reads the shared matcher within the load guard; teaches it the chosen pod."""

    def __init__(
        self,
        index: PrefixIndex,
        settings: PrefixCacheSettings,
        guard: LoadGuardSettings,
        exact: KvBlockIndex | None = None,
        *,
        matcher: PrefixMatcher | None = None,
    ) -> None:
        self.matcher = matcher or PrefixMatcher(index, exact)
        self.index = self.matcher.approximate
        self.min_match_ratio = settings.min_match_ratio
        self.guard = guard

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Self:
        settings = context.settings
        matcher = PrefixMatcher.shared(context)
        return cls(matcher.approximate, settings.prefix_cache, settings.load_guard, matcher=matcher)

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        self.matcher.record(request, pod)


@strategy("prefix-cache")
class PrefixCacheStrategy(_PrefixLearner):
    """Longest cached prefix, within the load guard; least in-flight requests otherwise."""

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        matched = self.matcher.matched_tokens(request, pods)
        guard = overloaded(pods, self.guard)
        least = min(pod.load for pod in pods)
        spread = max(pod.load for pod in pods) - least + 1
        floor = self.min_match_ratio * request.prompt_tokens
        unit = self.index.block_tokens
        # Matches count in blocks of the approximate index's size (whatever index found them), and whole
        # blocks dominate; within equal matches, lighter load wins (the fraction is < 1).
        return [
            (0 if blocked or tokens < floor else tokens / unit) + (1 - (pod.load - least) / spread) / 2
            for pod, tokens, blocked in zip(pods, matched, guard, strict=True)
        ]


@strategy("prefix-cache-and-load", aliases=("prefix-cache-preble",))
class PrefixCacheAndLoadStrategy(_PrefixLearner):
    """Preble's exploit-or-explore rule with a prefill cost model.

    Exploit: when some pod within the load guard holds at least ``min_match_ratio`` of the prompt,
    the request goes to a pod holding the longest such match (the cheapest of them, if several).
    Explore: otherwise every pod is priced, and the cheapest wins:

    cost = (queued prefill tokens + this request's uncached tokens) x the pod's prefill seconds per token

    * queued prefill: (the engine's waiting requests x its mean prompt length + the prompt tokens
      routed to it since its record) x (1 - its prefix-cache hit rate); without a record, the requests
      in flight from this gateway x this prompt's length;
    * uncached: this prompt's tokens minus its matched tokens (all of them past the guard);
    * seconds per token: the pod's mean (ttft - queue time) / mean prompt length; the candidates' median
      when unknown (1 when none is known, so the cost is in tokens: the decision is a fallback).
    """

    uses_metrics: ClassVar[bool] = True

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        matched = self.matcher.matched_tokens(request, pods)
        guard = overloaded(pods, self.guard)
        matched = [0 if blocked else tokens for tokens, blocked in zip(matched, guard, strict=True)]
        speeds = [_seconds_per_prefill_token(pod) for pod in pods]
        known = [s for s in speeds if s is not None]
        costs = self._costs(request, pods, matched, speeds, statistics.median(known) if known else 1.0)
        best = max(matched)
        if best and best >= self.min_match_ratio * request.prompt_tokens:
            scores = [
                -cost if tokens == best else -math.inf for tokens, cost in zip(matched, costs, strict=True)
            ]
        else:
            scores = [-cost for cost in costs]
        return scores if known else FallbackScores(scores)

    def _costs(
        self,
        request: RoutingRequest,
        pods: Sequence[PodState],
        matched: Sequence[int],
        speeds: Sequence[float | None],
        default: float,
    ) -> list[float]:
        """Each pod's prefill cost; ``default`` seconds per token where its speed is unknown (None)."""
        tokens = request.prompt_tokens
        costs = []
        for pod, cached, speed in zip(pods, matched, speeds, strict=True):
            metrics = pod.metrics
            if metrics is None:
                queued = pod.inflight * tokens
            else:
                queued = (metrics.waiting * metrics.prompt_tokens_mean + pod.tokens_since_record) * (
                    1 - metrics.prefix_hit_rate
                )
            uncached = max(0, tokens - cached)
            costs.append((queued + uncached) * (default if speed is None else speed))
        return costs


def _seconds_per_prefill_token(pod: PodState) -> float | None:
    metrics = pod.metrics
    if metrics is None or not metrics.prompt_tokens_mean:
        return None
    seconds = (metrics.ttft_mean - metrics.queue_mean) / metrics.prompt_tokens_mean
    return seconds if seconds > 0 and math.isfinite(seconds) else None
