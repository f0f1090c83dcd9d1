"""The prefix-cache hit rate no router can beat: one infinite cache that saw every earlier request.

Requests are taken in arrival order. A request hits the leading full blocks of
its prompt that some earlier request computed, prompt or reply (engines cache
generated blocks too), under the same model or adapter; never the prompt's last
token, which the engine always computes. Hits and queries are counted in
tokens, as the engines count them, so the ratio compares directly with a run's
``prefix_hit_rate``.
"""

from __future__ import annotations

from collections.abc import Iterable

from emulator import tokens
from emulator.workloads import WorkloadRequest


def oracle_hit_rate(requests: Iterable[WorkloadRequest], block_size: int = 16) -> float:
    seen: set[int] = set()
    hits = queries = 0
    for request in requests:
        prompt = request.prompt_ids
        reply, _ = tokens.reply(prompt, request.max_tokens)
        sequence = prompt + reply
        queries += len(prompt)
        hashable = (len(prompt) - 1) // block_size
        parent = hash(request.model)
        matching = True
        for number, start in enumerate(range(0, len(sequence) - block_size + 1, block_size)):
            parent = hash((parent, tuple(sequence[start : start + block_size])))
            if matching and number < hashable and parent in seen:
                hits += block_size
            else:
                matching = False
            seen.add(parent)
    return hits / queries if queries else 0.0
