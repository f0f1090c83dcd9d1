"""PodAutoscaler: KPA and APA through the scale subresource on metrics from Redis records and pod
endpoints, HPA mode as a native autoscaling/v2 HorizontalPodAutoscaler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from brickyard.stack import free_port
from brickyard_core.credentials import redis_client
from brickyard_core.podmetrics import PodMetrics, encode_record, pod_key, read_records
from controllers.pod_autoscaler import STATE_ANNOTATION
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
from tests.support.kube_api import KubeApiServer

PA = ("brickyard.dev/v1alpha1", "PodAutoscaler", NAMESPACE)
#: PodAutoscalers the real CRD refuses: sub-second windows, scale targets beyond the ClusterRole's kinds,
#: specs only the controller's own checks catch.
UNCHECKED_PODAUTOSCALERS = crd("brickyard.dev", "v1alpha1", "podautoscalers", "PodAutoscaler")


def deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
            },
        },
    }


def autoscaler(name: str, target: dict[str, str], strategy: str, source: dict[str, Any], **spec: Any) -> dict:
    return {
        "apiVersion": "brickyard.dev/v1alpha1",
        "kind": "PodAutoscaler",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": 1,
            "maxReplicas": 10,
            "scalingStrategy": strategy,
            "metricsSources": [source],
            **spec,
        },
    }


def replicas(kube: KubeApiServer, api_version: str, kind: str, name: str) -> int:
    return kube.get(api_version, kind, NAMESPACE, name)["spec"]["replicas"]


def pa_status(kube: KubeApiServer, name: str) -> dict[str, Any]:
    return (kube.get(*PA, name) or {}).get("status") or {}


@contextlib.asynccontextmanager
async def records(redis_port: int, values: dict[str, int]) -> AsyncIterator[dict[str, int]]:
    """Publish fresh pod-metrics records (``waiting`` per pod) every 50 ms, as sidecars would; change
    the yielded dict to change the load."""
    client = redis_client(f"redis://127.0.0.1:{redis_port}/0")

    async def publish() -> None:
        while True:
            for pod_name, waiting in values.items():
                record = encode_record(
                    NAMESPACE, pod_name, PodMetrics(timestamp=time.time(), waiting=waiting)
                )
                await client.set(pod_key(NAMESPACE, pod_name), record, px=10_000)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(publish())
    try:
        yield values
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


async def test_records_are_read_by_the_shared_reader_rules(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader of the autoscaler, the ModelAdapter controller and the gateway: one MGET; a missing key, a
    malformed record (logged) and, given a max age, an older record are left out."""
    client = redis_client(f"redis://127.0.0.1:{redis_port}/0")
    now = time.time()
    stored = {
        "reader-fresh": encode_record(NAMESPACE, "reader-fresh", PodMetrics(timestamp=now, waiting=3)),
        "reader-old": encode_record(NAMESPACE, "reader-old", PodMetrics(timestamp=now - 5, waiting=4)),
        "reader-broken": b'{"namespace": "default"}',
    }
    keys = [pod_key(NAMESPACE, name) for name in (*stored, "reader-missing")]
    try:
        for name, data in stored.items():
            await client.set(pod_key(NAMESPACE, name), data, px=10_000)
        fresh = await read_records(client, keys, max_age=2.0)
        assert [(pod, record.waiting) for _, pod, record in fresh] == [("reader-fresh", 3)]
        every = await read_records(client, keys)
        assert [(pod, record.waiting) for _, pod, record in every] == [("reader-fresh", 3), ("reader-old", 4)]
        assert "malformed pod-metrics record" in caplog.text
        assert await read_records(client, []) == []
    finally:
        await client.delete(*keys)
        await client.aclose()


async def test_kpa_scales_up_on_queues_and_never_down_in_panic(
    kube: KubeApiServer, redis_port: int, start_controllers: StartControllers
) -> None:
    without_schema(kube, UNCHECKED_PODAUTOSCALERS)
    kube.create(deployment("kpa"))
    kube.create(pod("kpa-0", {"app": "kpa"}))
    source = {"metricSourceType": "redis", "targetMetric": "waiting", "targetValue": "2"}
    tunables = {"stableWindowSeconds": 1.5, "panicWindowSeconds": 0.5, "scaleDownCooldownSeconds": 0}
    async with records(redis_port, {"kpa-0": 10}) as load, start_controllers(redis_port) as app:
        kube.create(
            autoscaler(
                "kpa",
                {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kpa"},
                "KPA",
                source,
                **tunables,
            )
        )
        # 10 waiting against 2 per replica: panic (5 wanted for 1), doubling per decision up to 5.
        await until(lambda: replicas(kube, "apps/v1", "Deployment", "kpa") == 5, what="scaled to 5")
        await until(lambda: pa_status(kube, "kpa").get("actualScale") == 5, what="status written")
        scale_writes = [w for w in writes(kube) if w[1].endswith("/deployments/kpa/scale")]
        assert [m for m, _ in scale_writes] == ["PATCH"] * len(scale_writes) and len(scale_writes) >= 2
        state = json.loads(kube.get(*PA, "kpa")["metadata"]["annotations"][STATE_ANNOTATION])
        assert state["panic_until"] is not None and state["max_panic_replicas"] >= 1
        got = pa_status(kube, "kpa")
        assert (got["desiredScale"], got["actualScale"], got["observedGeneration"]) == (5, 5, 1)
        assert got["lastScaleTime"]
        conditions = {c["type"]: (c["status"], c["reason"]) for c in got["conditions"]}
        assert conditions["AbleToScale"][0] == "True"
        assert conditions["ScalingActive"] == ("True", "ValidMetricFound")
        assert conditions["ScalingLimited"] == ("False", "DesiredWithinRange")
        rescales = [reason for kind, reason in events(kube, "kpa") if reason == "SuccessfulRescale"]
        assert len(rescales) == len(scale_writes)

        # The queues drain: still panicking, so no scale-down for the next decisions ...
        load["kpa-0"] = 0
        decisions = app.pod_autoscalers.controller.stats.reconciles
        await until(
            lambda: app.pod_autoscalers.controller.stats.reconciles >= decisions + 4, what="decisions"
        )
        assert replicas(kube, "apps/v1", "Deployment", "kpa") == 5
        # ... and down once panic has lasted a stable window since the last threshold crossing.
        await until(
            lambda: replicas(kube, "apps/v1", "Deployment", "kpa") < 5, what="scaled down after panic"
        )
        await until(
            lambda: (
                json.loads(kube.get(*PA, "kpa")["metadata"]["annotations"][STATE_ANNOTATION])["panic_until"]
                is None
            ),
            what="panic over in the persisted state",
        )


@pytest.fixture
async def metrics_endpoint() -> AsyncIterator[tuple[int, dict[str, float]]]:
    """A Prometheus endpoint standing in for each engine pod's /metrics (same value for every pod)."""
    values = {"waiting": 3.0}

    async def metrics(_: web.Request) -> web.Response:
        text = (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {values["waiting"]}\n'
        )
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, values
    await runner.cleanup()


async def test_apa_scales_a_custom_resource_through_its_scale_subresource_on_pod_metrics(
    kube: KubeApiServer,
    redis_port: int,
    start_controllers: StartControllers,
    metrics_endpoint: tuple[int, dict[str, float]],
) -> None:
    without_schema(kube, UNCHECKED_PODAUTOSCALERS)
    kube.register_crd(
        crd(
            "example.dev",
            "v1",
            "inferencesets",
            "InferenceSet",
            scale={
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        )
    )
    kube.create(
        {
            "apiVersion": "example.dev/v1",
            "kind": "InferenceSet",
            "metadata": {"name": "apa", "namespace": NAMESPACE},
            "spec": {"replicas": 2},
            "status": {"replicas": 2, "selector": "app=apa"},
        }
    )
    for i in range(2):
        kube.create(pod(f"apa-{i}", {"app": "apa"}))
    kube.create(pod("apa-starting", {"app": "apa"}, ready=False))  # not Ready: not asked
    port, _ = metrics_endpoint
    source = {
        "metricSourceType": "pod",
        "targetMetric": "vllm:num_requests_waiting",
        "targetValue": "1",
        "port": str(port),
        "path": "/metrics",
    }
    async with start_controllers(redis_port, controllers=["pod-autoscaler"]):
        kube.create(
            autoscaler(
                "apa",
                {"apiVersion": "example.dev/v1", "kind": "InferenceSet", "name": "apa"},
                "APA",
                source,
                panicWindowSeconds=0.3,
                stableWindowSeconds=1,
            )
        )
        # 2 pods x 3 waiting against 1 per replica: 2 -> 4 (rate bound) -> 6, then within tolerance.
        await until(lambda: replicas(kube, "example.dev/v1", "InferenceSet", "apa") == 6, what="scaled to 6")
        await until(lambda: pa_status(kube, "apa").get("actualScale") == 6, what="status written")
        got = pa_status(kube, "apa")
        assert (got["desiredScale"], got["actualScale"]) == (6, 6)
        assert [r for _, r in events(kube, "apa")].count("SuccessfulRescale") == 2


async def test_metrics_missing_keeps_replicas_and_says_why(
    kube: KubeApiServer, redis_port: int, start_controllers: StartControllers
) -> None:
    kube.create(deployment("quiet", replicas=3))
    kube.create(pod("quiet-0", {"app": "quiet"}))  # no record in Redis for it
    source = {"metricSourceType": "redis", "targetMetric": "waiting", "targetValue": "1"}
    async with start_controllers(redis_port, controllers=["pod-autoscaler"]):
        kube.create(
            autoscaler(
                "quiet", {"apiVersion": "apps/v1", "kind": "Deployment", "name": "quiet"}, "KPA", source
            )
        )
        await until(
            lambda: any(
                c["reason"] == "FailedGetMetrics" for c in pa_status(kube, "quiet").get("conditions", [])
            ),
            what="FailedGetMetrics",
        )
        assert replicas(kube, "apps/v1", "Deployment", "quiet") == 3
        assert ("Warning", "FailedGetMetrics") in events(kube, "quiet")


async def test_hpa_mode_keeps_a_native_hpa(
    kube: KubeApiServer, redis_port: int, start_controllers: StartControllers
) -> None:
    kube.create(deployment("cpu"))
    source = {"metricSourceType": "resource", "targetMetric": "cpu", "targetValue": "70"}
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "cpu"}
    async with start_controllers(redis_port, controllers=["pod-autoscaler"]):
        created = kube.create(autoscaler("cpu", target, "HPA", source, minReplicas=2, maxReplicas=6))
        hpa = await until(
            lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NAMESPACE, "cpu"), what="HPA"
        )
        assert hpa["spec"]["scaleTargetRef"] == target
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
        assert hpa["spec"]["metrics"] == [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
            }
        ]
        owner = hpa["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "PodAutoscaler",
            "cpu",
            created["metadata"]["uid"],
            True,
        )
        await until(lambda: ("Normal", "HPACreated") in events(kube, "cpu"), what="HPACreated event")

        # Kubernetes' HPA controller acts; the PodAutoscaler's status mirrors it.
        kube.patch_status(
            "autoscaling/v2",
            "HorizontalPodAutoscaler",
            NAMESPACE,
            "cpu",
            {
                "desiredReplicas": 4,
                "currentReplicas": 2,
                "conditions": [
                    {"type": "AbleToScale", "status": "True", "reason": "SucceededRescale", "message": "ok"}
                ],
            },
        )
        await until(lambda: pa_status(kube, "cpu").get("desiredScale") == 4, what="status mirrored")
        assert pa_status(kube, "cpu")["actualScale"] == 2

        # A drifted HPA is put back; a switch to KPA removes it.
        kube.patch(
            "autoscaling/v2", "HorizontalPodAutoscaler", NAMESPACE, "cpu", {"spec": {"maxReplicas": 99}}
        )
        await until(
            lambda: (
                kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NAMESPACE, "cpu")["spec"]["maxReplicas"]
                == 6
            ),
            what="drift repaired",
        )
        kube.patch(
            *PA,
            "cpu",
            {
                "spec": {
                    "scalingStrategy": "KPA",
                    "metricsSources": [
                        {"metricSourceType": "redis", "targetMetric": "waiting", "targetValue": "1"}
                    ],
                }
            },
        )
        await until(
            lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NAMESPACE, "cpu") is None,
            what="HPA deleted",
        )
        await until(lambda: ("Normal", "HPADeleted") in events(kube, "cpu"), what="HPADeleted event")


async def test_invalid_spec(
    kube: KubeApiServer, redis_port: int, start_controllers: StartControllers
) -> None:
    without_schema(kube, UNCHECKED_PODAUTOSCALERS)
    async with start_controllers(redis_port, controllers=["pod-autoscaler"]):
        source = {"metricSourceType": "resource", "targetMetric": "cpu", "targetValue": "70"}
        kube.create(
            autoscaler(
                "odd",
                {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "KPA",
                source,
                stableWindowSeconds=10,
                panicWindowSeconds=20,
            )
        )
        await until(lambda: pa_status(kube, "odd").get("conditions"), what="status")
        active = next(c for c in pa_status(kube, "odd")["conditions"] if c["type"] == "ScalingActive")
        assert (active["status"], active["reason"]) == ("False", "InvalidSpec")
        assert "scalingStrategy HPA" in active["message"]
