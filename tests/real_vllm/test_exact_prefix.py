"""Exact routing inputs against real vLLM: the gateway predicts, for every request, the prompt tokens the
chosen engine will report cached, from the engines' own KV-cache events and the model's own tokenizer.

Two CPU vLLM replicas with a KV cache of a few dozen blocks (eviction pressure), their events bound on
``tcp://*:<port>`` and read by the gateway's feed; a skewed shared-prefix chat workload through Envoy and
the gateway (``prefix-cache``). Each response carries the gateway's prediction (exact, and the
approximate index's side by side) and the engine's ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from brickyard.stack import Engine, Stack, kv_events_config
from gateway_plugins.extproc.contracts import (
    APPROXIMATE_CACHED_HEADER,
    PREDICTED_CACHED_HEADER,
    PREFIX_INDEX_HEADER,
)
from tests.real_vllm.conftest import MODEL, build_tiny_model, vllm_python
from tests.real_vllm.test_routing import text

#: Blocks of 128 tokens per engine: 2,048 tokens of cache, against a working set of twice that and more.
KV_BLOCKS = 16
REQUESTS = 160


@dataclass
class ExactFleet:
    base_url: str
    metrics_url: str
    engines: list[Engine]


@pytest.fixture(scope="module")
def exact_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExactFleet]:
    python = vllm_python()
    model = build_tiny_model(python)
    with Stack(tmp_path_factory.mktemp("exact-prefix")) as stack:
        engines = []
        for core, name in enumerate(("exact-a", "exact-b")):
            kv_events, annotations = kv_events_config(name)
            engines.append(
                stack.start_vllm(
                    name,
                    model.path,
                    python=python,
                    served_model_name=MODEL,
                    cpu_core=core % 2,
                    kv_events=kv_events,
                    annotations=annotations,
                    extra=("--enable-prompt-tokens-details", "--num-gpu-blocks-override", str(KV_BLOCKS)),
                    wait=False,
                )
            )
        endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / "exact-endpoints.yaml")
        config = stack.workdir / "exact-gateway.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "default_strategy": "prefix-cache",
                    "observe_response_status": True,  # the response headers carry the prediction
                    "kv_events": {"enabled": True},
                    "models": {MODEL: {"tokenizer": str(model.path)}},
                }
            )
        )
        for engine in engines:
            stack.wait_ready(engine.name, timeout=300)
        gateway = stack.start_gateway(
            "aibrix", endpoints, "--config", str(config), name="exact-gateway", log_level="warning"
        )
        port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="exact-envoy")
        yield ExactFleet(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gateway.metrics}/metrics", engines)


def metric(fleet: ExactFleet, line_start: str) -> float:
    for line in httpx.get(fleet.metrics_url).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def workload(seed: int = 14) -> Iterator[list[dict[str, str]]]:
    """Chats sharing long system prompts of skewed popularity (Zipf 1.1 over 12), each with its own
    question: the system prompt is 2-3 blocks, the whole prompt under the engine's 512 tokens."""
    rng = random.Random(seed)
    documents = [text(1000 + i, rng.randint(230, 330)) for i in range(12)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(documents))]
    for number in range(REQUESTS):
        document = rng.choices(documents, weights)[0]
        yield [
            {"role": "system", "content": document},
            {"role": "user", "content": f"question {number}: " + text(number, rng.randint(5, 25))},
        ]


def test_predicted_cached_tokens_equal_what_the_engines_report(exact_fleet: ExactFleet) -> None:
    outcomes = []
    with httpx.Client(timeout=60) as client:
        for messages in workload():
            response = client.post(
                f"{exact_fleet.base_url}/v1/chat/completions",
                json={"model": MODEL, "messages": messages, "max_tokens": 2},
            )
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            outcomes.append(
                (
                    response.headers[PREFIX_INDEX_HEADER],
                    int(response.headers[PREDICTED_CACHED_HEADER]),
                    int(response.headers[APPROXIMATE_CACHED_HEADER]),
                    usage["prompt_tokens_details"]["cached_tokens"],
                    usage["prompt_tokens"],
                    response.headers["target-pod"],
                )
            )
    indexes = Counter(index for index, *_ in outcomes)
    exact_agree = sum(predicted == cached for _, predicted, _, cached, _, _ in outcomes)
    approximate_agree = sum(guess == cached for _, _, guess, cached, _, _ in outcomes)
    cached = sum(o[3] for o in outcomes)
    prompt = sum(o[4] for o in outcomes)
    split = Counter(o[5] for o in outcomes)
    report = (
        f"exact agreement {exact_agree}/{len(outcomes)}, approximate {approximate_agree}/{len(outcomes)}, "
        f"indexes {dict(indexes)}, fleet hit rate {cached / prompt:.3f}, split {dict(split)}, "
        f"disagreements {[o for o in outcomes if o[1] != o[3]][:10]}"
    )
    print(report)
    assert indexes["exact"] >= 0.95 * len(outcomes), report
    assert exact_agree >= 0.99 * len(outcomes), report
    # Under eviction pressure: the engines evicted blocks, and the gateway saw it.
    assert metric(exact_fleet, "brickyard_kv_event_blocks_removed_total") > 0
    assert cached > 0, report
