"""Workload generators: deterministic, time-ordered, tokens consistent with text, shapes as named."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from emulator import tokens
from emulator.workloads import WORKLOADS, WorkloadSpec, generate, read_trace, write_trace


def spec(**overrides: object) -> WorkloadSpec:
    return WorkloadSpec(**{"rate": 20.0, "duration": 60.0, "seed": 3, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_is_deterministic_ordered_and_consistent(name: str) -> None:
    first = list(itertools.islice(generate(name, spec()), 200))
    again = list(itertools.islice(generate(name, spec()), 200))
    assert first == again
    assert first, name
    arrivals = [r.arrival for r in first]
    assert arrivals == sorted(arrivals)
    assert all(0 <= a < 60 for a in arrivals)
    for request in first[:20]:
        assert tokens.encode(request.prompt_text) == request.prompt_ids
        assert request.max_tokens >= 1


@pytest.mark.parametrize("name", ["shared-prefix", "no-sharing", "lora-mix", "long-document"])
def test_poisson_rate(name: str) -> None:
    count = sum(1 for _ in generate(name, spec(rate=50.0, duration=200.0)))
    assert 0.9 * 10_000 < count < 1.1 * 10_000


def _prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_shared_prefix_shares_system_prompts() -> None:
    requests = list(
        itertools.islice(generate("shared-prefix", spec(shared_prefixes=4, prefix_tokens=300)), 100)
    )
    heads = Counter(tuple(r.prompt_ids[:300]) for r in requests)
    assert len(heads) <= 4
    assert heads.most_common(1)[0][1] > 25  # Zipf: the top prompt is popular


def test_no_sharing_shares_nothing() -> None:
    requests = list(itertools.islice(generate("no-sharing", spec()), 50))
    assert max(_prefix(a.prompt_ids, b.prompt_ids) for a, b in itertools.combinations(requests, 2)) < 4


def test_multi_turn_prompts_grow_with_the_engines_replies() -> None:
    by_session: dict[str, list] = {}
    for request in generate("multi-turn", spec(rate=10.0, duration=300.0, turns=4, think_time=1.0)):
        by_session.setdefault(request.session, []).append(request)
    conversations = [turns for turns in by_session.values() if len(turns) >= 3]
    assert conversations
    for turns in conversations:
        for earlier, later in itertools.pairwise(turns):
            assert later.arrival > earlier.arrival
            reply_ids, _ = tokens.reply(earlier.prompt_ids, earlier.max_tokens)
            history = earlier.prompt_ids + reply_ids
            assert later.prompt_ids[: len(history)] == history  # the engine's own reply is in the history


def test_lora_mix_is_zipf_over_adapters() -> None:
    models = Counter(r.model for r in itertools.islice(generate("lora-mix", spec(adapters=10)), 2000))
    ranked = [count for _, count in models.most_common()]
    assert len(models) == 10
    assert ranked[0] > 3 * ranked[-1]


def test_bursty_rate_varies() -> None:
    arrivals = [r.arrival for r in generate("bursty", spec(rate=20.0, duration=600.0))]
    per_minute = Counter(int(a // 60) for a in arrivals)
    assert max(per_minute.values()) > 3 * min(per_minute.values())


def test_trace_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    original = list(itertools.islice(generate("shared-prefix", spec()), 30))
    assert write_trace(iter(original), path) == 30
    loaded = list(read_trace(path))
    assert [(r.prompt_ids, r.max_tokens, r.model, r.user) for r in loaded] == [
        (r.prompt_ids, r.max_tokens, r.model, r.user) for r in original
    ]
    assert [round(r.arrival, 6) for r in original] == [r.arrival for r in loaded]


def test_trace_rejects_time_travel(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"arrival": 2, "prompt": "a", "max_tokens": 1, "model": "m"}\n'
        '{"arrival": 1, "prompt": "b", "max_tokens": 1, "model": "m"}\n'
    )
    with pytest.raises(ValueError, match="must not decrease"):
        list(read_trace(path))
