"""The approximate prefix index and the two strategies that read it."""

import random

import pytest

from brickyard_core.podmetrics import PodMetrics
from gateway_plugins.config import LoadGuardSettings, PrefixCacheSettings
from gateway_plugins.routing.select import rank
from gateway_plugins.routing.strategies import FallbackScores
from gateway_plugins.routing.strategies.prefix import (
    PrefixCacheAndLoadStrategy,
    PrefixCacheStrategy,
    PrefixIndex,
)
from gateway_plugins.routing.types import PodState, Prompt, PromptKind, RoutingRequest


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def text_request(text: str, model: str = "m") -> RoutingRequest:
    return RoutingRequest(model, prompt_text=text)


def ids_request(ids: list[int], model: str = "m") -> RoutingRequest:
    return RoutingRequest(model, prompt_token_ids=ids)


def pods(n: int) -> list[PodState]:
    return [PodState(f"p{i}", f"10.0.0.{i}:8000", "m") for i in range(n)]


BLOCK = 64  # bytes of text per block with the default 16 tokens x 4 characters


def words(seed: int, blocks: int) -> str:
    """Text of exactly ``blocks`` full blocks, different for each seed."""
    return "".join(f"{seed:03d}-{i:059d}|" for i in range(blocks))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(clock: Clock) -> PrefixIndex:
    return PrefixIndex(PrefixCacheSettings(), clock)


def test_equal_prefixes_hash_equal_and_only_full_blocks_count(index: PrefixIndex) -> None:
    a = index.block_hashes(text_request(words(1, 4) + "tail a"))
    b = index.block_hashes(text_request(words(1, 3) + words(2, 1) + "x" * (BLOCK - 1)))
    assert len(a) == 4 and len(b) == 4
    assert a[:3] == b[:3] and a[3] != b[3]


def test_the_model_seeds_the_chain(index: PrefixIndex) -> None:
    text = words(1, 2)
    assert index.block_hashes(text_request(text, "m")) != index.block_hashes(text_request(text, "m-lora-1"))


def test_token_blocks_when_ids_are_known_and_the_block_cap(clock: Clock) -> None:
    index = PrefixIndex(PrefixCacheSettings(block_tokens=4, max_blocks=3), clock)
    assert len(index.block_hashes(ids_request(list(range(11))))) == 2
    hashes = index.block_hashes(ids_request(list(range(100))))
    assert len(hashes) == 3
    assert hashes[:2] == index.block_hashes(ids_request([*range(8), 99, 99, 99, 99]))[:2]


def test_hashes_are_memoised_per_request(index: PrefixIndex) -> None:
    request = text_request(words(1, 3))
    assert index.block_hashes(request) is index.block_hashes(request)


def test_longest_match_per_pod(index: PrefixIndex) -> None:
    p = pods(3)
    index.record(index.block_hashes(text_request(words(1, 8))), p[0])
    index.record(index.block_hashes(text_request(words(1, 3) + words(2, 5))), p[1])
    query = index.block_hashes(text_request(words(1, 6) + words(3, 2)))
    assert index.matched_blocks(query, p) == [6, 3, 0]


def test_lru_evicts_the_tail_of_a_prefix_before_its_head(clock: Clock) -> None:
    index = PrefixIndex(PrefixCacheSettings(capacity_blocks=10), clock)
    pod = pods(1)
    first = index.block_hashes(text_request(words(1, 8)))
    index.record(first, pod[0])
    index.record(index.block_hashes(text_request(words(2, 4))), pod[0])  # 12 blocks: 2 evicted
    assert index.matched_blocks(first, pod) == [6]
    assert index.size() == 10


def test_capacity_follows_the_pods_reported_kv_cache(index: PrefixIndex) -> None:
    pod = pods(1)
    pod[0].metrics = PodMetrics(timestamp=1.0, num_blocks=4, block_size=16)  # 64 tokens: 4 index blocks
    hashes = index.block_hashes(text_request(words(1, 10)))
    index.record(hashes, pod[0])
    assert index.matched_blocks(hashes, pod) == [4]


def test_blocks_expire_after_the_ttl(clock: Clock) -> None:
    index = PrefixIndex(PrefixCacheSettings(ttl_seconds=10), clock)
    pod = pods(1)
    old = index.block_hashes(text_request(words(1, 4)))
    index.record(old, pod[0])
    clock.now = 6
    fresh = index.block_hashes(text_request(words(2, 4)))
    index.record(fresh, pod[0])
    clock.now = 12
    assert index.matched_blocks(old, pod) == [0]
    assert index.matched_blocks(fresh, pod) == [4]


def test_a_removed_pod_leaves_the_index(index: PrefixIndex) -> None:
    pod = pods(1)[0]
    index.record(index.block_hashes(text_request(words(1, 4))), pod)
    assert index.size() == 4
    del pod
    assert index.size() == 0


class WordTokenizer:
    """``w<i>`` words to id i: a model tokenizer as the router hands one to requests."""

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [int(word[1:]) for word in text.split()]

    def encode_chat(self, messages, **options) -> list[int]:  # type: ignore[no-untyped-def]
        return self.encode_text(" ".join(m["content"] for m in messages))


def test_a_model_tokenizer_gives_token_blocks(clock: Clock) -> None:
    index = PrefixIndex(PrefixCacheSettings(block_tokens=2), clock)
    request = RoutingRequest(
        "m", prompt=Prompt(PromptKind.TEXT, texts=("w1 w2 w3 w4 w5",)), tokenizer=WordTokenizer()
    )
    hashes = index.block_hashes(request)
    assert request.prompt_token_ids == [1, 2, 3, 4, 5]
    assert request.prompt_tokens == 5
    assert hashes == index.block_hashes(ids_request([1, 2, 3, 4, 9]))
    assert hashes != index.block_hashes(text_request("w1 w2 w3 w4 w5"))  # no tokenizer: text blocks


# -- prefix-cache ----------------------------------------------------------------------------------------


def strategy(index: PrefixIndex, **guard: float) -> PrefixCacheStrategy:
    return PrefixCacheStrategy(index, PrefixCacheSettings(), LoadGuardSettings(**guard))  # type: ignore[arg-type]


def route(
    s: PrefixCacheStrategy | PrefixCacheAndLoadStrategy, request: RoutingRequest, p: list[PodState]
) -> str:
    chosen = p[rank(s.score(request, p), random.Random(0))[0]]
    s.on_routed(request, chosen)
    return chosen.name


def test_prefix_cache_follows_the_longest_match(index: PrefixIndex) -> None:
    p = pods(4)
    s = strategy(index)
    first = route(s, text_request(words(1, 20) + "question one"), p)
    assert route(s, text_request(words(1, 20) + "question two"), p) == first
    other = route(s, text_request(words(2, 20)), p)
    assert other != first or p[0].load == 0  # no match: least loaded (all idle here: any pod)


def test_no_useful_match_goes_to_the_least_loaded_pod(index: PrefixIndex) -> None:
    p = pods(3)
    index.record(index.block_hashes(text_request(words(1, 2))), p[0])
    p[1].inflight, p[2].inflight = 2, 1
    # 2 of 20 blocks match on p0 (10% < 30%): the match is ignored, p0 is also the least loaded.
    assert route(strategy(index), text_request(words(1, 2) + words(5, 18)), p) == "p0"
    p[0].inflight = 3
    assert route(strategy(index), text_request(words(1, 2) + words(6, 18)), p) == "p2"


def test_the_load_guard_moves_a_hot_prefix_off_an_overloaded_pod(index: PrefixIndex) -> None:
    p = pods(4)
    hot = words(1, 20)
    index.record(index.block_hashes(text_request(hot)), p[0])
    p[0].inflight, p[1].inflight, p[2].inflight, p[3].inflight = 3, 1, 1, 0
    assert route(strategy(index), text_request(hot + "a"), p) == "p0"  # 3 is within the guard
    p[0].inflight = 15
    chosen = route(strategy(index), text_request(hot + "b"), p)
    assert chosen == "p3"
    # Now two pods hold the prefix: equal matches break ties by load.
    p[3].inflight = 2
    assert route(strategy(index, min_gap=100), text_request(hot + "c"), p) == "p3"


# -- prefix-cache-and-load ---------------------------------------------------------------------------------


def test_exploit_a_long_match_unless_the_pod_is_past_the_guard(index: PrefixIndex) -> None:
    p = pods(3)
    s = PrefixCacheAndLoadStrategy(index, PrefixCacheSettings(), LoadGuardSettings())
    prompt = words(1, 64)  # 64 blocks = 1,024 tokens
    index.record(index.block_hashes(text_request(prompt)), p[0])
    for pod in p:
        pod.metrics = PodMetrics(timestamp=1.0, ttft_mean=0.1, prompt_tokens_mean=1000.0)
    p[0].metrics = PodMetrics(timestamp=1.0, ttft_mean=0.1, prompt_tokens_mean=1000.0, waiting=3)
    assert route(s, text_request(prompt + "q1"), p) == "p0"  # a queue alone does not break affinity
    p[0].inflight = 15
    assert route(s, text_request(prompt + "q2"), p) in {"p1", "p2"}


def test_explore_prices_queued_prefill_against_uncached_tokens(index: PrefixIndex) -> None:
    p = pods(2)
    s = PrefixCacheAndLoadStrategy(index, PrefixCacheSettings(), LoadGuardSettings())
    prompt = words(1, 64)
    index.record(index.block_hashes(text_request(words(1, 16))), p[0])  # 25% of the prompt: explore
    for pod in p:
        pod.metrics = PodMetrics(timestamp=1.0, ttft_mean=0.1, prompt_tokens_mean=1000.0)
    assert route(s, text_request(prompt + "q1"), p) == "p0"  # 256 tokens saved, nothing queued
    # p0 now queues one request of 1,000 uncached tokens: more than the 256 tokens its cache saves.
    p[0].apply_metrics(PodMetrics(timestamp=2.0, ttft_mean=0.1, prompt_tokens_mean=1000.0, waiting=1))
    p[1].apply_metrics(p[1].metrics)
    request = text_request(words(1, 16) + words(2, 48))
    assert not isinstance(s.score(request, p), FallbackScores)
    assert route(s, request, p) == "p1"


def test_cost_model_without_records_counts_tokens_and_the_fallback(index: PrefixIndex) -> None:
    p = pods(2)
    s = PrefixCacheAndLoadStrategy(index, PrefixCacheSettings(), LoadGuardSettings())
    prompt = words(1, 64)
    index.record(index.block_hashes(text_request(prompt)), p[1])
    request = text_request(prompt + "q")
    assert isinstance(s.score(request, p), FallbackScores)  # exploiting a match, still priced in tokens
    assert route(s, request, p) == "p1"
