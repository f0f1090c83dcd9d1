"""Model routes: an HTTPRoute per model of labelled Deployments, kept and removed with them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from brickyard.stack import Stack
from controllers.model_routes import route_name
from tests.controllers.conftest import NAMESPACE, StartControllers, events, until, writes
from tests.support.kube_api import KubeApiServer

ROUTE = ("gateway.networking.k8s.io/v1", "HTTPRoute", NAMESPACE)


def deployment(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
            },
        },
    }


def backends(kube: KubeApiServer, name: str) -> list[tuple[str, int]] | None:
    route = kube.get(*ROUTE, name)
    if route is None:
        return None
    return [(b["name"], b["port"]) for b in route["spec"]["rules"][0]["backendRefs"]]


def test_route_names() -> None:
    assert route_name("llama-3.1-8b-instruct") == "llama-3.1-8b-instruct-router"
    assert route_name("Meta/Llama_3") == "meta-llama-3-router"


async def test_routes_follow_labelled_deployments(
    kube: KubeApiServer, start_controllers: StartControllers
) -> None:
    kube.create(deployment("unrelated", {"app": "web"}))
    async with start_controllers(None, controllers=["model-routes"]) as app:
        a = kube.create(
            deployment("llama-h100", {"model.aibrix.ai/name": "llama", "model.aibrix.ai/port": "8080"})
        )
        await until(lambda: backends(kube, "llama-router") == [("llama-h100", 8080)], what="route")
        route = kube.get(*ROUTE, "llama-router")
        assert route["spec"]["parentRefs"] == [
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "test-gateway"}
        ]
        assert route["spec"]["rules"][0]["matches"] == [
            {
                "path": {"type": "PathPrefix", "value": "/"},
                "headers": [{"type": "Exact", "name": "model", "value": "llama"}],
            }
        ]
        owner = route["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "Deployment",
            "llama-h100",
            a["metadata"]["uid"],
        )
        assert kube.list(*ROUTE) == [route]  # nothing for the unlabelled Deployment

        # A second Deployment of the model (another GPU type, its own Service) joins the same route.
        kube.create(
            deployment(
                "llama-a10", {"model.aibrix.ai/name": "llama", "model.aibrix.ai/service": "llama-cheap"}
            )
        )
        await until(
            lambda: backends(kube, "llama-router") == [("llama-cheap", 8000), ("llama-h100", 8080)],
            what="both",
        )
        assert len(kube.get(*ROUTE, "llama-router")["metadata"]["ownerReferences"]) == 2
        # The event follows the route's update: not a write of the converged state.
        await until(lambda: ("Normal", "RouteUpdated") in events(kube, "llama-a10"), what="the event")

        # Converged: resyncs write nothing.
        before = len(kube.requests)
        reconciles = app.model_routes.controller.stats.reconciles
        await until(lambda: app.model_routes.controller.stats.reconciles >= reconciles + 2, what="resyncs")
        assert writes(kube, before) == []

        # The label goes from one, then the other: the route shrinks, then goes.
        kube.patch(
            "apps/v1",
            "Deployment",
            NAMESPACE,
            "llama-a10",
            {"metadata": {"labels": {"model.aibrix.ai/name": None}}},
        )
        await until(lambda: backends(kube, "llama-router") == [("llama-h100", 8080)], what="one left")
        kube.patch(
            "apps/v1",
            "Deployment",
            NAMESPACE,
            "llama-h100",
            {"metadata": {"labels": {"model.aibrix.ai/name": None}}},
        )
        await until(lambda: kube.get(*ROUTE, "llama-router") is None, what="route deleted")


async def test_a_route_we_do_not_own_is_left_alone(
    kube: KubeApiServer, start_controllers: StartControllers
) -> None:
    theirs = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "mistral-router", "namespace": NAMESPACE},
        "spec": {"parentRefs": [{"name": "other"}]},
    }
    stored = kube.create(theirs)  # with the CRD's defaults
    async with start_controllers(None, controllers=["model-routes"]):
        kube.create(deployment("mistral", {"model.aibrix.ai/name": "mistral"}))
        await until(
            lambda: any(e["reason"] == "RouteConflict" for e in kube.list("v1", "Event", NAMESPACE)),
            what="conflict event",
        )
        assert kube.get(*ROUTE, "mistral-router")["spec"] == stored["spec"]


async def test_the_cli_process_runs_the_controllers(
    kube: KubeApiServer, stack: Stack, tmp_path: Path
) -> None:
    """`brickyard controllers` as its own process, configured by a kubeconfig file and flags."""
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
    child = stack.spawn(
        "controllers-cli",
        [
            sys.executable,
            "-m",
            "brickyard",
            "controllers",
            "--namespace",
            NAMESPACE,
            "--no-redis",
            "--controller",
            "model-routes",
            "--gateway-name",
            "cli-gateway",
        ],
        ready=lambda: True,
        env={"KUBECONFIG": str(kubeconfig)},
    )
    try:
        kube.create(deployment("qwen", {"model.aibrix.ai/name": "qwen"}))
        route = await until(
            lambda: kube.get(*ROUTE, "qwen-router"), timeout=30, what="route from the CLI process"
        )
        assert route["spec"]["parentRefs"][0]["name"] == "cli-gateway"
    finally:
        stack.stop_child(child)
