"""ModelAdapter: placement, loading through real sidecars into emulated engines, status, retries, deletion,
loads that take long."""

from __future__ import annotations

import asyncio
import io
import itertools
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from brickyard.stack import Engine, Stack
from brickyard_core.credentials import redis_client
from brickyard_core.kube.client import MODEL_ADAPTERS
from brickyard_core.kube.objects import parse_time
from brickyard_core.podmetrics import decode_record, pod_key
from controllers.model_adapter import FINALIZER, SIDECAR_PORT_KEY
from tests.conftest import MODEL, sidecar_auth
from tests.controllers.conftest import (
    NAMESPACE,
    StartControllers,
    crd,
    events,
    pod,
    until,
    without_schema,
    writes,
)
from tests.support.adapters import adapter
from tests.support.http_server import serve_in_thread
from tests.support.kube_api import KubeApiServer

pytestmark = pytest.mark.slow

SELECTOR = {"app": "ctl-engine"}
SLOW_SELECTOR = {"app": "ctl-slow"}


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


class SlowPod:
    """A LoRA engine pod whose adapters come from an artifact store that answers only once the test opens
    it: a load there takes as long as the test wants. Adapter names must be new to the session (the
    sidecars keep what they fetched)."""

    def __init__(self, engine: Engine, sidecar: int, root: Path) -> None:
        self.engine = engine
        self.sidecar = sidecar
        self.root = root
        self.port = 0
        self.opened = threading.Event()
        self.asked: set[str] = set()  # adapters the sidecar is fetching (its load of them under way)

    @property
    def name(self) -> str:
        return self.engine.name

    def manifest(self) -> dict[str, Any]:
        labels = {
            **SLOW_SELECTOR,
            "model.aibrix.ai/name": MODEL,
            "model.aibrix.ai/port": str(self.engine.port),
        }
        return pod(self.name, labels, annotations={SIDECAR_PORT_KEY: str(self.sidecar)})

    def model_adapter(self, name: str) -> dict[str, Any]:
        """A ModelAdapter of one replica on this pod, its artifact in the store."""
        url = f"http://127.0.0.1:{self.port}/{name}.tar.gz"
        return model_adapter(name, url, podSelector={"matchLabels": SLOW_SELECTOR}, replicas=1)

    def models(self) -> list[str]:
        cards = httpx.get(f"{self.engine.url}/v1/models").json()["data"]
        return sorted(card["id"] for card in cards if card.get("parent"))

    async def archive(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.asked.add(name)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(adapter(self.root, name), arcname=name)
        await asyncio.to_thread(self.opened.wait, 60)
        return web.Response(body=buffer.getvalue())


@pytest.fixture(scope="module")
def slow_engine(stack: Stack, redis_port: int) -> tuple[Engine, int]:
    engine = stack.start_engine(
        "ctl-slow", MODEL, None, "--profile", "instant", "--enable-lora", "--max-loras", "2"
    )
    # The artifact store is on loopback: a private address this sidecar must be allowed to fetch from.
    flags = ("--artifact-scheme", "http", "--allow-private-networks")
    return engine, stack.start_sidecar(engine, redis_port, *flags, namespace=NAMESPACE)


@pytest.fixture
def slow(slow_engine: tuple[Engine, int], kube: KubeApiServer, tmp_path: Path) -> Iterator[SlowPod]:
    """The slow pod in the stand-in; opened and emptied afterwards."""
    slow = SlowPod(*slow_engine, tmp_path / "store")
    app = web.Application()
    app.router.add_get("/{name}.tar.gz", slow.archive)
    with serve_in_thread(app) as slow.port:
        kube.create(slow.manifest())
        try:
            yield slow
        finally:
            slow.opened.set()
    url = f"http://127.0.0.1:{slow.sidecar}/v1/lora_adapter/unload"
    for name in slow.models():
        httpx.post(url, json={"lora_name": name}, headers=sidecar_auth(), timeout=30)


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
        # Each load's event is recorded once the reconcile after its end takes it in, maybe after the
        # status (the engines' /v1/models) already says Running.
        await until(lambda: events(kube, "sql") == [("Normal", "Loaded")] * 2, what="the events")

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
                    "brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, meta["name"], {"phase": "Unknown"}
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
    # A CRD that checks no spec (hand-written, or older than deploy/'s): the controller's own checks catch it.
    without_schema(kube, crd("brickyard.dev", "v1alpha1", "modeladapters", "ModelAdapter"))
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


async def test_a_slow_load_is_loading_and_blocks_no_other_adapter(
    kube: KubeApiServer,
    pods: Pods,
    slow: SlowPod,
    artifacts: Path,
    redis_port: int,
    start_controllers: StartControllers,
) -> None:
    # One worker: a reconcile waiting for a load would hold up every other adapter.
    async with start_controllers(redis_port, workers=1) as app:
        kube.create(slow.model_adapter("slow-sql"))
        await until(lambda: "slow-sql" in slow.asked, what="the sidecar fetching the artifact")
        await until(lambda: status(kube, "slow-sql").get("phase") == "Loading", what="Loading")
        ready = condition(kube, "slow-sql", "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Loading")
        assert slow.name in ready["message"]

        kube.create(model_adapter("quick", adapter(artifacts, "quick"), replicas=1))
        await until(lambda: status(kube, "quick").get("phase") == "Running", what="placed meanwhile")
        assert status(kube, "slow-sql")["phase"] == "Loading"
        assert app.model_adapters.loading(f"{NAMESPACE}/slow-sql") == {slow.name}
        assert slow.models() == []

        slow.opened.set()
        await until(lambda: status(kube, "slow-sql").get("phase") == "Running", what="Running")
        got = status(kube, "slow-sql")
        assert (got["instances"], got["readyReplicas"], got["failedAttempts"]) == ([slow.name], 1, 0)
        assert slow.models() == ["slow-sql"]
        assert events(kube, "slow-sql") == [("Normal", "Loaded")]
        assert not app.model_adapters.loading(f"{NAMESPACE}/slow-sql")


async def test_deleting_an_adapter_mid_load_cancels_the_load(
    kube: KubeApiServer, slow: SlowPod, redis_port: int, start_controllers: StartControllers
) -> None:
    key = f"{NAMESPACE}/slow-doomed"
    async with start_controllers(redis_port) as app:
        kube.create(slow.model_adapter("slow-doomed"))
        await until(lambda: "slow-doomed" in slow.asked, what="the sidecar fetching the artifact")
        assert app.model_adapters.loading(key) == {slow.name}
        kube.delete("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, "slow-doomed")
        await until(lambda: not app.model_adapters.loading(key), what="the load cancelled")
        assert slow.models() == []  # the store has not answered: the load cannot have ended otherwise

        # The sidecar finishes what it started; the finalizer's unload waits for it, then the object goes.
        slow.opened.set()
        await until(
            lambda: kube.get("brickyard.dev/v1alpha1", "ModelAdapter", NAMESPACE, "slow-doomed") is None,
            what="gone",
        )
        assert slow.models() == []
        assert "Loaded" not in [reason for _, reason in events(kube, "slow-doomed")]


async def test_a_controller_restarted_mid_load_converges(
    kube: KubeApiServer, slow: SlowPod, redis_port: int, start_controllers: StartControllers
) -> None:
    key = f"{NAMESPACE}/slow-restart"
    async with start_controllers(redis_port):
        kube.create(slow.model_adapter("slow-restart"))
        await until(lambda: "slow-restart" in slow.asked, what="the sidecar fetching the artifact")
        await until(lambda: status(kube, "slow-restart").get("phase") == "Loading", what="Loading")
    # Stopped mid-load (the sidecar goes on): the next controller knows only the status and the engines.
    async with start_controllers(redis_port) as app:
        await until(lambda: app.model_adapters.loading(key) == {slow.name}, what="loading again")
        slow.opened.set()  # the sidecar ends the first load, then answers the second: already there
        await until(lambda: status(kube, "slow-restart").get("phase") == "Running", what="Running")
        assert status(kube, "slow-restart")["instances"] == [slow.name]
        assert slow.models() == ["slow-restart"]
