"""Real vLLM ``/metrics`` -> runtime sidecar -> Redis -> gateway -> routing decisions, and prefix-cache
routing measured by the engines' own prefix-cache counters."""

from __future__ import annotations

import random
import threading
import time

import httpx

from brickyard_core.podmetrics import PodMetrics, decode_record, pod_key
from runtime_sidecar.scrape import parse_metrics
from tests.conftest import redis_at
from tests.real_vllm.conftest import MODEL, Deployment, RealFleet, eventually, post

VOCABULARY = "ocean river city music number table select where group order join count history science"
WORDS = VOCABULARY.split()


def record(fleet: RealFleet, pod: str) -> PodMetrics:
    raw = redis_at(fleet.redis_port).get(pod_key("default", pod))
    assert raw is not None, f"no record of {pod} in Redis"
    return decode_record(raw)[2]


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def complete(deployment: Deployment, prompt: str, strategy: str, max_tokens: int = 2) -> httpx.Response:
    response = post(
        deployment.base_url,
        "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens},
        **{"routing-strategy": strategy},
    )
    assert response.status_code == 200, response.text
    return response


def test_the_sidecar_reads_real_vllm_metrics_into_records(fleet: RealFleet) -> None:
    engine = fleet.engines[0]
    # vLLM exposes vllm:lora_requests_info only once its scheduler has logged a step: serve one request each.
    for each in fleet.engines:
        post(each.url, "/v1/completions", {"model": MODEL, "prompt": text(1, 80), "max_tokens": 8})
    families = fleet.engine_metrics(engine)

    def value(family: str, sample: str = "_total") -> float:
        return sum(s.value for s in families[family] if s.name == family + sample)

    # Every series the sidecar reads is labelled by engine core and model, as in vLLM V1.
    for name in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries"):
        assert {tuple(sorted(s.labels)) for s in families[name]} == {("engine", "model_name")}
    cache = families["vllm:cache_config_info"][0].labels
    lora = families["vllm:lora_requests_info"]
    # One series per label combination seen, each valued with the time it was last current.
    assert lora and all(s.labels["max_lora"] == "2" and s.value > 1e9 for s in lora)

    # The parser, on the engine's own text, agrees with a plain Prometheus read of it.
    _, sample = parse_metrics(httpx.get(f"{engine.url}/metrics").text, time.time())
    assert sample.prefix_queries == value("vllm:prefix_cache_queries") > 0
    assert sample.prompt_tokens == value("vllm:prompt_tokens") > 0
    assert sample.generation_tokens == value("vllm:generation_tokens") >= 8
    assert sample.ttft_count == value("vllm:time_to_first_token_seconds", "_count") > 0
    assert (sample.block_size, sample.num_blocks) == (int(cache["block_size"]), int(cache["num_gpu_blocks"]))
    assert sample.num_blocks * sample.block_size == int(cache["kv_cache_size_tokens"])
    newest = max(lora, key=lambda s: s.value)
    assert sample.running_adapters == tuple(filter(None, newest.labels["running_lora_adapters"].split(",")))
    assert sample.max_loras == 2

    # ... and the sidecar's records in Redis carry the same.
    for pod in ("vllm-a", "vllm-b"):
        metrics = eventually(lambda pod=pod: (m := record(fleet, pod)).max_loras == 2 and m)
        assert metrics, f"{pod}: no record with vllm:lora_requests_info yet"
        assert metrics.healthy and metrics.engine_type == "vllm"
        assert (metrics.block_size, metrics.num_blocks) == (128, int(cache["num_gpu_blocks"]))
        assert (metrics.waiting, metrics.running) == (0, 0)
        assert time.time() - metrics.timestamp < 2


def test_a_metric_strategy_routes_on_real_records_without_fallbacks(
    fleet: RealFleet, aibrix: Deployment
) -> None:
    busy, idle = fleet.engines
    for pod in ("vllm-a", "vllm-b"):  # both records fresh in the gateway: nothing to fall back from
        assert eventually(lambda pod=pod: aibrix_age(aibrix, pod) < 1.0), f"{pod}'s record is stale"
    fallbacks = aibrix.counter("brickyard_routing_fallbacks")
    unknown = aibrix.counter("brickyard_routing_unknown_metrics_decisions")

    # A long generation on one replica: its KV-cache usage and running count rise in its records. It is
    # streamed, and closed once the routed requests are done (vLLM aborts a request whose client left).
    stop, lines = threading.Event(), []

    def generate() -> None:
        body = {"model": MODEL, "prompt": text(2, 20), "max_tokens": 460, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{busy.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if stop.is_set():
                    return

    stream = threading.Thread(target=generate)
    stream.start()
    try:
        loaded = eventually(lambda: (m := record(fleet, busy.name)).running == 1 and m.kv_usage > 0 and m, 10)
        assert loaded, record(fleet, busy.name)
        served = []
        for i in range(5):
            # The idle replica's record must postdate its last request: one scraped while that request held
            # a block reads as busy as the busy replica (whose KV cache is nearly as empty: 8,192 blocks).
            done = time.time()
            assert eventually(lambda done=done: aibrix_age(aibrix, idle.name) < time.time() - done)
            served.append(complete(aibrix, text(3 + i, 10), "least-kv-cache").headers["target-pod"])
        still_running = stream.is_alive() and "data: [DONE]" not in lines
    finally:
        stop.set()
        stream.join()
    assert still_running, "the long generation ended before the routed requests: lengthen it"
    assert served == [idle.name] * 5
    # least-latency reads queue and prefill/decode means, not the running batch: no steering expected here.
    for strategy in (
        "least-queue",
        "least-latency",
        "throughput",
        "prefix-cache-and-load",
        "inference-extension",
    ):
        complete(aibrix, text(20, 10), strategy)
    assert aibrix.counter("brickyard_routing_fallbacks") == fallbacks
    assert aibrix.counter("brickyard_routing_unknown_metrics_decisions") == unknown


def aibrix_age(deployment: Deployment, pod: str) -> float:
    ages = [
        s.value for s in deployment.metrics()["brickyard_pod_metrics_age_seconds"] if s.labels["pod"] == pod
    ]
    return ages[0] if ages else float("inf")


def test_prefix_cache_routing_keeps_a_shared_prefix_on_one_replica(
    fleet: RealFleet, aibrix: Deployment
) -> None:
    fleet.reset_prefix_caches()
    seed = random.randrange(1 << 30)
    shared = text(seed, 260)  # ~300 tokens: two whole 128-token blocks of vLLM's CPU prefix cache
    hits = {e.name: fleet.engine_counter(e, "vllm:prefix_cache_hits") for e in fleet.engines}
    queries = {e.name: fleet.engine_counter(e, "vllm:prefix_cache_queries") for e in fleet.engines}

    served = [
        complete(aibrix, f"{shared} {text(seed + i + 1, 12)}", "prefix-cache").headers["target-pod"]
        for i in range(6)
    ]

    assert len(set(served)) == 1, served
    home = served[0]
    other = next(e for e in fleet.engines if e.name != home)
    home_hits = fleet.engine_counter(fleet.engine(home), "vllm:prefix_cache_hits") - hits[home]
    assert home_hits >= 5 * 256  # every request after the first found the shared blocks cached
    assert fleet.engine_counter(other, "vllm:prefix_cache_hits") == hits[other.name]
    assert fleet.engine_counter(other, "vllm:prefix_cache_queries") == queries[other.name]  # never asked

    # Round robin with another shared prefix: both replicas compute it, each caches it.
    shared = text(seed + 100, 260)
    served = [
        complete(aibrix, f"{shared} {text(seed + 101 + i, 12)}", "round-robin").headers["target-pod"]
        for i in range(4)
    ]
    assert sorted(served) == ["vllm-a", "vllm-a", "vllm-b", "vllm-b"]
    assert fleet.engine_counter(other, "vllm:prefix_cache_hits") > hits[other.name]
