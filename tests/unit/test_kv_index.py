"""The exact prefix index fed by engines' KV events, and the matcher that prefers it per pod."""

from __future__ import annotations

import pytest

from gateway_plugins.config import LoadGuardSettings, PrefixCacheSettings
from gateway_plugins.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from gateway_plugins.routing.kv_index import KvBlockIndex, PodSync
from gateway_plugins.routing.strategies.prefix import PrefixCacheStrategy, PrefixIndex, PrefixMatcher
from gateway_plugins.routing.types import PodState, RoutingRequest

BLOCK = 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(clock: Clock) -> KvBlockIndex:
    return KvBlockIndex(clock, resync_seconds=10.0, speculative_seconds=1.0)


def pod(name: str, model: str = "m") -> PodState:
    return PodState(name, f"10.0.0.{len(name)}:8000", model)


def stored(ids: list[int], *, first: int, parent: int | None = None, lora: str | None = None) -> BlockStored:
    """The engine stored ``ids`` as consecutive blocks named first, first+1, ... (engine names are opaque)."""
    count = len(ids) // BLOCK
    return BlockStored(
        block_hashes=tuple(range(first, first + count)),
        parent_block_hash=parent,
        token_ids=tuple(ids),
        block_size=BLOCK,
        lora_name=lora,
        medium="GPU",
    )


def key(p: PodState) -> tuple[str, str]:
    return (p.namespace, p.name)


def held(index: KvBlockIndex, ids: list[int], pods: list[PodState], adapter: str | None = None) -> list[int]:
    return index.matched_blocks(index.block_names(ids, BLOCK, adapter), pods, speculative=False)


PROMPT = list(range(100, 116))  # 4 blocks


def test_stored_blocks_match_by_tokens_and_chain_through_parents(index: KvBlockIndex) -> None:
    a, b = pod("a"), pod("b")
    index.apply(key(a), 0, [stored(PROMPT[:8], first=1)])
    index.apply(key(a), 1, [stored(PROMPT[8:12], first=3, parent=2)])  # continues the engine's block 2
    index.apply(key(b), 0, [stored(PROMPT[:4], first=50)])
    assert held(index, PROMPT, [a, b]) == [3, 1]
    assert held(index, [*PROMPT[:4], 0, 0, 0, 0], [a, b]) == [1, 1]  # a different second block
    assert held(index, [7, *PROMPT[1:]], [a, b]) == [0, 0]
    assert index.live(a) and index.block_size(a) == BLOCK


def test_a_block_whose_parent_is_unknown_is_not_indexed(index: KvBlockIndex) -> None:
    a = pod("a")
    index.apply(key(a), 0, [stored(PROMPT[4:8], first=9, parent=999)])
    assert index.orphan_blocks == 1
    assert index.blocks_held(a) == 0


def test_removed_blocks_stop_matching_and_cleared_pods_hold_nothing(index: KvBlockIndex) -> None:
    a = pod("a")
    index.apply(key(a), 0, [stored(PROMPT, first=1)])
    index.apply(key(a), 1, [BlockRemoved(block_hashes=(3,), medium="GPU")])
    assert held(index, PROMPT, [a]) == [2]
    index.apply(key(a), 2, [BlockRemoved(block_hashes=(1, 2), medium="CPU")])  # another tier: not ours
    assert held(index, PROMPT, [a]) == [2]
    index.apply(key(a), 3, [AllBlocksCleared()])
    assert held(index, PROMPT, [a]) == [0] and index.blocks_held(a) == 0


def test_blocks_in_another_medium_are_not_resident(index: KvBlockIndex) -> None:
    a = pod("a")
    offloaded = stored(PROMPT, first=1)
    index.apply(key(a), 0, [BlockStored(**{**_fields(offloaded), "medium": "CPU"})])
    assert held(index, PROMPT, [a]) == [0]


def _fields(event: BlockStored) -> dict[str, object]:
    return {name: getattr(event, name) for name in BlockStored.__slots__}


def test_adapters_have_their_own_blocks(index: KvBlockIndex) -> None:
    a = pod("a")
    # vLLM names an adapter's blocks by the adapter too, and says so in each block's extra keys.
    adapted = stored(PROMPT, first=1, lora="sql")
    index.apply(key(a), 0, [BlockStored(**{**_fields(adapted), "extra_keys": (("sql",),) * 4})])
    assert held(index, PROMPT, [a]) == [0]
    assert held(index, PROMPT, [a], adapter="sql") == [4]


def test_sequence_numbers_decide_whether_a_pod_is_trusted(index: KvBlockIndex, clock: Clock) -> None:
    a, b = pod("a"), pod("b")
    index.apply(key(a), 0, [stored(PROMPT, first=1)])
    index.apply(key(b), 7, [stored(PROMPT, first=1)])  # joined late: history incomplete
    assert (index.live(a), index.live(b)) == (True, False)
    index.apply(key(a), 1, [])
    index.apply(key(a), 5, [])  # a gap: what was missed is unknown
    assert not index.live(a) and index.gaps == 1
    index.apply(key(a), 4, [BlockRemoved(block_hashes=(1,))])  # older than the last applied: ignored
    assert held(index, PROMPT, [a]) == [4]
    clock.now = 10.0  # resync_seconds later the misses have healed
    assert index.live(a) and index.live(b)
    index.apply(key(b), 8, [])
    index.apply(key(b), 20, [AllBlocksCleared()])  # a gap, but a cleared cache is a known one
    assert index.sync_states()[key(b)] is PodSync.LIVE


def test_complete_marks_a_replayed_history_live(index: KvBlockIndex) -> None:
    a = pod("a")
    index.apply(key(a), 3, [stored(PROMPT, first=1)])
    assert not index.live(a)
    index.complete(key(a))
    assert index.live(a)


def test_speculation_holds_until_confirmed_or_expired(index: KvBlockIndex, clock: Clock) -> None:
    a, b = pod("a"), pod("b")
    index.apply(key(a), 0, [stored(PROMPT[:4], first=1)])
    index.apply(key(b), 0, [])
    names = index.block_names(PROMPT, BLOCK, None)
    index.speculate(names, a)
    assert index.matched_blocks(names, [a, b]) == [4, 0]
    assert index.matched_blocks(names, [a, b], speculative=False) == [1, 0]
    clock.now = 1.0
    assert index.matched_blocks(names, [a, b]) == [1, 0]
    index.speculate(names, b)
    index.apply(key(b), 1, [stored(PROMPT[:8], first=1)])  # confirmed: no longer a guess
    clock.now = 5.0
    assert index.matched_blocks(names, [a, b]) == [1, 2]


def test_a_pod_that_leaves_frees_its_slot_for_the_next(index: KvBlockIndex) -> None:
    a, b, c = pod("a"), pod("b"), pod("c")
    index.apply(key(a), 0, [stored(PROMPT, first=1)])
    index.apply(key(b), 0, [stored(PROMPT[:4], first=1)])
    index.forget(key(a))
    index.apply(key(c), 0, [])
    assert held(index, PROMPT, [a, b, c]) == [0, 1, 0]


def test_many_pods_match_in_one_walk(index: KvBlockIndex) -> None:
    pods = [pod(f"p{i:02d}") for i in range(64)]
    for depth, p in enumerate(pods):
        index.apply(key(p), 0, [stored(PROMPT[: BLOCK * (depth % 5)], first=1)] if depth % 5 else [])
    assert held(index, PROMPT, pods) == [depth % 5 for depth in range(64)]


# -- the matcher: exact where events are live, approximate elsewhere ---------------------------------


def matcher(index: KvBlockIndex, clock: Clock) -> PrefixMatcher:
    return PrefixMatcher(PrefixIndex(PrefixCacheSettings(block_tokens=BLOCK), clock), index)


def test_live_pods_are_matched_exactly_and_predicted_as_the_engine_caps_hits(
    index: KvBlockIndex, clock: Clock
) -> None:
    a, b = pod("a"), pod("b")
    index.apply(key(a), 0, [stored(PROMPT, first=1)])
    index.apply(key(b), 0, [stored(PROMPT[:4], first=1)])
    m = matcher(index, clock)
    request = RoutingRequest("m", prompt_token_ids=PROMPT)
    # The engine never serves a prompt's last token from cache: 16 tokens hit at most 3 blocks of 4.
    assert m.matched_tokens(request, [a, b]) == [12, 4]
    m.record(request, a)
    assert request.predicted == ("exact", 12, 0)


def test_pods_without_live_events_are_matched_approximately(index: KvBlockIndex, clock: Clock) -> None:
    a, b = pod("a"), pod("b")
    index.apply(key(a), 3, [stored(PROMPT, first=1)])  # incomplete history: not trusted
    m = matcher(index, clock)
    first = RoutingRequest("m", prompt_token_ids=PROMPT)
    assert m.matched_tokens(first, [a, b]) == [0, 0]
    m.record(first, b)  # the approximate index learns that b was sent this prompt
    assert first.predicted == ("approximate", 0, 0)
    again = RoutingRequest("m", prompt_token_ids=PROMPT)
    assert m.matched_tokens(again, [a, b]) == [0, 15]  # text of 16 tokens: at most 15 hit


def test_a_prompt_without_token_ids_is_matched_approximately(index: KvBlockIndex, clock: Clock) -> None:
    a = pod("a")
    index.apply(key(a), 0, [stored(PROMPT, first=1)])
    m = matcher(index, clock)
    request = RoutingRequest("m", prompt_text="x" * 64)
    assert m.matched_tokens(request, [a]) == [0]
    m.record(request, a)
    assert request.predicted == ("approximate", 0, 0)


def test_prefix_cache_follows_the_engines_own_blocks(index: KvBlockIndex, clock: Clock) -> None:
    a, b, c = pod("a"), pod("b"), pod("c")
    for p in (a, b, c):
        index.apply(key(p), 0, [])
    index.apply(key(c), 1, [stored(PROMPT, first=1)])
    strategy = PrefixCacheStrategy(
        PrefixIndex(PrefixCacheSettings(block_tokens=BLOCK), clock),
        PrefixCacheSettings(),
        LoadGuardSettings(),
        index,
    )
    scores = strategy.score(RoutingRequest("m", prompt_token_ids=PROMPT), [a, b, c])
    assert max(range(3), key=scores.__getitem__) == 2


def test_blocks_named_by_more_than_tokens_are_not_indexed(index: KvBlockIndex) -> None:
    a = pod("a")
    salted = BlockStored(**{**_fields(stored(PROMPT[:8], first=1)), "extra_keys": (("salt",), None)})
    index.apply(key(a), 0, [salted, stored(PROMPT[8:], first=3, parent=2)])
    assert held(index, PROMPT, [a]) == [0]
    assert index.orphan_blocks == 4  # the salted block, the one after it, and their children


def test_a_block_the_engine_holds_twice_stays_until_both_are_removed(index: KvBlockIndex) -> None:
    a = pod("a")
    index.apply(key(a), 0, [stored(PROMPT[:4], first=1), stored(PROMPT[:4], first=1)])
    index.apply(key(a), 1, [BlockRemoved(block_hashes=(1,))])
    assert held(index, PROMPT, [a]) == [1]
    index.apply(key(a), 2, [BlockRemoved(block_hashes=(1,))])
    assert held(index, PROMPT, [a]) == [0]
