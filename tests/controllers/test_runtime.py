"""The controller-runtime pieces: work queue, informer, controller loop, client helpers, settings."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import pytest

from brickyard_core.kube.client import (
    DEPLOYMENTS,
    MODEL_ADAPTERS,
    POD_AUTOSCALERS,
    PODS,
    ApiError,
    KubeClient,
    Resource,
)
from brickyard_core.kube.informer import Informer
from brickyard_core.kube.objects import selector_matches, selector_string
from controllers.config import ControllerSettings
from controllers.runtime.conditions import set_condition
from controllers.runtime.controller import Controller, Result
from controllers.runtime.events import EventRecorder
from controllers.runtime.workqueue import WorkQueue
from tests.controllers.conftest import NAMESPACE, crd, pod, until
from tests.support.crd_schema import DEPLOY_CRDS, load_crds
from tests.support.kube_api import KubeApiServer

REPO = Path(__file__).resolve().parents[2]


async def test_work_queue_dedupes_and_keeps_a_key_on_one_worker() -> None:
    queue = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert len(queue) == 2
    first = await queue.get()
    assert first == "a"
    queue.add("a")  # changed while being reconciled: not handed out again until done
    assert await queue.get() == "b"
    assert len(queue) == 0
    queue.done("a")
    assert await queue.get() == "a"  # ... then queued again, once
    queue.done("a")
    queue.done("b")
    assert len(queue) == 0


async def test_work_queue_backoff_doubles_and_forget_resets() -> None:
    queue = WorkQueue(backoff_base=0.02, backoff_max=0.05)
    loop = asyncio.get_running_loop()
    delays = []
    for _ in range(4):
        start = loop.time()
        queue.add_rate_limited("k")
        assert await queue.get() == "k"
        queue.done("k")
        delays.append(loop.time() - start)
    assert queue.failures("k") == 4
    assert delays[0] >= 0.015 and delays[1] >= 0.035 and delays[3] < 0.5  # 0.02, 0.04, then capped at 0.05
    queue.forget("k")
    assert queue.failures("k") == 0


async def test_add_after_keeps_the_earliest() -> None:
    queue = WorkQueue()
    queue.add_after("k", 10)
    queue.add_after("k", 0.01)
    queue.add_after("k", 5)
    assert await asyncio.wait_for(queue.get(), 1) == "k"
    queue.shutdown()


async def test_controller_requeues_conflicts_and_errors_with_backoff() -> None:
    with KubeApiServer() as kube:
        client = KubeClient(kube.api_client())
        informer = Informer(client, PODS, namespace=NAMESPACE)
        outcomes = [ApiError(409, "Conflict", "stale"), RuntimeError("boom"), Result()]
        seen = []

        async def reconcile(key: str) -> Result:
            seen.append(key)
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        controller = Controller("test", reconcile, informer, resync_seconds=60, backoff_base=0.01)
        kube.create(pod("p", {"a": "b"}))
        tasks = [asyncio.create_task(informer.run()), asyncio.create_task(controller.run())]
        try:
            await until(lambda: not outcomes, what="three reconciles")
            assert seen == [f"{NAMESPACE}/p"] * 3
            assert (controller.stats.conflicts, controller.stats.errors) == (1, 1)
            assert controller.queue.failures(f"{NAMESPACE}/p") == 0  # forgotten after the success
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_informer_relists_after_410_and_reports_what_changed() -> None:
    with KubeApiServer() as kube:
        client = KubeClient(kube.api_client())
        informer = Informer(client, PODS, namespace=NAMESPACE)  # its watch stays open: only a 410 ends it
        changes: list[tuple[str | None, str | None]] = []
        informer.add_handler(
            lambda old, new: changes.append(
                (old and old["metadata"]["name"], new and new["metadata"]["name"])  # type: ignore[arg-type]
            )
        )
        kube.create(pod("keep", {}))
        kube.create(pod("gone", {}))
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), 5)
            assert sorted(informer.cache) == [f"{NAMESPACE}/gone", f"{NAMESPACE}/keep"]
            assert informer.get(f"{NAMESPACE}/keep")["kind"] == "Pod"  # list items get their kind back
            listed = len(changes)
            kube.compact()  # the watch has sent all it had: it goes on
            kube.create(pod("live", {}))
            await until(lambda: f"{NAMESPACE}/live" in informer.cache, what="the watch still open")
            lists = pod_lists(kube)
            with kube.hold_watches():  # the watch falls behind, then a compaction ends it (410 Expired)
                kube.delete("v1", "Pod", NAMESPACE, "gone")  # two changes lost with the watch:
                kube.create(pod("new", {}))  # only a re-list can find them
                kube.compact()
            await until(
                lambda: sorted(informer.cache) == [f"{NAMESPACE}/{p}" for p in ("keep", "live", "new")],
                what="the re-list",
            )
            assert pod_lists(kube) == lists + 1
            assert ("gone", None) in changes[listed:] and (None, "new") in changes[listed:]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def pod_lists(kube: KubeApiServer) -> int:
    """How many times the pods of the namespace were listed (not watched)."""
    path = f"/api/v1/namespaces/{NAMESPACE}/pods"
    return sum(1 for r in kube.requests if r.method == "GET" and r.path == path and "watch" not in r.query)


async def test_client_discovers_plurals_and_records_events() -> None:
    with KubeApiServer() as kube:
        kube.register_crd(crd("example.dev", "v1", "inferencesets", "InferenceSet", scale={}))
        client = KubeClient(kube.api_client())
        found = await client.resource_for("example.dev/v1", "InferenceSet")
        assert (found.plural, found.namespaced) == ("inferencesets", True)
        assert await client.resource_for("apps/v1", "Deployment") == DEPLOYMENTS
        with pytest.raises(ApiError) as info:
            await client.resource_for("example.dev/v1", "Nothing")
        assert info.value.not_found
        assert await client.get(PODS, NAMESPACE, "missing") is None

        created = kube.create(pod("p", {}))
        await EventRecorder(client, "tests").warning(created, "Trouble", "something happened")
        [event] = kube.list("v1", "Event", NAMESPACE)
        assert event["involvedObject"]["uid"] == created["metadata"]["uid"]
        assert (event["type"], event["reason"], event["source"]["component"]) == (
            "Warning",
            "Trouble",
            "tests",
        )


def test_label_selectors() -> None:
    selector = {
        "matchLabels": {"app": "vllm"},
        "matchExpressions": [
            {"key": "gpu", "operator": "In", "values": ["h100", "a100"]},
            {"key": "draining", "operator": "DoesNotExist"},
        ],
    }
    assert selector_matches(selector, {"app": "vllm", "gpu": "h100"})
    assert not selector_matches(selector, {"app": "vllm", "gpu": "l4"})
    assert not selector_matches(selector, {"app": "vllm", "gpu": "h100", "draining": "1"})
    assert selector_matches({}, {"anything": "x"}) and not selector_matches(None, {"a": "b"})
    assert selector_string(selector) == "app=vllm,gpu in (h100,a100),!draining"


def test_set_condition_moves_the_transition_time_only_on_change() -> None:
    first = set_condition([], "Ready", False, "Loading", "0 of 1")
    first[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    same = set_condition(first, "Ready", False, "Loading", "still 0 of 1")
    assert same[0]["lastTransitionTime"] == "2020-01-01T00:00:00Z" and same[0]["message"] == "still 0 of 1"
    flipped = set_condition(same, "Ready", True, "AllReplicasReady")
    assert flipped[0]["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def _setting_names(obj: object, prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            names += _setting_names(value, f"{prefix}{f.name}.")
        else:
            names.append(f"{prefix}{f.name}")
    return names


def test_every_setting_is_documented() -> None:
    doc = (REPO / "docs" / "controllers.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", doc, re.MULTILINE))
    assert set(_setting_names(ControllerSettings())) - documented == set()


@pytest.mark.parametrize(
    ("resource", "written"),
    [
        (
            MODEL_ADAPTERS,
            {
                "phase",
                "instances",
                "readyReplicas",
                "desiredReplicas",
                "conditions",
                "observedGeneration",
                "failedAttempts",
                "nextRetryTime",
            },
        ),
        (
            POD_AUTOSCALERS,
            {"desiredScale", "actualScale", "lastScaleTime", "conditions", "observedGeneration"},
        ),
    ],
)
def test_deploy_crds_match_what_the_controllers_write(resource: Resource, written: set[str]) -> None:
    """The CRDs in deploy/ serve what the controllers address, and keep every status field they write
    (the API server prunes fields a structural schema does not name)."""
    found = [
        m
        for m in load_crds(DEPLOY_CRDS)
        if m["spec"]["group"] == resource.group and m["spec"]["names"]["plural"] == resource.plural
    ]
    assert found, f"no CRD for {resource.plural}.{resource.group} in deploy/base/crds"
    spec = found[0]["spec"]
    assert spec["names"]["kind"] == resource.kind and spec["scope"] == "Namespaced"
    version = next(v for v in spec["versions"] if v["name"] == resource.version)
    assert version["served"] and "status" in version["subresources"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert written <= set(status.get("properties") or {}) or status.get(
        "x-kubernetes-preserve-unknown-fields"
    )
