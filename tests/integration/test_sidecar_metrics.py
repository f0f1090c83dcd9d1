"""Sidecars publish engine metrics to a real Redis; the gateway's store reads them; faults are survived."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai
import pytest

from brickyard.stack import Engine, Stack
from brickyard_core.podmetrics import decode_record, pod_key
from emulator.profile import load_profile
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.pod_metrics_store import PodMetricsStore
from tests.conftest import MODEL, redis_at, sidecar_auth

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sidecars(stack: Stack, engines: list[Engine], redis_port: int) -> dict[str, int]:
    return {engine.name: stack.start_sidecar(engine, redis_port) for engine in engines}


def registry_of(engines: list[Engine]) -> PodRegistry:
    registry = PodRegistry()
    registry.replace_all(PodInfo(e.name, e.address, MODEL) for e in engines)
    return registry


@contextlib.asynccontextmanager
async def running_store(
    registry: PodRegistry, redis_port: int, **kwargs: float
) -> AsyncIterator[PodMetricsStore]:
    store = PodMetricsStore(registry, f"redis://127.0.0.1:{redis_port}/0", **kwargs)
    task = asyncio.create_task(store.run())
    await asyncio.wait_for(store.connected.wait(), 5)
    try:
        yield store
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def test_records_are_in_redis(sidecars: dict[str, int], redis_port: int) -> None:
    client = redis_at(redis_port)
    for name in sidecars:
        data = client.get(pod_key("default", name))
        assert data is not None, name
        namespace, pod, record = decode_record(data)
        assert (namespace, pod, record.healthy, record.engine_type) == ("default", name, True, "vllm")
        assert record.block_size == 16
        assert record.num_blocks == load_profile("llama-3.1-8b_h100").num_blocks
        assert 0 < client.pttl(pod_key("default", name)) <= 10_000


def test_sidecar_endpoints(sidecars: dict[str, int]) -> None:
    port = sidecars["engine-0"]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok"
    assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=sidecar_auth())
    assert models.json()["data"][0]["id"] == MODEL
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'brickyard_engine_healthy{engine="vllm",namespace="default",pod="engine-0"} 1.0' in metrics
    assert "brickyard_engine_kv_usage{" in metrics


async def test_store_follows_engine_load(
    sidecars: dict[str, int], engines: list[Engine], redis_port: int
) -> None:
    registry = registry_of(engines)
    async with running_store(registry, redis_port) as store:
        await until(lambda: all(s.metrics is not None for s in registry.states()))
        state = registry.state("default", "engine-1")
        assert state is not None and state.metrics is not None and state.metrics.running == 0
        async with httpx.AsyncClient() as client:
            request = asyncio.create_task(
                client.post(
                    f"{engines[1].url}/v1/completions",
                    json={"model": MODEL, "prompt": "x", "max_tokens": 300},
                    timeout=30,
                )
            )
            started = time.monotonic()
            await until(lambda: state.metrics is not None and state.metrics.running == 1)
            assert time.monotonic() - started < 0.5  # scrape every 50 ms, then one publish
            await request
        await until(lambda: state.metrics is not None and state.metrics.running == 0)
        assert state.metrics.generation_tps > 0
        assert store.records_received > 10


async def test_dead_engine_leaves_routing_and_comes_back(stack: Stack, redis_port: int) -> None:
    engine = stack.start_engine("flaky-0", MODEL)
    sidecar = stack.start_sidecar(engine, redis_port)
    registry = registry_of([engine])
    async with running_store(registry, redis_port):
        await until(lambda: registry.ready_pods(MODEL) != ())
        stack.stop_child(next(c for c in stack.children if c.name == "flaky-0"))
        await until(lambda: registry.ready_pods(MODEL) == (), timeout=2)  # unhealthy record within ~50 ms
        assert registry.knows_model(MODEL)
        assert (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{sidecar}/ready")).status_code == 503
        stack.start_engine("flaky-0", MODEL, engine.port)
        await until(lambda: registry.ready_pods(MODEL) != (), timeout=10)


async def test_silent_pod_goes_stale_and_unroutable(stack: Stack, redis_port: int) -> None:
    engine = stack.start_engine("silent-0", MODEL)
    stack.start_sidecar(engine, redis_port)
    registry = registry_of([engine])
    async with running_store(registry, redis_port, stale_seconds=1.0):
        await until(lambda: registry.ready_pods(MODEL) != ())
        stack.stop_child(next(c for c in stack.children if c.name == "silent-0-sidecar"))
        state = registry.state("default", "silent-0")
        await until(lambda: state is not None and state.metrics is None, timeout=3)
        assert registry.ready_pods(MODEL) == ()


def test_redis_restart_mid_traffic_fails_no_request(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        redis_port = stack.start_redis()
        engines = [stack.start_engine(f"engine-{i}", MODEL) for i in range(2)]
        for engine in engines:
            stack.start_sidecar(engine, redis_port)
        gateway = stack.start_gateway(
            "aibrix",
            stack.write_endpoints(engines, MODEL, stack.workdir / "endpoints.yaml"),
            redis_port=redis_port,
            name="gateway-redis",
        )
        port, _ = stack.start_envoy("aibrix", gateway.grpc, engines)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        failures: list[Exception] = []
        done = threading.Event()

        def traffic() -> int:
            sent = 0
            while not done.is_set():
                try:
                    api.completions.create(model=MODEL, prompt="hello", max_tokens=20)
                except Exception as exc:
                    failures.append(exc)
                sent += 1
            return sent

        def records() -> float:
            text = httpx.get(f"http://127.0.0.1:{gateway.metrics}/metrics").text
            return next(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("brickyard_pod_metrics_records_total")
            )

        thread_result: list[int] = []
        thread = threading.Thread(target=lambda: thread_result.append(traffic()))
        thread.start()
        time.sleep(1.0)
        stack.stop_child(next(c for c in stack.children if c.name == "redis"))
        time.sleep(2.0)
        stack.start_redis(redis_port)
        before = records()
        deadline = time.monotonic() + 10
        while records() < before + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        after = records()
        done.set()
        thread.join(30)
        assert failures == []
        assert thread_result[0] > 20
        assert after >= before + 20  # the gateway reconnected and reads records again


def test_two_gateways_see_each_others_load(
    stack: Stack, engines: list[Engine], redis_port: int, endpoints_file: Path
) -> None:
    first = stack.start_gateway("aibrix", endpoints_file, redis_port=redis_port, name="gateway-share-a")
    second = stack.start_gateway("aibrix", endpoints_file, redis_port=redis_port, name="gateway-share-b")
    port_a, _ = stack.start_envoy("aibrix", first.grpc, engines, name="envoy-share-a")
    port_b, _ = stack.start_envoy("aibrix", second.grpc, engines, name="envoy-share-b")
    via_a = openai.OpenAI(base_url=f"http://127.0.0.1:{port_a}/v1", api_key="x", max_retries=0)
    via_b = openai.OpenAI(base_url=f"http://127.0.0.1:{port_b}/v1", api_key="x", max_retries=0)
    streams = [
        via_a.completions.create(model=MODEL, prompt="x", max_tokens=1000, stream=True) for _ in range(2)
    ]
    for stream in streams:
        next(iter(stream))  # the first chunk: the stream is running
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{second.metrics}/metrics").text
        remote = [
            line
            for line in text.splitlines()
            if line.startswith("brickyard_pod_remote_inflight_requests{") and line.endswith(" 1.0")
        ]
        if len(remote) == 2:
            break
        time.sleep(0.05)
    assert len(remote) == 2, text
    taken = {line.split('pod="')[1].split('"')[0] for line in remote}
    raw = via_b.completions.with_raw_response.create(
        model=MODEL, prompt="x", max_tokens=5, extra_headers={"routing-strategy": "least-request"}
    )
    assert raw.headers["target-pod"] not in taken  # gateway B counted gateway A's requests
    for stream in streams:
        stream.close()
    for name in ("envoy-share-a", "envoy-share-b", "gateway-share-a", "gateway-share-b"):
        stack.stop_child(next(c for c in stack.children if c.name == name))
