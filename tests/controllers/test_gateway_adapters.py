"""Gateway side: with Kubernetes discovery, an adapter routes only to its ModelAdapter's status.instances."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from gateway_plugins.discovery.kubernetes import ModelAdapterDiscovery
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import build_strategies
from gateway_plugins.routing.types import RoutingRequest
from tests.controllers.conftest import MODEL_ADAPTER_CRD, NAMESPACE, until
from tests.support.kube_api import KubeApiServer

MA = ("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE)


def registry_with_adapter_everywhere() -> PodRegistry:
    registry = PodRegistry()
    registry.replace_all([PodInfo(name, f"10.0.0.{i}:8000", "base") for i, name in enumerate("abc")])
    for name in "abc":  # every pod's record lists the adapter
        registry.set_adapters("default", name, ("sql",))
    return registry


def ready(registry: PodRegistry, model: str = "sql") -> list[str]:
    return [p.name for p in registry.ready_pods(model)]


def test_registry_narrows_an_adapter_to_its_instances() -> None:
    registry = registry_with_adapter_everywhere()
    router = Router(registry, build_strategies(), default_strategy="least-request")
    assert ready(registry) == ["a", "b", "c"]
    registry.set_adapter_instances("sql", [("default", "b")])
    assert ready(registry) == ["b"]
    assert {router.route(RoutingRequest("sql")).pod.name for _ in range(10)} == {"b"}
    registry.set_adapter_instances("sql", [("default", "b"), ("default", "z")])  # z: no record lists it
    assert ready(registry) == ["b"]
    registry.set_adapter_instances("sql", [])  # placed nowhere (yet): known, not served
    assert ready(registry) == [] and registry.knows_model("sql")
    with pytest.raises(GatewayError) as info:
        router.route(RoutingRequest("sql"))
    assert info.value.status == 503
    registry.set_adapter_instances("sql", None)  # its ModelAdapter is gone: the records decide again
    assert ready(registry) == ["a", "b", "c"]
    assert ready(registry, "base") == ["a", "b", "c"]  # base models are never narrowed


@contextlib.asynccontextmanager
async def watching(kube: KubeApiServer, registry: PodRegistry) -> AsyncIterator[ModelAdapterDiscovery]:
    api_client = kube.api_client()
    watcher = ModelAdapterDiscovery(
        registry, namespace=NAMESPACE, watch_timeout_seconds=5, api_client=api_client
    )
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        api_client.close()


async def test_the_watcher_follows_model_adapter_status() -> None:
    registry = registry_with_adapter_everywhere()
    with KubeApiServer(bookmark_interval=0.2) as kube:
        kube.register_crd(MODEL_ADAPTER_CRD)
        kube.create(
            {
                "apiVersion": MA[0],
                "kind": "ModelAdapter",
                "metadata": {"name": "sql", "namespace": NAMESPACE},
                "spec": {"podSelector": {"matchLabels": {"app": "vllm"}}, "artifactURL": "/x"},
                "status": {"instances": ["b"]},
            }
        )
        async with watching(kube, registry) as watcher:
            assert ready(registry) == ["b"]  # from the first list
            assert not watcher.absent
            kube.patch_status(*MA, "sql", {"instances": ["a", "c"]})
            await until(lambda: ready(registry) == ["a", "c"], what="re-placed")
            kube.patch_status(*MA, "sql", {"instances": ["c"]})
            await until(lambda: ready(registry) == ["c"], what="after a change")
            kube.delete(*MA, "sql")
            await until(lambda: ready(registry) == ["a", "b", "c"], what="unrestricted again")


async def test_without_the_crd_the_watcher_logs_once_and_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = registry_with_adapter_everywhere()
    with KubeApiServer(bookmark_interval=0.2) as kube:
        async with watching(kube, registry) as watcher:
            assert watcher.absent
            assert ready(registry) == ["a", "b", "c"]
        assert sum("CRD" in r.getMessage() and "not installed" in r.getMessage() for r in caplog.records) == 1
