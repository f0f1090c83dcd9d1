"""Models of the peers' routing rules, so the 16-engine simulation has them as reference points.

The live benchmark runs the real routers; these models let the simulator compare against the same
rule at fleet sizes and loads the loopback machine cannot host. Facts from the peers' documentation:
sglang-router's and vllm-router's ``cache_aware`` keep a radix tree of the text each worker was sent;
when the busiest worker has more than ``balance_abs_threshold`` (64) requests over the idlest *and*
more than ``balance_rel_threshold`` (1.5) times as many, the least loaded worker gets the request;
otherwise the worker with the longest prefix match if it covers more than ``cache_threshold`` (0.3)
of the prompt, else the worker with the smallest tree. Here the radix tree is modelled by the
gateway's block index with 4-token blocks (their tree matches characters) and no eviction (theirs
evicts beyond 2^24 characters per worker, far above what one run sends).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

from gateway_plugins.config import PrefixCacheSettings
from gateway_plugins.routing.strategies.base import Stateless
from gateway_plugins.routing.strategies.prefix import PrefixIndex
from gateway_plugins.routing.types import PodState, RoutingRequest


class CacheAwareModel(Stateless):
    """sglang-router / vllm-router ``cache_aware`` (see the module doc)."""

    name: ClassVar[str] = "sglang-cache-aware-model"

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        settings = PrefixCacheSettings(block_tokens=4, max_blocks=1 << 20, capacity_blocks=1 << 30)
        self.index = PrefixIndex(settings, clock)
        self.index.ttl = math.inf
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        loads = [pod.load for pod in pods]
        busiest, idlest = max(loads), min(loads)
        if busiest - idlest > self.balance_abs_threshold and busiest > self.balance_rel_threshold * idlest:
            return [-float(load) for load in loads]
        hashes = self.index.block_hashes(request)
        matched = self.index.matched_blocks(hashes, pods)
        best = max(matched)
        if hashes and best / len(hashes) > self.cache_threshold:
            return [float(blocks) for blocks in matched]
        return [-float(self.index.blocks_held(pod)) for pod in pods]

    def on_routed(self, request: RoutingRequest, pod: PodState) -> None:
        self.index.record(self.index.block_hashes(request), pod)
