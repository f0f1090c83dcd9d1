"""Pod discovery through the official Kubernetes client, against the API stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from brickyard.stack import Engine, Stack
from gateway_plugins.discovery.kubernetes import KubernetesDiscovery, pod_info
from gateway_plugins.discovery.registry import PodRegistry
from tests.conftest import MODEL
from tests.support.kube_api import KubeApiServer

pytestmark = pytest.mark.slow


def pod(
    name: str,
    *,
    model: str = "llama",
    ip: str = "10.1.0.1",
    ready: bool = True,
    port: int | None = None,
    namespace: str = "llm",
    phase: str = "Running",
) -> dict[str, Any]:
    labels = {"model.aibrix.ai/name": model, "app": "vllm"}
    if port is not None:
        labels["model.aibrix.ai/port"] = str(port)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@pytest.fixture
def kube() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
async def discovery(kube: KubeApiServer) -> AsyncIterator[tuple[PodRegistry, KubernetesDiscovery]]:
    registry = PodRegistry()
    watcher = KubernetesDiscovery(
        registry, namespace="llm", watch_timeout_seconds=2, api_client=kube.api_client()
    )
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.synced.wait(), 5)
    yield registry, watcher
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def addresses(registry: PodRegistry, model: str = "llama") -> list[str]:
    return [p.address for p in registry.ready_pods(model)]


def test_pod_info_rules() -> None:
    assert pod_info(pod("a", port=8080)).address == "10.1.0.1:8080"  # type: ignore[union-attr]
    assert pod_info(pod("a")).address == "10.1.0.1:8000"  # type: ignore[union-attr]
    assert pod_info(pod("a", ready=False)).ready is False  # type: ignore[union-attr]
    assert pod_info(pod("a", ip="")).ready is False  # type: ignore[union-attr]
    assert pod_info(pod("a", phase="Pending")).ready is False  # type: ignore[union-attr]
    terminating = pod("a")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_info(terminating).ready is False  # type: ignore[union-attr]
    unlabelled = pod("a")
    del unlabelled["metadata"]["labels"]["model.aibrix.ai/name"]
    assert pod_info(unlabelled) is None


async def test_list_then_watch_follows_pod_changes(
    kube: KubeApiServer, discovery: tuple[PodRegistry, KubernetesDiscovery]
) -> None:
    registry, _ = discovery
    assert registry.serving_models() == []
    kube.create(pod("a", ip="10.1.0.1"))
    kube.create(pod("b", ip="10.1.0.2", ready=False))
    kube.create(pod("elsewhere", ip="10.9.0.1", namespace="other"))
    await until(lambda: addresses(registry) == ["10.1.0.1:8000"] and registry.knows_model("llama"))
    kube.patch_status("v1", "Pod", "llm", "b", {"conditions": [{"type": "Ready", "status": "True"}]})
    await until(lambda: addresses(registry) == ["10.1.0.1:8000", "10.1.0.2:8000"])
    kube.patch("v1", "Pod", "llm", "a", {"metadata": {"labels": {"model.aibrix.ai/name": None}}})
    await until(lambda: addresses(registry) == ["10.1.0.2:8000"])  # left the selector
    kube.delete("v1", "Pod", "llm", "b")
    await until(lambda: not registry.knows_model("llama"))


async def test_terminating_pods_stop_receiving_traffic(
    kube: KubeApiServer, discovery: tuple[PodRegistry, KubernetesDiscovery]
) -> None:
    registry, _ = discovery
    held = pod("a")
    held["metadata"]["finalizers"] = ["example.com/hold"]
    kube.create(held)
    await until(lambda: addresses(registry) == ["10.1.0.1:8000"])
    kube.delete("v1", "Pod", "llm", "a")  # stays, with a deletionTimestamp
    await until(lambda: addresses(registry) == [])
    assert registry.knows_model("llama")


def pod_lists(kube: KubeApiServer) -> int:
    """How many times the pods of ``llm`` were listed (not watched)."""
    path = "/api/v1/namespaces/llm/pods"
    return sum(1 for r in kube.requests if r.method == "GET" and r.path == path and "watch" not in r.query)


async def test_relists_after_the_watch_history_expires(
    kube: KubeApiServer, discovery: tuple[PodRegistry, KubernetesDiscovery]
) -> None:
    registry, _ = discovery
    kube.create(pod("a", ip="10.1.0.1"))
    await until(lambda: addresses(registry) == ["10.1.0.1:8000"])
    lists = pod_lists(kube)
    with kube.hold_watches():  # the watch falls behind, then a compaction ends it with 410 Expired:
        kube.create(pod("c", ip="10.1.0.3"))  # these changes are lost with it,
        kube.delete("v1", "Pod", "llm", "a")
        kube.compact()
    await until(lambda: addresses(registry) == ["10.1.0.3:8000"])  # so only a re-list can show them
    assert pod_lists(kube) == lists + 1
    before = len(kube.requests)
    await asyncio.sleep(2.5)  # the watch times out (2 s) and is renewed from the last resourceVersion
    assert any("watch" in r.query for r in kube.requests[before:])
    assert pod_lists(kube) == lists + 1 and addresses(registry) == ["10.1.0.3:8000"]


async def test_api_server_outage_is_survived(
    kube: KubeApiServer, discovery: tuple[PodRegistry, KubernetesDiscovery], caplog: pytest.LogCaptureFixture
) -> None:
    """The API server goes away: routing keeps the last known pods while the watch retries, backing off;
    the server comes back on its address and what changed meanwhile arrives."""
    registry, _ = discovery

    def retries() -> list[float]:
        return [r.created for r in caplog.records if "retrying in" in r.getMessage()]

    kube.create(pod("a"))
    await until(lambda: addresses(registry) == ["10.1.0.1:8000"])
    caplog.set_level(logging.WARNING)
    kube.stop()
    kube.create(pod("b", ip="10.1.0.2"))  # written to the store behind the stopped server
    kube.delete("v1", "Pod", "llm", "a")
    await until(lambda: len(retries()) >= 3, timeout=15)
    assert addresses(registry) == ["10.1.0.1:8000"]  # the last known pods, not an empty registry
    first, second, third = retries()[:3]
    assert third - second > 1.5 * (second - first)  # exponential backoff, not a tight loop
    kube.start()  # same port: the client's address
    await until(lambda: addresses(registry) == ["10.1.0.2:8000"], timeout=40)  # what changed meanwhile
    # Watching again: a change after the recovery arrives without another list.
    lists = pod_lists(kube)
    kube.patch_status("v1", "Pod", "llm", "b", {"conditions": [{"type": "Ready", "status": "False"}]})
    await until(lambda: addresses(registry) == [])
    assert pod_lists(kube) == lists


def test_gateway_routes_to_pods_it_discovers_through_kubernetes(
    kube: KubeApiServer, stack: Stack, engines: list[Engine], tmp_path: Path
) -> None:
    """The whole gateway process with --kubernetes, configured by a kubeconfig file, behind Envoy."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "test",
                "clusters": [{"name": "test", "cluster": {"server": kube.base_url}}],
                "users": [{"name": "test", "user": {"token": "unused"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            }
        )
    )
    kube.create(pod("engine-0", model=MODEL, ip="127.0.0.1", port=engines[0].port))
    gateway = stack.start_gateway(
        "aibrix",
        None,
        "--kubernetes",
        "--namespace",
        "llm",
        name="gateway-k8s",
        env={"KUBECONFIG": str(kubeconfig)},
    )
    port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="envoy-k8s")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["target-pod"] == "engine-0"
    assert raw.headers["x-emulator-pod"] == engines[0].name
    kube.create(pod("engine-1", model=MODEL, ip="127.0.0.1", port=engines[1].port))
    kube.delete("v1", "Pod", "llm", "engine-0")
    for _ in range(100):  # the watch event lands within milliseconds
        raw = api.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}]
        )
        if raw.headers["target-pod"] == "engine-1":
            break
    assert raw.headers["x-emulator-pod"] == engines[1].name
    for child in [c for c in stack.children if c.name in {"envoy-k8s", "gateway-k8s"}]:
        stack.stop_child(child)
