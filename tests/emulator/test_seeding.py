"""A simulator run draws only from its own generator, seeded by ``FleetSpec.seed``: one seed, one run."""

from __future__ import annotations

import random

import pytest

from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, generate


def test_a_seed_gives_one_run_and_the_global_random_source_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests = list(generate("no-sharing", WorkloadSpec(rate=40.0, duration=5.0, seed=1, prompt_tokens=64)))
    state = random.getstate()
    for name in ("random", "choice", "sample", "shuffle", "seed", "getrandbits"):
        monkeypatch.setattr(random, name, lambda *_: pytest.fail("drew from the global random module"))

    def routed(strategy: str, seed: int) -> list[tuple[float, str]]:
        result = FleetSimulator(FleetSpec(engines=4, strategy=strategy, seed=seed)).run(requests)
        return sorted((outcome.arrival, outcome.pod) for outcome in result.outcomes)

    for strategy in ("random", "power-of-two", "least-request"):
        assert routed(strategy, 5) == routed(strategy, 5)
        assert routed(strategy, 5) != routed(strategy, 6), strategy
    monkeypatch.undo()
    assert random.getstate() == state
