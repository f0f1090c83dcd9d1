"""Engine /metrics -> EngineSample -> PodMetrics, for vLLM (current and older names) and SGLang."""

from __future__ import annotations

import pytest

from brickyard_core.podmetrics import EngineSample, MetricsWindow, PodMetrics, decode_record, encode_record
from emulator import exposition
from emulator.engine import EngineCore, Request
from emulator.profile import load_profile
from runtime_sidecar.scrape import ScrapeError, detect_engine, parse_metrics

OLD_VLLM = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:gpu_prefix_cache_hit_rate gauge
vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.4
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="m"} 1000.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="m"} 500.0
# TYPE vllm:time_per_output_token_seconds histogram
vllm:time_per_output_token_seconds_bucket{le="0.01",model_name="m"} 10.0
vllm:time_per_output_token_seconds_bucket{le="+Inf",model_name="m"} 20.0
vllm:time_per_output_token_seconds_count{model_name="m"} 20.0
vllm:time_per_output_token_seconds_sum{model_name="m"} 0.4
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="2048"} 1.0
"""

SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.5
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{model_name="m"} 0.75
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 300.0
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="m"} 200.0
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0
sglang:time_to_first_token_seconds_sum{model_name="m"} 0.2
sglang:time_to_first_token_seconds_count{model_name="m"} 4.0
"""


def emulator_text(lora: bool = True) -> str:
    core = EngineCore(load_profile("llama-3.1-8b_h100"), max_loras=2)
    core.add_request(Request("a", list(range(1, 100)), 50, lora="sql"), 0.0)
    core.add_request(Request("b", list(range(1, 100)), 50), 0.0)
    core.step(0.0)
    core.step(0.05)
    return exposition.render(core.stats(), "m", lora_enabled=lora)


def test_current_vllm_metrics() -> None:
    engine, sample = parse_metrics(emulator_text(), 10.0)
    assert engine == "vllm"
    assert (sample.running, sample.waiting) == (2, 0)
    assert sample.kv_usage > 0
    assert sample.prefix_queries == 198
    assert sample.prompt_tokens == 198
    assert sample.generation_tokens == 4
    assert sample.ttft_count == 2
    assert sample.itl_count == 2
    assert (sample.block_size, sample.num_blocks) == (16, load_profile("llama-3.1-8b_h100").num_blocks)
    assert (sample.running_adapters, sample.max_loras) == (("sql",), 2)


def test_lora_info_newest_sample_wins_and_empty_series_is_ignored() -> None:
    text = emulator_text().replace(
        "# TYPE vllm:lora_requests_info gauge\n",
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="",running_lora_adapters="",waiting_lora_adapters=""} 9e12\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 5.0\n',
    )
    _, sample = parse_metrics(text, 0.0)
    assert sample.running_adapters == ("sql",)  # the emulator's series carries the current timestamp


def test_cache_config_of_real_vllm_cpu_builds() -> None:
    """vLLM 0.32's CPU build, as scraped (tests/real_vllm): unset settings are the string "None"."""
    line = (
        'vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
        'kv_cache_size_tokens="1048576",num_cpu_blocks="None",num_gpu_blocks="{blocks}",'
        'sliding_window="None"} 1.0'
    )
    for blocks in ("8192", "None"):
        text = OLD_VLLM.replace(
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="2048"} 1.0',
            line.replace("{blocks}", blocks),
        )
        assert parse_metrics(text, 0.0)[1].num_blocks == 8192
        assert parse_metrics(text, 0.0)[1].block_size == 128


def test_older_vllm_names() -> None:
    engine, sample = parse_metrics(OLD_VLLM, 1.0)
    assert engine == "vllm"
    assert (sample.running, sample.waiting, sample.kv_usage) == (3, 1, 0.25)
    assert sample.prefix_hit_rate == 0.4
    assert (sample.itl_sum, sample.itl_count) == (0.4, 20.0)
    assert (sample.block_size, sample.num_blocks) == (16, 2048)


def test_sglang_names() -> None:
    engine, sample = parse_metrics(SGLANG, 1.0)
    assert engine == "sglang"
    assert (sample.running, sample.waiting, sample.kv_usage) == (7, 2, 0.5)
    assert sample.prefix_hit_rate == 0.75
    assert (sample.ttft_sum, sample.ttft_count) == (0.2, 4.0)


def test_data_parallel_engines_are_summed() -> None:
    text = OLD_VLLM.replace(
        'vllm:num_requests_running{model_name="m"} 3.0',
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0',
    )
    assert parse_metrics(text, 0.0)[1].running == 7


@pytest.mark.parametrize("text", ["", "<html>not metrics</html>", "# TYPE up gauge\nup 1\n"])
def test_not_engine_metrics(text: str) -> None:
    with pytest.raises(ScrapeError):
        detect_engine(text)


def test_window_turns_counters_into_rates_and_means() -> None:
    window = MetricsWindow(2.0, gpu_type="H100")
    first = EngineSample(
        0.0,
        1,
        2,
        0.1,
        prefix_queries=100,
        prefix_hits=0,
        prompt_tokens=100,
        generation_tokens=10,
        ttft_sum=0.0,
        ttft_count=0,
    )
    window.update(first)
    later = EngineSample(
        1.0,
        3,
        4,
        0.2,
        prefix_queries=300,
        prefix_hits=150,
        prompt_tokens=400,
        generation_tokens=110,
        ttft_sum=0.5,
        ttft_count=10,
    )
    record = window.update(later)
    assert (record.waiting, record.running, record.kv_usage) == (3, 4, 0.2)
    assert record.prefix_hit_rate == pytest.approx(0.75)
    assert record.prompt_tps == pytest.approx(300)
    assert record.generation_tps == pytest.approx(100)
    assert record.ttft_mean == pytest.approx(0.05)
    assert record.gpu_type == "H100"


def test_window_forgets_samples_older_than_the_window_and_survives_restarts() -> None:
    window = MetricsWindow(1.0)
    for t in range(5):
        record = window.update(EngineSample(float(t), 0, 0, 0.0, generation_tokens=100.0 * t))
    assert record.generation_tps == pytest.approx(100)
    restarted = window.update(EngineSample(5.0, 0, 0, 0.0, generation_tokens=5.0))
    assert restarted.generation_tps == 0.0  # counters went back to zero: a fresh window, not a negative rate


def test_record_encoding_round_trips() -> None:
    record = PodMetrics(timestamp=12.5, waiting=3, running_adapters=("a", "b"), gpu_type="L4")
    assert decode_record(encode_record("ns", "pod-1", record)) == ("ns", "pod-1", record)
    with pytest.raises(ValueError, match="malformed"):
        decode_record(b'{"namespace": "ns"}')
    with pytest.raises(ValueError, match="malformed"):
        decode_record(b"not json")
