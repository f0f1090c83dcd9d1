"""Controllers against the Kubernetes API stand-in, real Redis, real sidecars and emulated engines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from brickyard_core import typed_config
from controllers.app import ControllerApp
from controllers.config import ControllerSettings
from tests.support.crd_schema import known_crds
from tests.support.kube_api import KubeApiServer

NAMESPACE = "default"  # the sidecars publish their records as pods of this namespace
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def crd(group: str, version: str, plural: str, kind: str, *, scale: dict[str, str] | None = None) -> dict:
    """A schema-less CRD, for a kind a test makes up (a scale target no project of ours defines)."""
    subresources: dict[str, Any] = {"status": {}}
    if scale is not None:
        subresources["scale"] = scale
    return {
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                    "subresources": subresources,
                }
            ],
        },
    }


def without_schema(kube: KubeApiServer, manifest: dict) -> None:
    """Serve a kind by ``manifest`` (a ``crd(...)``) in place of its real CRD, for objects the real schema
    refuses that a test needs: specs only a controller's own checks catch, sub-second windows."""
    kube.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, manifest["metadata"]["name"])
    kube.register_crd(manifest)


#: The real CRDs of the kinds the controllers read and write (deploy/, tests/support/crds/), so the
#: stand-in admits their objects as a cluster would: schemas, defaults, pruning, CEL rules.
CRDS = known_crds()
MODEL_ADAPTER_CRD = CRDS["modeladapters.brickyard.dev"]


@pytest.fixture
def kube() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=0.2) as server:
        for manifest in CRDS.values():
            server.register_crd(manifest)
        yield server


def fast_settings(redis_port: int | None, **overrides: Any) -> ControllerSettings:
    """Short periods everywhere, so each behaviour shows within a fraction of a second."""
    values: dict[str, Any] = {
        "namespace": NAMESPACE,
        "redis_url": f"redis://127.0.0.1:{redis_port}/0" if redis_port else None,
        "resync_seconds": 0.5,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.5,
        "watch_timeout_seconds": 5,
        "model_adapter.retry_base_seconds": 0.05,
        "model_adapter.retry_max_seconds": 1.0,
        "model_adapter.http_timeout_seconds": 5.0,
        "pod_autoscaler.sample_seconds": 0.1,
        "pod_autoscaler.metrics_timeout_seconds": 1.0,
        "model_routes.gateway_name": "test-gateway",
        **overrides,
    }
    return typed_config.load(ControllerSettings, None, values)


StartControllers = Callable[..., contextlib.AbstractAsyncContextManager[ControllerApp]]


@pytest.fixture
def start_controllers(kube: KubeApiServer) -> Iterator[StartControllers]:
    """``async with start_controllers(redis_port, **setting_overrides) as app:``."""
    clients = []

    @contextlib.asynccontextmanager
    async def start(redis_port: int | None, **overrides: Any) -> AsyncIterator[ControllerApp]:
        api_client = kube.api_client()
        clients.append(api_client)
        async with ControllerApp(fast_settings(redis_port, **overrides), api_client).running(
            sync_timeout=10
        ) as app:
            yield app

    yield start
    for api_client in clients:
        api_client.close()


def pod(
    name: str,
    labels: dict[str, str],
    *,
    ip: str = "127.0.0.1",
    ready: bool = True,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": labels,
            "annotations": annotations or {},
        },
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def writes(kube: KubeApiServer, since: int = 0) -> list[tuple[str, str]]:
    """(method, path) of the write requests the stand-in received after the first ``since``."""
    return [(r.method, r.path) for r in kube.requests[since:] if r.method in WRITES]


def events(kube: KubeApiServer, name: str) -> list[tuple[str, str]]:
    """(type, reason) of the Events recorded about the object called ``name``, oldest first."""
    found = kube.list("v1", "Event", NAMESPACE, field_selector=f"involvedObject.name={name}")
    return [
        (e["type"], e["reason"]) for e in sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))
    ]
