"""From scores to a ranked choice: argmax with random tie-breaking."""

from __future__ import annotations

import random
from collections.abc import Sequence


def rank(scores: Sequence[float], rng: random.Random, count: int = 1) -> list[int]:
    """Indices of the ``count`` best scores, best first; equal scores in an order drawn from ``rng``."""
    if count == 1:
        best = max(scores)
        ties = [i for i, score in enumerate(scores) if score == best]
        return [ties[0] if len(ties) == 1 else rng.choice(ties)]
    rnd = rng.random
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], rnd()))
    return order[:count]
