"""Every profile loads, has KV room, cites its sources, and orders GPUs and models as the hardware does."""

import pytest

from emulator.profile import GIB, list_profiles, load_profile

NAMES = list_profiles()
#: Fastest first, by memory bandwidth and tensor throughput.
GPU_ORDER = [
    "llama-3.1-8b_h100",
    "llama-3.1-8b_a100",
    "llama-3.1-8b_l40s",
    "llama-3.1-8b_a10g",
    "llama-3.1-8b_l4",
]


def test_the_expected_profiles_exist() -> None:
    assert set(NAMES) == {*GPU_ORDER, "llama-3.1-70b_h100-tp4"}


@pytest.mark.parametrize("name", NAMES)
def test_profile_loads_with_kv_room_and_sources(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.num_blocks > 0
    assert profile.max_model_len <= profile.kv_cache_tokens  # vLLM would refuse to start otherwise
    assert profile.cost_per_hour > 0
    kinds = {source.kind for source in profile.fitted_to}
    assert "measured" in kinds and "datasheet" in kinds and "price" in kinds
    assert all(source.url.startswith("https://") and source.figure for source in profile.fitted_to)


def test_kv_bytes_and_blocks_follow_the_formula() -> None:
    profile = load_profile("llama-3.1-8b_h100")
    assert profile.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2  # layers x kv heads x head dim x K,V x bf16
    free = profile.gpu_memory_gib * profile.gpu_memory_utilization - profile.weights_gib - profile.reserve_gib
    assert profile.num_blocks == int(free * GIB // (profile.kv_bytes_per_token * 16))
    tp4 = load_profile("llama-3.1-70b_h100-tp4")
    assert tp4.kv_bytes_per_token == 80 * (8 // 4) * 128 * 2 * 2  # each GPU holds a quarter of the KV heads


@pytest.mark.parametrize(
    "batch",
    [
        {"num_tokens": 1, "kv_tokens_read": 1000},  # one decode
        {"num_tokens": 64, "kv_tokens_read": 64 * 2000},  # a decode batch
        {"num_tokens": 2048, "kv_tokens_read": 2048, "prefill_attention_pairs": 2048 * 2049 // 2},  # prefill
    ],
)
def test_faster_gpus_take_less_time_for_the_same_batch(batch: dict[str, int]) -> None:
    times = [load_profile(name).step_time(**batch) for name in GPU_ORDER]
    assert times == sorted(times)
    assert len(set(times)) == len(times)


def test_70b_is_slower_per_token_than_8b_on_the_same_gpu() -> None:
    small, large = load_profile("llama-3.1-8b_h100"), load_profile("llama-3.1-70b_h100-tp4")
    for tokens in (1, 64, 4096):
        assert large.step_time(tokens, tokens * 500) > small.step_time(tokens, tokens * 500)


def test_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    profile = load_profile("llama-3.1-8b_h100")
    # A handful of decodes costs about the same as one: the weight read dominates.
    assert profile.step_time(8, 8 * 100) < 1.05 * profile.step_time(1, 100)
    # A long prefill grows linearly with its tokens.
    ratio = profile.step_time(8000, 8000) / profile.step_time(4000, 4000)
    assert 1.9 < ratio < 2.05


def test_lora_batches_are_slower() -> None:
    profile = load_profile("llama-3.1-8b_h100")
    assert profile.step_time(16, 16_000, lora=True) > profile.step_time(16, 16_000)


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match=r"llama-3\.1-8b_h100"):
        load_profile("gpt-9")
