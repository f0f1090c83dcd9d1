"""Tenancy end to end: API keys, RPM/TPM/RPS limits in a real Redis shared by two gateways behind real
Envoys, token usage read from real (emulated) engine responses, Redis failure policies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from brickyard.stack import Engine, GatewayPorts, Stack, free_port
from gateway_plugins.tenancy.users import User, UserStore
from tests.conftest import redis_at

MODEL = "tenant-model"
CHAT = [{"role": "user", "content": "Count the tokens of this request, please."}]


@pytest.fixture(scope="module")
def instant_engines(stack: Stack) -> list[Engine]:
    return [stack.start_engine(f"tenancy-engine-{i}", MODEL, None, "--profile", "instant") for i in range(2)]


@pytest.fixture(scope="module")
def tenancy_redis(stack: Stack) -> int:
    return stack.start_redis(name="tenancy-redis")


def start(
    stack: Stack,
    engines: list[Engine],
    redis_port: int,
    name: str,
    contract: str = "aibrix",
    **tenancy: Any,
) -> tuple[str, GatewayPorts]:
    """A gateway with tenancy on (``tenancy`` overrides its settings) and its Envoy; returns the base URL."""
    config = stack.workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"tenancy": {"enabled": True, **tenancy}}))
    endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / f"{name}-endpoints.yaml")
    gateway = stack.start_gateway(
        contract, endpoints, "--config", str(config), name=name, redis_port=redis_port
    )
    port, _ = stack.start_envoy(contract, gateway.grpc, engines, name=f"envoy-{name}")
    return f"http://127.0.0.1:{port}", gateway


@pytest.fixture(scope="module")
def pair(stack: Stack, instant_engines: list[Engine], tenancy_redis: int) -> list[str]:
    """Two gateway replicas (each with its Envoy) sharing one Redis; API keys required."""
    return [
        start(stack, instant_engines, tenancy_redis, f"tenant-gw-{i}", require_api_key=True)[0]
        for i in range(2)
    ]


def new_user(redis_port: int, name: str, **limits: int) -> str:
    """Create ``name`` with ``limits`` through the real store; returns a fresh API key."""

    async def create() -> str:
        store = UserStore(f"redis://127.0.0.1:{redis_port}/0")
        try:
            await store.create(User(name, **limits))
            return await store.create_key(name)
        finally:
            await store.aclose()

    return asyncio.run(create())


def client(base_url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=30)


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def authenticated(base_url: str, key: str) -> bool:
    """The gateway knows the key (users reach replicas by pub/sub, not instantly)."""
    status = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
    ).status_code
    return status != 401


def tpm_used(redis_port: int, user: str) -> int:
    values = redis_at(redis_port).hvals(f"brickyard:limit:tpm:{user}")
    return sum(int(v) for v in values)


def engine_tokens(engines: list[Engine]) -> float:
    total = 0.0
    for engine in engines:
        text = httpx.get(f"{engine.url}/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name in ("vllm:prompt_tokens", "vllm:generation_tokens"):
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


# -- authentication ----------------------------------------------------------------------------


def test_missing_and_wrong_keys_are_401_in_openai_shape(pair: list[str], tenancy_redis: int) -> None:
    key = new_user(tenancy_redis, "auth-user")
    assert wait_for(lambda: authenticated(pair[0], key))
    for headers, message in (
        ({}, "didn't provide an API key"),
        ({"authorization": "Bearer sk-by-nope"}, "Incorrect"),
    ):
        response = httpx.post(f"{pair[0]}/v1/chat/completions", headers=headers, json={"model": MODEL})
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
        assert message in error["message"]
    with pytest.raises(openai.AuthenticationError):
        client(pair[0], "sk-by-wrong").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    reply = client(pair[0], key).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert reply.usage is not None and reply.usage.completion_tokens == 2


def test_a_stream_too_deep_to_rewrite_for_usage_is_400(pair: list[str], tenancy_redis: int) -> None:
    """The gateway adds ``stream_options.include_usage`` by re-serialising the body, which orjson does to 255
    levels only (it reads 1,024): once a 500 after routing, now a 400 before it."""
    key = new_user(tenancy_redis, "deep-user")
    assert wait_for(lambda: authenticated(pair[0], key))
    depth = 300
    raw = (
        f'{{"model": "{MODEL}", "stream": true, "messages": [{{"role": "user", "content": "x"}}], '
        f'"metadata": {"[" * depth}1{"]" * depth}}}'
    )
    response = httpx.post(
        f"{pair[0]}/v1/chat/completions",
        content=raw,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"


# -- limits --------------------------------------------------------------------------------------


def test_rpm_admits_exactly_n_across_two_gateways_under_50_concurrent_callers(
    pair: list[str], tenancy_redis: int
) -> None:
    rpm = 23
    key = new_user(tenancy_redis, "rpm-user", rpm=rpm, tpm=10_000_000)
    assert all(wait_for(lambda url=url: authenticated(url, key)) for url in pair)
    # authenticated() sent one request through each gateway already
    clients = [client(url, key) for url in pair]

    def call(i: int) -> int | openai.RateLimitError:
        try:
            clients[i % 2].chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
            return 200
        except openai.RateLimitError as error:
            return error

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(call, range(100)))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert results.count(200) == rpm - 2
    assert len(refused) == 100 - (rpm - 2)
    error = refused[0]
    assert error.status_code == 429
    body = error.response.json()["error"]
    assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == str(rpm)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 61
    assert headers["x-error-rpm-exceeded"] == "true"


def test_successful_responses_carry_the_rate_limit_headers(pair: list[str], tenancy_redis: int) -> None:
    key = new_user(tenancy_redis, "headers-user", rpm=50, tpm=5000)
    assert wait_for(lambda: authenticated(pair[1], key))
    raw = client(pair[1], key).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=3
    )
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "50"
    assert headers["x-ratelimit-remaining-requests"] == "48"  # this one and authenticated()'s
    assert headers["x-ratelimit-limit-tokens"] == "5000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 5000  # authenticated()'s tokens were charged
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_tpm_is_charged_with_the_actual_usage_of_every_response(
    pair: list[str], tenancy_redis: int, instant_engines: list[Engine]
) -> None:
    key = new_user(tenancy_redis, "tpm-user", rpm=1000, tpm=10_000_000)
    assert wait_for(lambda: authenticated(pair[0], key))
    assert wait_for(lambda: tpm_used(tenancy_redis, "tpm-user") > 0)
    before_charged = tpm_used(tenancy_redis, "tpm-user")
    before_engines = engine_tokens(instant_engines)
    seen = 0
    for i in range(12):
        api = client(pair[i % 2], key)
        messages = [{"role": "user", "content": "word " * (5 + 7 * i)}]
        if i % 3 == 0:
            reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=1 + i)
            seen += reply.usage.total_tokens
        elif i % 3 == 1:  # the client asks for usage: it gets it, and so does the gateway
            chunks = list(
                api.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    max_tokens=1 + i,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            assert chunks[-1].usage is not None and chunks[-1].choices == []
            seen += chunks[-1].usage.total_tokens
        else:  # it does not: the gateway adds include_usage and strips the usage chunk again
            chunks = list(
                api.completions.create(
                    model=MODEL, prompt="word " * (5 + 7 * i), max_tokens=1 + i, stream=True
                )
            )
            assert all(c.usage is None for c in chunks)
            assert "".join(c.choices[0].text for c in chunks if c.choices)
    total = engine_tokens(instant_engines) - before_engines
    assert wait_for(lambda: tpm_used(tenancy_redis, "tpm-user") - before_charged == total)
    assert tpm_used(tenancy_redis, "tpm-user") - before_charged == total
    assert seen < total  # the stripped streams' usage was counted although the client never saw it


def test_tpm_refuses_once_the_window_is_used_up(pair: list[str], tenancy_redis: int) -> None:
    key = new_user(tenancy_redis, "small-tpm", rpm=100, tpm=60)
    assert wait_for(lambda: authenticated(pair[0], key))
    api = client(pair[0], key)

    def over() -> bool:
        try:
            api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20)
            return False
        except openai.RateLimitError as error:
            assert error.response.headers["x-error-tpm-exceeded"] == "true"
            assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"
            return True

    assert wait_for(over)
    assert tpm_used(tenancy_redis, "small-tpm") >= 60


def test_model_rps_limit_applies_to_everyone(
    stack: Stack, instant_engines: list[Engine], tenancy_redis: int
) -> None:
    url, _ = start(
        stack, instant_engines, tenancy_redis, "tenant-rps", model_rps={MODEL: 5}, default_rpm=None
    )
    api = client(url)

    def call(_: int) -> int | openai.RateLimitError:
        try:
            api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
            return 200
        except openai.RateLimitError as error:
            return error  # its headers are checked below, in the test's thread

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(call, range(20)))
    elapsed = time.monotonic() - started
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert all(error.response.headers["x-error-model-rps-exceeded"] == "true" for error in refused)
    assert 5 <= results.count(200) <= 5 * (1 + int(elapsed) + 1)
    assert len(refused) >= 20 - 5 * (1 + int(elapsed) + 1)


def test_user_header_is_the_tenant_when_keys_are_off(
    stack: Stack, instant_engines: list[Engine], tenancy_redis: int
) -> None:
    url, gateway = start(stack, instant_engines, tenancy_redis, "tenant-header", default_rpm=3)
    codes = [
        httpx.post(
            f"{url}/v1/chat/completions",
            headers={"user": user},
            json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
        ).status_code
        for user in ["alice"] * 4 + ["bob"] * 2
    ]
    assert codes == [200, 200, 200, 429, 200, 200]
    anonymous = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert anonymous.status_code == 200  # no tenant, no per-user limit
    metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics}/metrics").text
    assert 'brickyard_rate_limit_rejections_total{kind="rpm"} 1.0' in metrics
    assert 'brickyard_prompt_tokens_total{model="tenant-model",user="alice"}' in metrics
    assert 'brickyard_requests_total{code="429",model="",strategy=""} 1.0' in metrics


# -- Redis down --------------------------------------------------------------------------------


@pytest.fixture
def redis_gone(stack: Stack, instant_engines: list[Engine]) -> Iterator[dict[str, str]]:
    port = stack.start_redis(name="doomed-redis")
    urls = {
        policy: start(stack, instant_engines, port, f"tenant-{policy}", failure_policy=policy)[0]
        for policy in ("open", "closed")
    }
    for url in urls.values():  # both admit while Redis is up
        assert (
            httpx.post(
                f"{url}/v1/chat/completions", headers={"user": "u"}, json={"model": MODEL, "messages": CHAT}
            ).status_code
            == 200
        )
    stack.stop_child(stack.child("doomed-redis"))
    yield urls


def test_redis_down_fails_open_or_closed_as_configured(redis_gone: dict[str, str]) -> None:
    def post(url: str) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/chat/completions",
            headers={"user": "u"},
            json={"model": MODEL, "messages": CHAT, "max_tokens": 1},
            timeout=10,
        )

    for _ in range(3):
        assert post(redis_gone["open"]).status_code == 200
        closed = post(redis_gone["closed"])
        assert closed.status_code == 503
        assert closed.json()["error"]["type"] == "overloaded_error"
        assert closed.headers["x-error-rate-limiter-unavailable"] == "true"


# -- EPP contract --------------------------------------------------------------------------------


def test_usage_is_accounted_through_the_epp_contract(
    stack: Stack, instant_engines: list[Engine], tenancy_redis: int
) -> None:
    url, _ = start(stack, instant_engines, tenancy_redis, "tenant-epp", contract="epp", default_rpm=1000)
    api = openai.OpenAI(
        base_url=f"{url}/v1", api_key="x", max_retries=0, default_headers={"user": "epp-user"}
    )
    chunks = list(api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)
    reply = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    expected = 2 * reply.usage.total_tokens  # the same prompt and length twice
    assert wait_for(lambda: tpm_used(tenancy_redis, "epp-user") == expected)


# -- what the gateway counts ----------------------------------------------------------------------


def metric(gateway: GatewayPorts, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{gateway.metrics}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_an_abandoned_stream_is_counted_unaccounted_and_releases_its_pod(
    stack: Stack, engines: list[Engine], tenancy_redis: int
) -> None:
    # The shared engines (Llama-3.1-8B on H100 profile) decode a token every few ms: the stream is
    # still running when the client walks away.
    config = stack.workdir / "tenant-abandon.yaml"
    config.write_text(yaml.safe_dump({"tenancy": {"enabled": True}}))
    endpoints = stack.write_endpoints(engines, "test-model", stack.workdir / "tenant-abandon-endpoints.yaml")
    gateway = stack.start_gateway(
        "aibrix", endpoints, "--config", str(config), name="tenant-abandon", redis_port=tenancy_redis
    )
    port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="envoy-tenant-abandon")
    body = {"model": "test-model", "messages": CHAT, "max_tokens": 2000, "stream": True}
    with httpx.stream(
        "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers={"user": "quitter"}
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        # Several events, so the gateway sees more than one body chunk (tokens come ~7 ms apart).
        assert [next(lines) for _ in range(40)]
    assert wait_for(lambda: metric(gateway, "brickyard_unaccounted_responses_total", model="test-model") == 1)
    assert wait_for(lambda: metric(gateway, "brickyard_requests_in_flight") == 0)
    assert metric(gateway, "brickyard_time_to_first_token_seconds_count", model="test-model") == 1
    assert metric(gateway, "brickyard_inter_token_latency_seconds_count", model="test-model") >= 1


def test_observe_response_status_gives_every_request_its_code(
    stack: Stack, instant_engines: list[Engine]
) -> None:
    config = stack.workdir / "observe.yaml"
    config.write_text(yaml.safe_dump({"observe_response_status": True}))
    endpoints = stack.write_endpoints(instant_engines, MODEL, stack.workdir / "observe-endpoints.yaml")
    gateway = stack.start_gateway("aibrix", endpoints, "--config", str(config), name="observe")
    port, _ = stack.start_envoy("aibrix", gateway.grpc, instant_engines, name="envoy-observe")
    ok = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert ok.status_code == 200
    assert ok.headers["target-pod"].startswith("tenancy-engine-")
    bad = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": MODEL, "messages": CHAT, "max_tokens": 0},
    )
    assert bad.status_code == 400  # the engine's own refusal, seen by the gateway on the way back
    labels = {"model": MODEL, "strategy": "least-request"}
    assert metric(gateway, "brickyard_requests_total", code="200", **labels) == 1
    assert metric(gateway, "brickyard_requests_total", code="400", **labels) == 1
    assert metric(gateway, "brickyard_requests_total", code="forwarded") == 0


def test_a_user_made_with_the_cli_calls_through_the_gateway(
    stack: Stack, instant_engines: list[Engine], tenancy_redis: int, tmp_path: Path
) -> None:
    """The whole operator path: admin API served by the gateway, `brickyard users`, then the key in use."""
    admin_port = free_port()
    token = tmp_path / "admin-token"
    token.write_text("s3cret-admin\n")
    url, _ = start(
        stack,
        instant_engines,
        tenancy_redis,
        "tenant-admin",
        require_api_key=True,
        admin_port=admin_port,
        admin_token_file=str(token),
    )
    env = {**os.environ, "BRICKYARD_ADMIN_URL": f"http://127.0.0.1:{admin_port}"}

    def users(*args: str, admin_token: str = "s3cret-admin") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "brickyard", "users", *args, "--token", admin_token],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )

    denied = users("list", admin_token="wrong")
    assert denied.returncode == 1 and "admin token" in denied.stderr.lower()
    assert users("create", "cli-user", "--rpm", "7").returncode == 0
    created = users("create-key", "cli-user")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    assert wait_for(lambda: authenticated(url, key))
    raw = client(url, key).chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=1)
    assert raw.headers["x-ratelimit-limit-requests"] == "7"
    assert users("revoke-key", "cli-user", json.loads(created.stdout)["id"]).returncode == 0
    assert wait_for(lambda: not authenticated(url, key))
