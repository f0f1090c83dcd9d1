"""Every strategy through the live path: OpenAI SDK -> real Envoy -> gateway -> emulated engines.

Two deployments: the shared one without Redis (no pod records: metric strategies must take their
explicit, counted fallback) and one whose gateway reads the sidecars' records from a real Redis (the
same strategies then decide on metrics, with no fallback).
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from brickyard.stack import GatewayPorts, Stack
from gateway_plugins.routing.strategies import ALIASES, build_strategies
from tests.conftest import MODEL, Deployment

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Route me well."}]
#: Every name a client may send, presets and aliases included, plus a weighted combination.
NAMES = [*sorted(build_strategies()), "prefix-cache:3,least-kv-cache:2,least-request"]
METRIC_STRATEGIES = ["least-queue", "least-kv-cache", "throughput", "least-latency"]


def api(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def fallbacks(gateway: GatewayPorts) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{gateway.metrics}/metrics").text
    return {
        sample.labels["strategy"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "brickyard_routing_fallbacks"
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def route(base_url: str, strategy: str, messages: list[dict[str, str]] = CHAT) -> tuple[str, dict[str, str]]:
    raw = api(base_url).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=4, extra_headers={"routing-strategy": strategy}
    )
    assert raw.parse().choices[0].message.content
    served_by = raw.headers["x-emulator-pod"]
    assert raw.headers["target-pod"] == served_by
    return served_by, dict(raw.headers)


@pytest.mark.parametrize("strategy", NAMES)
def test_every_strategy_routes_and_names_itself(deployment: Deployment, strategy: str) -> None:
    _, headers = route(deployment.base_url, strategy)
    expected = "prefix-cache:3,least-kv-cache:2,least-request:1" if "," in strategy else strategy
    assert headers["routing-strategy"] == ALIASES.get(expected, expected)  # an alias names its target


def test_metric_strategies_without_records_fall_back_and_count_it(deployment: Deployment) -> None:
    before = fallbacks(deployment.gateway)
    for strategy in METRIC_STRATEGIES:
        route(deployment.base_url, strategy)
    after = fallbacks(deployment.gateway)
    assert all(after[s] == before.get(s, 0) + 1 for s in METRIC_STRATEGIES), (before, after)


def test_prefix_cache_keeps_a_long_shared_prompt_on_one_pod(deployment: Deployment) -> None:
    system = {"role": "system", "content": " ".join(f"rule-{i}" for i in range(600))}
    pods = Counter(
        route(deployment.base_url, "prefix-cache", [system, {"role": "user", "content": f"q{i}"}])[0]
        for i in range(6)
    )
    assert len(pods) == 1, pods


def test_a_bad_combination_is_a_400_saying_why(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": CHAT},
        headers={"routing-strategy": "prefix-cache:two,least-request"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_routing_strategy"
    assert "whole number" in error["message"]


@pytest.fixture(scope="module")
def metered(stack: Stack, redis_port: int) -> tuple[str, GatewayPorts]:
    """Engines with sidecars publishing to Redis, and a gateway reading their records."""
    engines = [stack.start_engine(f"metered-{i}", MODEL) for i in range(2)]
    for engine in engines:
        stack.start_sidecar(engine, redis_port)
    endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / "metered-endpoints.yaml")
    gateway = stack.start_gateway("aibrix", endpoints, redis_port=redis_port, name="gateway-metered")
    port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="envoy-metered")
    return f"http://127.0.0.1:{port}", gateway


def test_metric_strategies_decide_on_records_when_the_sidecars_publish(
    metered: tuple[str, GatewayPorts],
) -> None:
    base_url, gateway = metered
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # both pods' first records reach the gateway
        text = httpx.get(f"http://127.0.0.1:{gateway.metrics}/metrics").text
        ages = [
            s
            for f in text_string_to_metric_families(text)
            if f.name == "brickyard_pod_metrics_age_seconds"
            for s in f.samples
        ]
        if len(ages) == 2:
            break
        time.sleep(0.05)
    before = fallbacks(gateway)
    for strategy in [*METRIC_STRATEGIES, "prefix-cache-and-load", "inference-extension"]:
        route(base_url, strategy)
    assert fallbacks(gateway) == before
