"""ModelAdapter: placement, loading through real sidecars into emulated engines, status, retries, deletion."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from brickyard.stack import Engine, Stack
from brickyard_core.credentials import redis_client
from brickyard_core.podmetrics import decode_record, pod_key
from controllers.model_adapter import FINALIZER, SIDECAR_PORT_KEY
from controllers.runtime import MODEL_ADAPTERS, parse_time
from tests.conftest import MODEL, sidecar_auth
from tests.controllers.conftest import NAMESPACE, StartControllers, events, pod, until, writes
from tests.support.adapters import adapter
from tests.support.kube_api import KubeApiServer

pytestmark = pytest.mark.slow

SELECTOR = {"app": "ctl-engine"}


class Pods:
    """Three LoRA engines (2 slots each) with their sidecars, publishing records to Redis."""

    def __init__(self, engines: list[Engine], sidecars: list[int]) -> None:
        self.engines = engines
        self.sidecars = sidecars

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.engines]

    def manifest(self, i: int, **labels: str) -> dict[str, Any]:
        engine = self.engines[i]
        return pod(
            engine.name,
            {**SELECTOR, "model.aibrix.ai/name": MODEL, "model.aibrix.ai/port": str(engine.port), **labels},
            annotations={SIDECAR_PORT_KEY: str(self.sidecars[i])},
        )

    def models(self, i: int) -> list[str]:
        cards = httpx.get(f"{self.engines[i].url}/v1/models").json()["data"]
        return sorted(card["id"] for card in cards if card.get("parent"))

    def holders(self, name: str) -> list[str]:
        return [e.name for i, e in enumerate(self.engines) if name in self.models(i)]

    def sidecar(self, i: int, action: str, body: dict[str, Any]) -> httpx.Response:
        url = f"http://127.0.0.1:{self.sidecars[i]}/v1/lora_adapter/{action}"
        return httpx.post(url, json=body, headers=sidecar_auth(), timeout=30)


@pytest.fixture(scope="module")
def engine_pods(stack: Stack, redis_port: int) -> Pods:
    engines = [
        stack.start_engine(
            f"ctl-engine-{i}", MODEL, None, "--profile", "instant", "--enable-lora", "--max-loras", "2"
        )
        for i in range(3)
    ]
    sidecars = [stack.start_sidecar(e, redis_port, namespace=NAMESPACE) for e in engines]
    return Pods(engines, sidecars)


@pytest.fixture
def pods(engine_pods: Pods, kube: KubeApiServer) -> Iterator[Pods]:
    """The engine pods in the stand-in; every adapter unloaded afterwards (the engines are shared)."""
    for i in range(3):
        kube.create(engine_pods.manifest(i))
    yield engine_pods
    for i in range(3):
        for name in engine_pods.models(i):
            engine_pods.sidecar(i, "unload", {"lora_name": name})


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return tmp_path


def model_adapter(name: str, artifact: Path | str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "brickyard.dev/v1alpha1",
        "kind": "ModelAdapter",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "baseModel": MODEL,
            "podSelector": {"matchLabels": SELECTOR},
            "artifactURL": str(artifact),
            **spec,
        },
    }


def status(kube: KubeApiServer, name: str) -> dict[str, Any]:
    obj = kube.get("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, name)
    return (obj or {}).get("status") or {}


def condition(kube: KubeApiServer, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(kube, name).get("conditions") or [] if c["type"] == type_), {})


async def record_lists(redis_port: int, pod_name: str, adapters: set[str]) -> bool:
    client = redis_client(f"redis://127.0.0.1:{redis_port}/0")
    try:
        data = await client.get(pod_key(NAMESPACE, pod_name))
    finally:
        await client.aclose()
    return data is not None and set(decode_record(data)[2].adapters) == adapters


async def test_placed_on_the_least_loaded_pods_loaded_and_idempotent(
    kube: KubeApiServer, pods: Pods, artifacts: Path, redis_port: int, start_controllers: StartControllers
) -> None:
    assert pods.sidecar(
        0, "load", {"lora_name": "filler", "lora_path": str(adapter(artifacts, "filler"))}
    ).is_success
    await until(lambda: record_lists(redis_port, pods.names[0], {"filler"}), what="pod 0's record")
    async with start_controllers(redis_port) as app:
        kube.create(model_adapter("sql", adapter(artifacts, "sql"), replicas=2))
        await until(lambda: status(kube, "sql").get("phase") == "Running", what="Running")
        got = status(kube, "sql")
        assert got["instances"] == pods.names[1:]  # pod 0 already holds an adapter
        assert (got["readyReplicas"], got["desiredReplicas"], got["observedGeneration"]) == (2, 2, 1)
        assert got["failedAttempts"] == 0 and "nextRetryTime" not in got
        assert {c["type"]: c["status"] for c in got["conditions"]} == {
            "Initialized": "True",
            "Scheduled": "True",
            "Ready": "True",
        }
        assert pods.holders("sql") == pods.names[1:]
        assert kube.get("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, "sql")["metadata"][
            "finalizers"
        ] == [FINALIZER]
        assert events(kube, "sql") == [("Normal", "Loaded"), ("Normal", "Loaded")]

        # Level-triggered and idempotent: more reconciles (resyncs, a direct call) write nothing.
        reconciles = app.model_adapters.controller.stats.reconciles
        await until(lambda: app.model_adapters.controller.stats.reconciles > reconciles, what="a resync")
        before = len(kube.requests)
        reconciles = app.model_adapters.controller.stats.reconciles
        await app.model_adapters.reconcile(f"{NAMESPACE}/sql")
        await until(lambda: app.model_adapters.controller.stats.reconciles >= reconciles + 2, what="resyncs")
        assert writes(kube, before) == []
        assert pods.holders("sql") == pods.names[1:]


async def test_respects_max_loras(
    kube: KubeApiServer, pods: Pods, artifacts: Path, redis_port: int, start_controllers: StartControllers
) -> None:
    for name in ("full-a", "full-b"):  # pod 0's two slots
        assert pods.sidecar(
            0, "load", {"lora_name": name, "lora_path": str(adapter(artifacts, name))}
        ).is_success
    await until(lambda: record_lists(redis_port, pods.names[0], {"full-a", "full-b"}), what="pod 0 full")
    async with start_controllers(redis_port):
        kube.create(model_adapter("chat", adapter(artifacts, "chat"), schedulerName="bin-pack"))  # every pod
        await until(lambda: status(kube, "chat").get("readyReplicas") == 2, what="two instances")
        got = status(kube, "chat")
        assert (got["phase"], got["instances"], got["desiredReplicas"]) == ("Bound", pods.names[1:], 3)
        assert condition(kube, "chat", "Scheduled")["reason"] == "NoFreeSlots"
        assert condition(kube, "chat", "Ready")["status"] == "False"
        assert pods.holders("chat") == pods.names[1:]
        assert pods.models(0) == ["full-a", "full-b"]  # never asked to load a third


async def test_re_placed_when_its_pod_is_deleted_or_unlabelled(
    kube: KubeApiServer, pods: Pods, artifacts: Path, redis_port: int, start_controllers: StartControllers
) -> None:
    async with start_controllers(redis_port):
        kube.create(model_adapter("ops", adapter(artifacts, "ops"), replicas=1))
        first = (await until(lambda: status(kube, "ops").get("instances"), what="placed"))[0]
        kube.delete("v1", "Pod", NAMESPACE, first)  # the pod dies (its engine lives on here)
        second = (await until(lambda: [p for p in status(kube, "ops").get("instances", []) if p != first]))[0]
        assert status(kube, "ops")["instances"] == [second]
        assert status(kube, "ops")["phase"] == "Running"
        i = pods.names.index(second)
        kube.patch("v1", "Pod", NAMESPACE, second, {"metadata": {"labels": {"app": "elsewhere"}}})
        third = (await until(lambda: [p for p in status(kube, "ops").get("instances", []) if p != second]))[0]
        assert third not in (first, second)
        await until(lambda: "ops" not in pods.models(i), what="unloaded from the unlabelled pod")
        kube.patch_status(
            "v1", "Pod", NAMESPACE, third, {"conditions": [{"type": "Ready", "status": "False"}]}
        )
        await until(lambda: status(kube, "ops").get("phase") == "Pending", what="no candidate left")
        assert status(kube, "ops")["instances"] == []
        assert condition(kube, "ops", "Scheduled")["reason"] == "NoCandidatePods"


async def test_fewer_replicas_unload_and_the_finalizer_unloads_the_rest(
    kube: KubeApiServer, pods: Pods, artifacts: Path, redis_port: int, start_controllers: StartControllers
) -> None:
    async with start_controllers(redis_port):
        kube.create(model_adapter("summarize", adapter(artifacts, "summarize")))
        await until(lambda: status(kube, "summarize").get("readyReplicas") == 3, what="on every pod")
        assert pods.holders("summarize") == pods.names
        kube.patch(
            "brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, "summarize", {"spec": {"replicas": 1}}
        )
        await until(lambda: len(pods.holders("summarize")) == 1, what="unloaded beyond replicas")
        await until(
            lambda: status(kube, "summarize").get("instances") == pods.holders("summarize"), what="status"
        )
        kube.delete("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, "summarize")
        await until(
            lambda: kube.get("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, "summarize") is None,
            what="gone",
        )
        assert pods.holders("summarize") == []
        assert [reason for _, reason in events(kube, "summarize")].count("Unloaded") == 3  # 2 + 1


async def test_failing_load_backs_off_then_fails_and_a_spec_fix_recovers(
    kube: KubeApiServer, pods: Pods, artifacts: Path, redis_port: int, start_controllers: StartControllers
) -> None:
    async with start_controllers(redis_port):
        start = len(kube.requests)
        kube.create(model_adapter("broken", artifacts / "missing", replicas=1))
        await until(lambda: status(kube, "broken").get("phase") == "Failed", what="Failed")
        got = status(kube, "broken")
        assert got["failedAttempts"] == 5 and "nextRetryTime" not in got
        ready = condition(kube, "broken", "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "RetriesExhausted")
        assert "404" in ready["message"]
        # Every failed try but the last was recorded with its next retry time, 50 ms doubling.
        written = [
            r.body["status"]
            for r in kube.requests[start:]
            if r.method == "PUT" and r.path.endswith("/broken/status")
        ]
        retries = [
            (s["failedAttempts"], parse_time(s["nextRetryTime"])) for s in written if s.get("nextRetryTime")
        ]
        assert [n for n, _ in retries] == [1, 2, 3, 4]
        for (n, at), (_, later) in itertools.pairwise(retries):
            assert later - at >= 0.05 * 2**n - 0.001  # the next try came after this one's delay
        assert [reason for _, reason in events(kube, "broken")] == ["LoadFailed"] * 4 + ["RetriesExhausted"]
        assert pods.holders("broken") == []

        # A spec change starts over.
        kube.patch(
            "brickyard.dev/v1alpha1",
            "ModelAdapter",
            NAMESPACE,
            "broken",
            {"spec": {"artifactURL": str(adapter(artifacts, "broken"))}},
        )
        await until(lambda: status(kube, "broken").get("phase") == "Running", what="recovered")
        assert status(kube, "broken")["failedAttempts"] == 0
        assert status(kube, "broken")["observedGeneration"] == 2


async def test_a_concurrent_write_409_is_survived(
    kube: KubeApiServer, pods: Pods, artifacts: Path, redis_port: int, start_controllers: StartControllers
) -> None:
    async with start_controllers(redis_port) as app:
        client = app.manager.client
        original = client.replace
        raced = []

        async def racing_replace(
            resource: Any, obj: dict[str, Any], *, subresource: str | None = None
        ) -> Any:
            if resource == MODEL_ADAPTERS and subresource == "status" and not raced:
                # Someone else writes the object between our read and our write: our resourceVersion is stale.
                meta = obj["metadata"]
                kube.patch_status(
                    "brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, meta["name"], {"phase": "Scribbled"}
                )
                raced.append(meta["name"])
            return await original(resource, obj, subresource=subresource)

        client.replace = racing_replace  # type: ignore[method-assign]
        kube.create(model_adapter("racy", adapter(artifacts, "racy"), replicas=1))
        await until(lambda: status(kube, "racy").get("phase") == "Running", what="Running despite the race")
        assert raced == ["racy"]
        puts = [r for r in kube.requests if r.method == "PUT" and r.path.endswith("/racy/status")]
        assert len(puts) >= 2  # the 409, then the write on the re-read object
        assert len(pods.holders("racy")) == 1


async def test_invalid_spec_is_failed_with_a_reason(
    kube: KubeApiServer, pods: Pods, redis_port: int, start_controllers: StartControllers
) -> None:
    async with start_controllers(redis_port) as app:
        bad = model_adapter("bad", "/x", schedulerName="first-fit")
        del bad["spec"]["podSelector"]
        kube.create(bad)
        await until(lambda: status(kube, "bad").get("phase") == "Failed", what="Failed")
        init = condition(kube, "bad", "Initialized")
        assert init["reason"] == "InvalidSpec"
        assert "podSelector" in init["message"] and "schedulerName" in init["message"]
        await until(lambda: events(kube, "bad") == [("Warning", "InvalidSpec")], what="the event")
        reconciles = app.model_adapters.controller.stats.reconciles
        await until(lambda: app.model_adapters.controller.stats.reconciles >= reconciles + 2, what="resyncs")
        assert events(kube, "bad") == [("Warning", "InvalidSpec")]  # not repeated: the status did not change
