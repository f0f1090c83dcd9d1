"""Tests of the Kubernetes API stand-in, driven through the official ``kubernetes`` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import aiohttp
import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from .crd_schema import known_crds
from .kube_api import KubeApiError, KubeApiServer, LabelSelector, json_merge_patch, strategic_merge_patch

# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=0.2) as srv:
        yield srv


@pytest.fixture
def api(server: KubeApiServer) -> Iterator[client.ApiClient]:
    api_client = server.api_client()
    yield api_client
    api_client.close()


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def pod(name: str, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, **extra},
        "spec": {"containers": [{"name": "main", "image": "registry.local/model-server:1.0"}]},
    }


def configmap(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": "v"}}


def deployment(name: str, replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "vllm:latest"}]},
            },
        },
    }


def status_of(err: ApiException) -> dict[str, Any]:
    return json.loads(err.body)


def expect_status(call: Callable[[], Any], code: int, reason: str) -> dict[str, Any]:
    """Run a client call that must fail, and check the Status body like the real server's."""
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == code
    body = status_of(info.value)
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["reason"] == reason
    assert body["code"] == code
    assert body["message"]
    return body


def later(action: Callable[[], Any], delay: float = 0.05) -> threading.Thread:
    """Run ``action`` on another thread shortly (writes while a watch is streaming)."""
    thread = threading.Thread(target=lambda: (time.sleep(delay), action()))
    thread.start()
    return thread


def collect(stream: Generator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The first ``count`` events (or fewer if the stream's timeout ends it first). Closes the
    stream, which hands its connection back (left to the GC, the socket leaks)."""
    events = []
    with contextlib.closing(stream):
        for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events


def until_named(stream: Generator[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Events up to and including the first one about ``name`` (a marker written last), so a
    test sees exactly what came before it without waiting for the stream's timeout."""
    events = []
    with contextlib.closing(stream):
        for event in stream:
            events.append(event)
            obj = event["object"]
            if (obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict())["name"] == name:
                break
    return events


def crd_manifest(
    *,
    plural: str = "inferencepools",
    kind: str = "InferencePool",
    group: str = "brickyard.dev",
    scope: str = "Namespaced",
    subresources: dict[str, Any] | None = None,
    versions: tuple[str, ...] = ("v1alpha1",),
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": i == 0,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                    "subresources": subresources or {},
                }
                for i, v in enumerate(versions)
            ],
        },
    }


# ---------------------------------------------------------------------------------------------
# lifecycle, discovery
# ---------------------------------------------------------------------------------------------


def test_start_stop_and_context_manager() -> None:
    srv = KubeApiServer()
    url = srv.start()
    assert url.startswith("http://127.0.0.1:")
    assert srv.start() == url  # idempotent
    with srv.api_client() as api_client:
        assert client.CoreV1Api(api_client).read_namespace("default").status.phase == "Active"
    srv.stop()
    srv.stop()
    with pytest.raises(RuntimeError):
        _ = srv.base_url
    # the state outlives the HTTP server
    assert srv.get("v1", "Namespace", None, "kube-system") is not None


def test_restart_serves_the_same_store_on_the_same_port(server: KubeApiServer) -> None:
    url = server.base_url
    with server.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        start = core.create_namespaced_pod("default", pod("before")).metadata.resource_version
        server.stop()
        with pytest.raises(urllib3.exceptions.MaxRetryError, match="Connection refused"):
            core.list_namespaced_pod("default", _request_timeout=2)
        server.create(pod("meanwhile"))  # etcd goes on; only the API server is down
        assert server.start() == url
        assert [p.metadata.name for p in core.list_namespaced_pod("default").items] == ["before", "meanwhile"]
        # the history survives too: a client resuming its watch misses nothing
        resumed = until_named(
            watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=start, timeout_seconds=5
            ),
            "meanwhile",
        )
        assert [(e["type"], e["object"].metadata.name) for e in resumed] == [("ADDED", "meanwhile")]


def test_version_and_discovery(api: client.ApiClient) -> None:
    assert client.VersionApi(api).get_code().git_version.startswith("v1.")
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
    assert {"apps", "autoscaling", "discovery.k8s.io", "apiextensions.k8s.io"} <= set(groups)
    assert groups["autoscaling"].preferred_version.group_version == "autoscaling/v2"
    core_resources = {r.name: r for r in client.CoreV1Api(api).get_api_resources().resources}
    assert {"pods", "pods/status", "services", "events", "configmaps", "secrets", "namespaces"} <= set(
        core_resources
    )
    assert core_resources["pods"].namespaced and not core_resources["namespaces"].namespaced
    apps_resources = {r.name: r for r in client.AppsV1Api(api).get_api_resources().resources}
    assert apps_resources["deployments/scale"].kind == "Scale"


# ---------------------------------------------------------------------------------------------
# create / read / list: metadata bookkeeping
# ---------------------------------------------------------------------------------------------


def test_create_fills_system_metadata(core: client.CoreV1Api, server: KubeApiServer) -> None:
    created = core.create_namespaced_pod("default", pod("p1"))
    meta = created.metadata
    assert isinstance(created, client.V1Pod)
    assert meta.namespace == "default"  # defaulted from the URL
    assert meta.uid and meta.creation_timestamp is not None
    assert meta.generation == 1
    assert meta.resource_version == server.resource_version
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"
    assert created.spec.containers[0].image_pull_policy == "IfNotPresent"
    assert server.requests[-1].method == "POST"
    assert server.requests[-1].path == "/api/v1/namespaces/default/pods"


def test_create_returns_201_and_status_is_reset(core: client.CoreV1Api) -> None:
    body = {**pod("p1"), "status": {"phase": "Running", "podIP": "10.0.0.1"}}
    data, code, _ = core.create_namespaced_pod_with_http_info("default", body)
    assert code == 201
    assert data.status.phase == "Pending"  # status is not settable on create (status subresource)
    assert data.status.pod_ip is None


def test_resource_version_is_global_and_monotonic(
    core: client.CoreV1Api, apps: client.AppsV1Api, server: KubeApiServer
) -> None:
    versions = [
        core.create_namespaced_config_map("default", configmap("c1")).metadata.resource_version,
        core.create_namespaced_pod("default", pod("p1")).metadata.resource_version,
        apps.create_namespaced_deployment("default", deployment("d1")).metadata.resource_version,
        core.patch_namespaced_config_map("c1", "default", {"data": {"k": "w"}}).metadata.resource_version,
    ]
    assert all(v.isdigit() for v in versions)
    numbers = [int(v) for v in versions]
    assert numbers == sorted(numbers) and len(set(numbers)) == 4
    listed = core.list_namespaced_config_map("default")
    assert listed.kind == "ConfigMapList" and listed.api_version == "v1"
    assert listed.metadata.resource_version == server.resource_version == versions[-1]
    deployments = apps.list_namespaced_deployment("default")
    assert deployments.kind == "DeploymentList" and deployments.api_version == "apps/v1"


def test_list_across_and_within_namespaces(core: client.CoreV1Api, server: KubeApiServer) -> None:
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    core.create_namespaced_pod("default", pod("p1"))
    core.create_namespaced_pod("team-a", pod("p2"))
    assert [p.metadata.name for p in core.list_namespaced_pod("team-a").items] == ["p2"]
    everything = core.list_pod_for_all_namespaces()
    assert [(p.metadata.namespace, p.metadata.name) for p in everything.items] == [
        ("default", "p1"),
        ("team-a", "p2"),
    ]
    assert server.requests[-1].path == "/api/v1/pods"
    assert "team-a" in {n.metadata.name for n in core.list_namespace().items}


def test_list_pagination_and_expired_continue(core: client.CoreV1Api, server: KubeApiServer) -> None:
    for i in range(5):
        server.create(configmap(f"c{i}"))
    first = core.list_namespaced_config_map("default", limit=2)
    assert [c.metadata.name for c in first.items] == ["c0", "c1"]
    assert first.metadata.remaining_item_count == 3
    second = core.list_namespaced_config_map("default", limit=2, _continue=first.metadata._continue)
    assert [c.metadata.name for c in second.items] == ["c2", "c3"]
    assert second.metadata.resource_version == first.metadata.resource_version
    server.create(configmap("late"))
    server.compact()  # drops the revision the continue token reads at
    expect_status(
        lambda: core.list_namespaced_config_map("default", limit=2, _continue=second.metadata._continue),
        410,
        "Expired",
    )


def test_already_exists_and_not_found(core: client.CoreV1Api, apps: client.AppsV1Api) -> None:
    core.create_namespaced_pod("default", pod("p1"))
    body = expect_status(lambda: core.create_namespaced_pod("default", pod("p1")), 409, "AlreadyExists")
    assert body["details"] == {"name": "p1", "group": "", "kind": "pods"}
    assert body["message"] == 'pods "p1" already exists'
    expect_status(lambda: core.read_namespaced_pod("nope", "default"), 404, "NotFound")
    body = expect_status(lambda: apps.read_namespaced_deployment("nope", "default"), 404, "NotFound")
    assert body["message"] == 'deployments.apps "nope" not found'
    expect_status(lambda: core.delete_namespaced_config_map("nope", "default"), 404, "NotFound")


def test_invalid_objects_are_rejected(core: client.CoreV1Api, apps: client.AppsV1Api) -> None:
    no_containers = {"metadata": {"name": "p"}, "spec": {"containers": []}}
    body = expect_status(lambda: core.create_namespaced_pod("default", no_containers), 422, "Invalid")
    assert "spec.containers" in body["message"]
    expect_status(lambda: core.create_namespaced_pod("default", pod("Bad_Name")), 422, "Invalid")
    mismatched = deployment("d1")
    mismatched["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    expect_status(lambda: apps.create_namespaced_deployment("default", mismatched), 422, "Invalid")
    expect_status(
        lambda: core.create_namespaced_pod("default", pod("p", namespace="other")), 400, "BadRequest"
    )


def test_generate_name(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cfg-"}})
    assert created.metadata.name.startswith("cfg-") and len(created.metadata.name) == len("cfg-") + 5


def test_builtin_defaults(core: client.CoreV1Api, apps: client.AppsV1Api) -> None:
    svc = core.create_namespaced_service(
        "default", {"metadata": {"name": "svc"}, "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}}
    )
    assert svc.spec.type == "ClusterIP" and svc.spec.cluster_ip.startswith("10.96.")
    assert svc.spec.ports[0].target_port == 80 and svc.spec.ports[0].protocol == "TCP"
    svc.spec.cluster_ip = None
    svc.spec.cluster_ips = None
    assert core.replace_namespaced_service("svc", "default", svc).spec.cluster_ip.startswith("10.96.")
    secret = core.create_namespaced_secret("default", {"metadata": {"name": "s"}, "stringData": {"a": "b"}})
    assert secret.type == "Opaque" and secret.data == {"a": "Yg=="}
    dep = apps.create_namespaced_deployment("default", deployment("d", replicas=2))
    assert dep.spec.strategy.type == "RollingUpdate" and dep.spec.revision_history_limit == 10


# ---------------------------------------------------------------------------------------------
# updates: optimistic concurrency, generation, no-ops
# ---------------------------------------------------------------------------------------------


def test_update_conflict_and_unconditional_update(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_config_map("default", configmap("c1"))
    created.data = {"k": "first"}
    updated = core.replace_namespaced_config_map("c1", "default", created)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)

    created.data = {"k": "stale"}  # still carries the old resourceVersion
    body = expect_status(
        lambda: core.replace_namespaced_config_map("c1", "default", created), 409, "Conflict"
    )
    assert "the object has been modified" in body["message"]
    assert core.read_namespaced_config_map("c1", "default").data == {"k": "first"}

    created.metadata.resource_version = None  # unconditional
    assert core.replace_namespaced_config_map("c1", "default", created).data == {"k": "stale"}
    # a resourceVersion inside a patch is a precondition too
    patch = {"metadata": {"resourceVersion": updated.metadata.resource_version}, "data": {"k": "x"}}
    expect_status(lambda: core.patch_namespaced_config_map("c1", "default", patch), 409, "Conflict")


def test_update_name_mismatch_is_bad_request(core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map("default", configmap("c1"))
    expect_status(
        lambda: core.replace_namespaced_config_map("c1", "default", configmap("c2")), 400, "BadRequest"
    )
    expect_status(
        lambda: core.replace_namespaced_config_map("zz", "default", configmap("zz")), 404, "NotFound"
    )


def test_noop_update_writes_nothing(core: client.CoreV1Api, server: KubeApiServer) -> None:
    created = core.create_namespaced_config_map("default", configmap("c1"))
    again = core.replace_namespaced_config_map("c1", "default", created)
    patched = core.patch_namespaced_config_map("c1", "default", {"data": {"k": "v"}})
    assert (
        again.metadata.resource_version
        == patched.metadata.resource_version
        == created.metadata.resource_version
    )
    assert server.resource_version == created.metadata.resource_version


def test_generation_tracks_spec_only(apps: client.AppsV1Api, core: client.CoreV1Api) -> None:
    dep = apps.create_namespaced_deployment("default", deployment("d1"))
    assert dep.metadata.generation == 1
    labelled = apps.patch_namespaced_deployment("d1", "default", {"metadata": {"labels": {"tier": "gpu"}}})
    assert labelled.metadata.generation == 1  # metadata-only change
    status = apps.patch_namespaced_deployment_status("d1", "default", {"status": {"readyReplicas": 2}})
    assert status.metadata.generation == 1  # status-only change
    assert status.status.ready_replicas == 2
    spec = apps.patch_namespaced_deployment("d1", "default", {"spec": {"replicas": 5}})
    assert spec.metadata.generation == 2
    # Deployments (only) also bump on annotation changes: they are copied to ReplicaSets.
    annotated = apps.patch_namespaced_deployment("d1", "default", {"metadata": {"annotations": {"a": "b"}}})
    assert annotated.metadata.generation == 3
    # Objects without spec never bump.
    cm = core.create_namespaced_config_map("default", configmap("c1"))
    assert core.patch_namespaced_config_map("c1", "default", {"data": {"k": "z"}}).metadata.generation == (
        cm.metadata.generation
    )


# ---------------------------------------------------------------------------------------------
# status subresource
# ---------------------------------------------------------------------------------------------


def test_status_subresource_split(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_pod("default", pod("p1"))

    # PUT/PATCH on the main resource ignore status...
    created.status.phase = "Running"
    created.metadata.labels = {"role": "decode"}
    replaced = core.replace_namespaced_pod("p1", "default", created)
    assert replaced.status.phase == "Pending" and replaced.metadata.labels == {"role": "decode"}
    patched = core.patch_namespaced_pod("p1", "default", {"status": {"phase": "Failed"}})
    assert patched.status.phase == "Pending"
    assert patched.metadata.resource_version == replaced.metadata.resource_version  # nothing changed

    # ...and PUT/PATCH on /status change only status.
    patched.status.phase = "Running"
    patched.status.pod_ip = "10.1.2.3"
    patched.spec.containers[0].image = "other:2"
    patched.metadata.labels = {"role": "prefill"}
    after = core.replace_namespaced_pod_status("p1", "default", patched)
    assert after.status.phase == "Running" and after.status.pod_ip == "10.1.2.3"
    assert after.spec.containers[0].image == "registry.local/model-server:1.0"
    assert after.metadata.labels == {"role": "decode"}
    moved = core.patch_namespaced_pod_status("p1", "default", {"status": {"podIP": "10.9.9.9"}})
    assert moved.status.pod_ip == "10.9.9.9"

    # /status PUT is subject to the resourceVersion precondition as well.
    expect_status(lambda: core.replace_namespaced_pod_status("p1", "default", patched), 409, "Conflict")
    assert core.read_namespaced_pod_status("p1", "default").status.phase == "Running"


def test_configmap_has_no_status_subresource(server: KubeApiServer, api: client.ApiClient) -> None:
    response = api.rest_client.pool_manager.request(
        "GET", f"{server.base_url}/api/v1/namespaces/default/configmaps/x/status"
    )
    assert response.status == 404
    assert json.loads(response.data)["reason"] == "NotFound"


# ---------------------------------------------------------------------------------------------
# patch flavours
# ---------------------------------------------------------------------------------------------


def test_merge_patch(core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c1", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1", "y": "2"}}
    )
    patched = core.patch_namespaced_config_map(
        "c1",
        "default",
        {"metadata": {"labels": {"a": None, "c": "3"}}, "data": {"y": None}},
        _content_type="application/merge-patch+json",
    )
    assert patched.metadata.labels == {"b": "2", "c": "3"}
    assert patched.data == {"x": "1"}


def test_strategic_merge_patch_uses_merge_keys(core: client.CoreV1Api, server: KubeApiServer) -> None:
    body = pod("p1", finalizers=["a.example/one"])
    body["spec"]["containers"].append(
        {"name": "sidecar", "image": "envoy:1", "env": [{"name": "A", "value": "1"}]}
    )
    core.create_namespaced_pod("default", body)
    patched = core.patch_namespaced_pod(
        "p1",
        "default",
        {
            "metadata": {"finalizers": ["b.example/two"]},
            "spec": {
                "containers": [{"name": "sidecar", "image": "envoy:2", "env": [{"name": "B", "value": "2"}]}]
            },
        },
    )
    assert server.requests[-1].content_type == "application/strategic-merge-patch+json"
    assert [c.name for c in patched.spec.containers] == ["main", "sidecar"]
    sidecar = patched.spec.containers[1]
    assert sidecar.image == "envoy:2"
    assert [(e.name, e.value) for e in sidecar.env] == [("A", "1"), ("B", "2")]
    assert patched.metadata.finalizers == ["a.example/one", "b.example/two"]  # finalizers union
    removed = core.patch_namespaced_pod(
        "p1",
        "default",
        {
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a.example/one"]},
            "spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]},
        },
    )
    assert removed.metadata.finalizers == ["b.example/two"]
    assert [c.name for c in removed.spec.containers] == ["main"]


def test_json_patch(core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map("default", {"metadata": {"name": "c1"}, "data": {"x": "1"}})
    patched = core.patch_namespaced_config_map(
        "c1",
        "default",
        [
            {"op": "test", "path": "/data/x", "value": "1"},
            {"op": "add", "path": "/data/y", "value": "2"},
            {"op": "replace", "path": "/data/x", "value": "10"},
            {"op": "add", "path": "/metadata/labels", "value": {"a/b": "c"}},
            {"op": "remove", "path": "/metadata/labels/a~1b"},
        ],
    )
    assert patched.data == {"x": "10", "y": "2"}
    assert patched.metadata.labels == {}
    failing = [{"op": "test", "path": "/data/x", "value": "nope"}, {"op": "remove", "path": "/data/x"}]
    expect_status(lambda: core.patch_namespaced_config_map("c1", "default", failing), 422, "Invalid")
    assert core.read_namespaced_config_map("c1", "default").data == {"x": "10", "y": "2"}  # atomic
    missing = [{"op": "remove", "path": "/data/absent"}]
    expect_status(lambda: core.patch_namespaced_config_map("c1", "default", missing), 422, "Invalid")


def test_patch_helpers_directly() -> None:
    assert json_merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None}, "l": [2]}) == {
        "a": {"c": 2},
        "l": [2],
    }
    target = {"spec": {"ports": [{"port": 80, "name": "http"}], "tolerations": [{"key": "a"}]}}
    patch = {"spec": {"ports": [{"port": 80, "name": "web"}, {"port": 443}], "tolerations": [{"key": "b"}]}}
    assert strategic_merge_patch(target, patch) == {
        "spec": {"ports": [{"port": 80, "name": "web"}, {"port": 443}], "tolerations": [{"key": "b"}]}
    }


# ---------------------------------------------------------------------------------------------
# deletion and finalizers
# ---------------------------------------------------------------------------------------------


def delete_raw(core: client.CoreV1Api, name: str) -> dict:
    """DELETE a ConfigMap and read the body as JSON (client versions type it as V1Status or dict)."""
    return json.loads(core.delete_namespaced_config_map(name, "default", _preload_content=False).data)


def test_delete_without_finalizers(core: client.CoreV1Api, server: KubeApiServer) -> None:
    created = core.create_namespaced_pod("default", pod("p1"))
    deleted = core.delete_namespaced_pod("p1", "default")
    assert isinstance(deleted, client.V1Pod)  # pods answer with the object
    assert int(deleted.metadata.resource_version) > int(created.metadata.resource_version)
    core.create_namespaced_config_map("default", configmap("c1"))
    status = delete_raw(core, "c1")  # others answer with a Status
    assert server.requests[-1].method == "DELETE"
    assert status["kind"] == "Status" and status["status"] == "Success"
    assert status["details"]["name"] == "c1"

    server.create(pod("end"))
    events = until_named(
        watch.Watch().stream(
            core.list_namespaced_pod,
            "default",
            resource_version=created.metadata.resource_version,
            timeout_seconds=5,
        ),
        "end",
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "p1"), ("ADDED", "end")]
    assert events[0]["object"].metadata.resource_version == deleted.metadata.resource_version


def test_delete_with_finalizers_waits_for_them(core: client.CoreV1Api, server: KubeApiServer) -> None:
    created = core.create_namespaced_config_map(
        "default", configmap("c1", finalizers=["brickyard.dev/cleanup"])
    )
    pending = delete_raw(core, "c1")
    assert pending["metadata"]["deletionTimestamp"]
    assert pending["metadata"]["deletionGracePeriodSeconds"] == 0
    stored = core.read_namespaced_config_map("c1", "default")
    assert stored.metadata.deletion_timestamp is not None
    # Deleting again changes nothing; adding finalizers is forbidden now.
    assert delete_raw(core, "c1")["metadata"]["resourceVersion"] == (stored.metadata.resource_version)
    more = {"metadata": {"finalizers": ["brickyard.dev/cleanup", "x.example/more"]}}
    expect_status(
        lambda: core.patch_namespaced_config_map(
            "c1", "default", more, _content_type="application/merge-patch+json"
        ),
        422,
        "Invalid",
    )
    # Removing the last finalizer completes the deletion.
    core.patch_namespaced_config_map(
        "c1", "default", {"metadata": {"finalizers": None}}, _content_type="application/merge-patch+json"
    )
    expect_status(lambda: core.read_namespaced_config_map("c1", "default"), 404, "NotFound")

    server.create(configmap("end"))
    stream = watch.Watch().stream(
        core.list_namespaced_config_map,
        "default",
        resource_version=created.metadata.resource_version,
        timeout_seconds=5,
    )
    events = [(e["type"], bool(e["object"].metadata.finalizers)) for e in until_named(stream, "end")]
    assert events == [("MODIFIED", True), ("MODIFIED", False), ("DELETED", False), ("ADDED", False)]


def test_delete_preconditions(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_config_map("default", configmap("c1"))
    stale = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="someone-else"))
    expect_status(lambda: core.delete_namespaced_config_map("c1", "default", body=stale), 409, "Conflict")
    good = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=created.metadata.uid))
    core.delete_namespaced_config_map("c1", "default", body=good)


def test_delete_collection_and_namespace_cascade(core: client.CoreV1Api, server: KubeApiServer) -> None:
    core.create_namespace({"metadata": {"name": "scratch"}})
    for name, tier in (("a", "x"), ("b", "x"), ("c", "y")):
        core.create_namespaced_config_map("scratch", configmap(name, labels={"tier": tier}))
    core.delete_collection_namespaced_config_map("scratch", label_selector="tier=x")
    assert [c.metadata.name for c in core.list_namespaced_config_map("scratch").items] == ["c"]
    core.delete_namespace("scratch")
    assert server.list("v1", "configmaps", "scratch") == []
    assert server.get("v1", "Namespace", None, "scratch") is None


# ---------------------------------------------------------------------------------------------
# scale subresource, HPA, EndpointSlice
# ---------------------------------------------------------------------------------------------


def test_deployment_scale_subresource(apps: client.AppsV1Api, server: KubeApiServer) -> None:
    dep = apps.create_namespaced_deployment("default", deployment("web", replicas=2))
    server.patch_status("apps/v1", "Deployment", "default", "web", {"replicas": 2, "readyReplicas": 2})
    scale = apps.read_namespaced_deployment_scale("web", "default")
    assert isinstance(scale, client.V1Scale)
    assert scale.kind == "Scale" and scale.api_version == "autoscaling/v1"
    assert scale.spec.replicas == 2 and scale.status.replicas == 2 and scale.status.selector == "app=web"

    scale.spec.replicas = 4
    replaced = apps.replace_namespaced_deployment_scale("web", "default", scale)
    assert replaced.spec.replicas == 4
    after = apps.read_namespaced_deployment("web", "default")
    assert after.spec.replicas == 4 and after.metadata.generation == 2
    assert after.metadata.resource_version == replaced.metadata.resource_version

    expect_status(lambda: apps.replace_namespaced_deployment_scale("web", "default", scale), 409, "Conflict")
    patched = apps.patch_namespaced_deployment_scale("web", "default", {"spec": {"replicas": 1}})
    assert patched.spec.replicas == 1
    assert apps.read_namespaced_deployment("web", "default").metadata.generation == 3

    server.create(deployment("end", replicas=0))
    stream = watch.Watch().stream(
        apps.list_namespaced_deployment,
        "default",
        resource_version=dep.metadata.resource_version,
        timeout_seconds=5,
    )
    assert [(e["type"], e["object"].spec.replicas) for e in until_named(stream, "end")] == [
        ("MODIFIED", 2),  # the status patch
        ("MODIFIED", 4),
        ("MODIFIED", 1),
        ("ADDED", 0),
    ]


def test_horizontal_pod_autoscaler_v2(api: client.ApiClient) -> None:
    hpa_api = client.AutoscalingV2Api(api)
    created = hpa_api.create_namespaced_horizontal_pod_autoscaler(
        "default",
        {
            "metadata": {"name": "web"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "maxReplicas": 8,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 70},
                        },
                    }
                ],
            },
        },
    )
    assert created.spec.min_replicas == 1 and created.status.desired_replicas == 0
    updated = hpa_api.patch_namespaced_horizontal_pod_autoscaler_status(
        "web", "default", {"status": {"currentReplicas": 3, "desiredReplicas": 4}}
    )
    assert updated.status.desired_replicas == 4
    assert updated.metadata.generation == 1
    listed = hpa_api.list_namespaced_horizontal_pod_autoscaler("default")
    assert listed.api_version == "autoscaling/v2" and listed.items[0].status.current_replicas == 3


def test_endpoint_slices(api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    for svc in ("a", "b"):
        discovery.create_namespaced_endpoint_slice(
            "default",
            {
                "metadata": {"name": f"{svc}-1", "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}],
                "ports": [{"name": "http", "port": 8000}],
            },
        )
    slices = discovery.list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=b"
    )
    assert [s.metadata.name for s in slices.items] == ["b-1"]
    assert slices.items[0].endpoints[0].conditions.ready is True


# ---------------------------------------------------------------------------------------------
# custom resources
# ---------------------------------------------------------------------------------------------


def test_crd_created_through_the_api_is_served(
    api: client.ApiClient, custom: client.CustomObjectsApi
) -> None:
    ext = client.ApiextensionsV1Api(api)
    crd = ext.create_custom_resource_definition(crd_manifest(subresources={"status": {}}))
    assert {c.type: c.status for c in crd.status.conditions} == {
        "NamesAccepted": "True",
        "Established": "True",
    }
    assert crd.status.accepted_names.kind == "InferencePool"

    args = ("brickyard.dev", "v1alpha1", "default", "inferencepools")
    created = custom.create_namespaced_custom_object(
        *args,
        {
            "apiVersion": "brickyard.dev/v1alpha1",
            "kind": "InferencePool",
            "metadata": {"name": "pool"},
            "spec": {"selector": {"app": "vllm"}},
            "status": {"ignored": True},
        },
    )
    assert created["metadata"]["generation"] == 1 and "status" not in created
    listed = custom.list_namespaced_custom_object(*args)
    assert listed["kind"] == "InferencePoolList" and listed["items"][0]["kind"] == "InferencePool"

    # status subresource: main PATCH ignores status, /status PATCH only touches status
    assert "status" not in custom.patch_namespaced_custom_object(*args, "pool", {"status": {"x": 1}})
    with_status = custom.patch_namespaced_custom_object_status(
        *args, "pool", {"status": {"ready": True}, "spec": {"selector": {"app": "ignored"}}}
    )
    assert with_status["status"] == {"ready": True} and with_status["spec"] == {"selector": {"app": "vllm"}}
    assert with_status["metadata"]["generation"] == 1
    bumped = custom.patch_namespaced_custom_object(*args, "pool", {"spec": {"targetPort": 8000}})
    assert bumped["metadata"]["generation"] == 2

    # custom resources refuse strategic merge patch and unconditional PUT, like the real server
    expect_status(
        lambda: custom.patch_namespaced_custom_object(
            *args, "pool", {"spec": {"x": 1}}, _content_type="application/strategic-merge-patch+json"
        ),
        415,
        "UnsupportedMediaType",
    )
    unconditional = {**bumped, "metadata": {"name": "pool"}}
    expect_status(
        lambda: custom.replace_namespaced_custom_object(*args, "pool", unconditional), 422, "Invalid"
    )
    assert custom.replace_namespaced_custom_object(*args, "pool", bumped)["spec"]["targetPort"] == 8000

    # deleting the CRD removes the instances and the endpoint
    ext.delete_custom_resource_definition("inferencepools.brickyard.dev")
    expect_status(lambda: custom.list_namespaced_custom_object(*args), 404, "NotFound")


def test_register_crd_cluster_scoped_with_scale(
    server: KubeApiServer, custom: client.CustomObjectsApi
) -> None:
    server.register_crd(
        crd_manifest(
            plural="modelpools",
            kind="ModelPool",
            scope="Cluster",
            subresources={
                "status": {},
                "scale": {
                    "specReplicasPath": ".spec.replicas",
                    "statusReplicasPath": ".status.replicas",
                    "labelSelectorPath": ".status.selector",
                },
            },
            versions=("v1beta1", "v1alpha1"),
        )
    )
    group = "brickyard.dev"
    custom.create_cluster_custom_object(
        group,
        "v1beta1",
        "modelpools",
        {
            "apiVersion": f"{group}/v1beta1",
            "kind": "ModelPool",
            "metadata": {"name": "m"},
            "spec": {"replicas": 1},
        },
    )
    server.patch_status(f"{group}/v1beta1", "ModelPool", None, "m", {"replicas": 1, "selector": "pool=m"})
    scale = custom.get_cluster_custom_object_scale(group, "v1beta1", "modelpools", "m")
    assert scale["spec"]["replicas"] == 1 and scale["status"] == {"replicas": 1, "selector": "pool=m"}
    custom.patch_cluster_custom_object_scale(group, "v1beta1", "modelpools", "m", {"spec": {"replicas": 3}})
    obj = custom.get_cluster_custom_object(group, "v1beta1", "modelpools", "m")
    assert obj["spec"]["replicas"] == 3 and obj["metadata"]["generation"] == 2
    # every served version answers, with its own apiVersion (conversion strategy None)
    old = custom.get_cluster_custom_object(group, "v1alpha1", "modelpools", "m")
    assert old["apiVersion"] == f"{group}/v1alpha1" and old["spec"] == obj["spec"]
    assert server.get(f"{group}/v1beta1", "modelpools", None, "m")["spec"]["replicas"] == 3


def test_custom_resource_without_status_subresource_bumps_generation_on_status(
    server: KubeApiServer, custom: client.CustomObjectsApi
) -> None:
    manifest = crd_manifest(plural="routes", kind="Route")
    del manifest["metadata"]  # register_crd names it <plural>.<group>
    assert server.register_crd(manifest)["metadata"]["name"] == "routes.brickyard.dev"
    args = ("brickyard.dev", "v1alpha1", "default", "routes")
    custom.create_namespaced_custom_object(*args, {"metadata": {"name": "r"}, "spec": {}, "status": {"a": 1}})
    changed = custom.patch_namespaced_custom_object(*args, "r", {"status": {"a": 2}})
    assert changed["status"] == {"a": 2} and changed["metadata"]["generation"] == 2


# ---------------------------------------------------------------------------------------------
# custom resources against their CRD's schema (the real CRDs: deploy/base/crds, support/crds)
# ---------------------------------------------------------------------------------------------

MA = ("brickyard.dev", "v1alpha1", "default", "modeladapters")
PA = ("brickyard.dev", "v1alpha1", "default", "podautoscalers")


@pytest.fixture
def real_crds(server: KubeApiServer) -> None:
    for crd in known_crds().values():
        server.register_crd(crd)


def model_adapter(name: str = "sql", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "brickyard.dev/v1alpha1",
        "kind": "ModelAdapter",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {"podSelector": {"matchLabels": {"model": "llama"}}, "artifactURL": "/adapters/sql", **spec},
    }


def pod_autoscaler(name: str = "llama", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "brickyard.dev/v1alpha1",
        "kind": "PodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "maxReplicas": 4,
            "scalingStrategy": "KPA",
            "metricsSources": [{"metricSourceType": "redis", "targetMetric": "waiting", "targetValue": "4"}],
            **spec,
        },
    }


def causes(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["field"], c["message"]) for c in body["details"]["causes"]]


@pytest.mark.usefixtures("real_crds")
def test_a_custom_resource_without_a_required_field_is_invalid(
    custom: client.CustomObjectsApi, server: KubeApiServer
) -> None:
    adapter = model_adapter()
    del adapter["spec"]["podSelector"]
    body = expect_status(lambda: custom.create_namespaced_custom_object(*MA, adapter), 422, "Invalid")
    assert body["message"].startswith(
        'ModelAdapter.brickyard.dev "sql" is invalid: spec.podSelector: Required value'
    )
    assert [field for field, _ in causes(body)] == ["spec.podSelector"]
    assert body["details"]["kind"] == "ModelAdapter" and body["details"]["group"] == "brickyard.dev"
    assert server.get("brickyard.dev/v1alpha1", "ModelAdapter", "default", "sql") is None
    with pytest.raises(KubeApiError) as info:  # the Python API admits objects the same way
        server.create(adapter)
    assert info.value.code == 422


@pytest.mark.usefixtures("real_crds")
def test_unknown_fields_are_pruned_and_defaults_filled(
    custom: client.CustomObjectsApi, server: KubeApiServer
) -> None:
    created = custom.create_namespaced_custom_object(*MA, model_adapter(baseModels="llama"))
    assert "baseModels" not in created["spec"]  # a misspelling is dropped, not stored
    assert created["spec"]["schedulerName"] == "least-adapters"  # default: in the CRD
    assert created["metadata"]["labels"] == {"team": "a"}  # metadata is the server's, never pruned
    # A patch that only adds an unknown field changes nothing: not even the resourceVersion.
    patched = custom.patch_namespaced_custom_object(*MA, "sql", {"spec": {"replicaCount": 2}})
    assert patched == created
    # Defaults apply on updates too, and nested ones inside defaulted objects (the HTTPRoute's rules).
    without = {**created, "spec": {k: v for k, v in created["spec"].items() if k != "schedulerName"}}
    assert custom.replace_namespaced_custom_object(*MA, "sql", without) == created
    route = server.create(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r"},
            "spec": {"parentRefs": [{"name": "gw"}]},
        }
    )
    assert route["spec"] == {
        "parentRefs": [{"name": "gw", "group": "gateway.networking.k8s.io", "kind": "Gateway"}],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}],
    }


@pytest.mark.usefixtures("real_crds")
def test_cel_rules_and_types_are_enforced_on_every_write(custom: client.CustomObjectsApi) -> None:
    body = expect_status(
        lambda: custom.create_namespaced_custom_object(*PA, pod_autoscaler(minReplicas=5)), 422, "Invalid"
    )
    assert causes(body) == [
        ("spec.minReplicas", 'Invalid value: "object": minReplicas must not exceed maxReplicas')
    ]
    created = custom.create_namespaced_custom_object(*PA, pod_autoscaler())
    assert created["spec"]["minReplicas"] == 1  # defaulted, and within the rule
    body = expect_status(
        lambda: custom.patch_namespaced_custom_object(*PA, "llama", {"spec": {"maxReplicas": 0}}),
        422,
        "Invalid",
    )
    assert causes(body)[0][0] == "spec.maxReplicas" and "less than the minimum of 1" in causes(body)[0][1]
    # A value of the wrong type is refused by the schema; the rules only see well-typed objects.
    body = expect_status(
        lambda: custom.patch_namespaced_custom_object(*PA, "llama", {"spec": {"maxReplicas": "4"}}),
        422,
        "Invalid",
    )
    assert causes(body) == [("spec.maxReplicas", "Invalid value: \"string\": '4' is not of type 'integer'")]
    assert custom.get_namespaced_custom_object(*PA, "llama") == created


@pytest.mark.usefixtures("real_crds")
def test_status_writes_are_validated_against_the_status_schema(
    custom: client.CustomObjectsApi, server: KubeApiServer
) -> None:
    custom.create_namespaced_custom_object(*MA, model_adapter())
    body = expect_status(
        lambda: custom.patch_namespaced_custom_object_status(*MA, "sql", {"status": {"phase": "Exploded"}}),
        422,
        "Invalid",
    )
    assert [field for field, _ in causes(body)] == ["status.phase"]
    assert causes(body)[0][1].startswith('Unsupported value: "Exploded"')
    condition = {
        "type": "Ready",
        "status": "True",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
        "reason": "Loaded",
        "message": "",
    }
    body = expect_status(
        lambda: custom.patch_namespaced_custom_object_status(
            *MA, "sql", {"status": {"conditions": [condition, {**condition, "status": "False"}]}}
        ),
        422,
        "Invalid",
    )
    assert causes(body)[0][0] == "status.conditions[1]" and causes(body)[0][1].startswith("Duplicate value")
    with pytest.raises(KubeApiError) as info:  # what a test playing a controller writes is checked too
        server.patch_status("brickyard.dev/v1alpha1", "ModelAdapter", "default", "sql", {"readyReplicas": -1})
    assert info.value.code == 422 and "status.readyReplicas" in info.value.message
    written = custom.patch_namespaced_custom_object_status(
        *MA, "sql", {"status": {"phase": "Running", "instances": ["p"], "loadedOn": ["p"]}}
    )
    assert written["status"] == {"phase": "Running", "instances": ["p"]}  # the unknown field is pruned


def test_transition_rules_compare_with_the_stored_object(
    server: KubeApiServer, custom: client.CustomObjectsApi
) -> None:
    manifest = crd_manifest(plural="pools", kind="Pool")
    manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "tier": {
                        "type": "string",
                        "x-kubernetes-validations": [
                            {"rule": "self == oldSelf", "message": "tier is immutable"}
                        ],
                    },
                    "size": {"type": "integer"},
                },
            }
        },
    }
    server.register_crd(manifest)
    args = ("brickyard.dev", "v1alpha1", "default", "pools")
    custom.create_namespaced_custom_object(*args, {"metadata": {"name": "p"}, "spec": {"tier": "gpu"}})
    assert custom.patch_namespaced_custom_object(*args, "p", {"spec": {"size": 2}})["spec"]["size"] == 2
    body = expect_status(
        lambda: custom.patch_namespaced_custom_object(*args, "p", {"spec": {"tier": "cpu"}}), 422, "Invalid"
    )
    assert causes(body) == [("spec.tier", 'Invalid value: "string": tier is immutable')]


def test_updates_keep_values_stored_under_looser_rules(
    server: KubeApiServer, custom: client.CustomObjectsApi
) -> None:
    """Ratcheting: an object created before its CRD got stricter can still be written, as long as
    the write leaves the values the new rules refuse as they were."""
    manifest = crd_manifest(plural="pools", kind="Pool", subresources={"status": {}})
    server.register_crd(manifest)
    args = ("brickyard.dev", "v1alpha1", "default", "pools")
    custom.create_namespaced_custom_object(*args, {"metadata": {"name": "p"}, "spec": {"size": 100}})
    manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["tier"],
                "properties": {"size": {"type": "integer", "maximum": 10}, "tier": {"type": "string"}},
            },
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        },
    }
    server.patch("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "pools.brickyard.dev", manifest)
    ready = custom.patch_namespaced_custom_object_status(*args, "p", {"status": {"ready": True}})
    assert ready["status"] == {"ready": True} and ready["spec"] == {"size": 100}
    body = expect_status(
        lambda: custom.patch_namespaced_custom_object(*args, "p", {"spec": {"size": 50}}), 422, "Invalid"
    )
    # a changed spec is checked again: the new size, and the tier it lacks
    assert [field for field, _ in causes(body)] == ["spec.tier", "spec.size"]
    assert custom.patch_namespaced_custom_object(*args, "p", {"spec": {"size": 5, "tier": "gpu"}})[
        "spec"
    ] == {
        "size": 5,
        "tier": "gpu",
    }


def test_a_crd_whose_rule_does_not_compile_is_refused(api: client.ApiClient) -> None:
    manifest = crd_manifest()
    manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = {
        "type": "object",
        "properties": {"spec": {"type": "object", "x-kubernetes-validations": [{"rule": "self.size >"}]}},
    }
    body = expect_status(
        lambda: client.ApiextensionsV1Api(api).create_custom_resource_definition(manifest), 422, "Invalid"
    )
    assert [field for field, _ in causes(body)] == [
        "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule"
    ]


# ---------------------------------------------------------------------------------------------
# selectors
# ---------------------------------------------------------------------------------------------

LABEL_SETS = {
    "p-gpu": {"app": "vllm", "tier": "gpu", "zone": "a"},
    "p-cpu": {"app": "vllm", "tier": "cpu"},
    "p-other": {"app": "router"},
    "p-none": {},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=vllm", ["p-cpu", "p-gpu"]),
        ("app==vllm", ["p-cpu", "p-gpu"]),
        ("app!=vllm", ["p-none", "p-other"]),
        ("tier", ["p-cpu", "p-gpu"]),
        ("!tier", ["p-none", "p-other"]),
        ("tier in (gpu, tpu)", ["p-gpu"]),
        ("tier notin (gpu)", ["p-cpu", "p-none", "p-other"]),
        ("app=vllm,tier!=gpu", ["p-cpu"]),
        ("app in (vllm,router),!zone", ["p-cpu", "p-other"]),
        ("", ["p-cpu", "p-gpu", "p-none", "p-other"]),
    ],
)
def test_label_selectors(
    server: KubeApiServer, core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    for name, labels in LABEL_SETS.items():
        server.create(pod(name, labels))
    assert [
        p.metadata.name for p in core.list_namespaced_pod("default", label_selector=selector).items
    ] == expected


def test_label_selector_parsing_edge_cases() -> None:
    assert LabelSelector.parse("example.com/tier in (a,b), x > 3").matches(
        {"example.com/tier": "a", "x": "4"}
    )
    assert not LabelSelector.parse("x < 3").matches({"x": "4"})
    assert str(
        LabelSelector.from_object(
            {
                "matchLabels": {"a": "b"},
                "matchExpressions": [
                    {"key": "c", "operator": "NotIn", "values": ["y", "x"]},
                    {"key": "d", "operator": "Exists"},
                ],
            }
        )
    ) == ("a=b,c notin (x,y),d")


def test_bad_selectors_are_bad_requests(core: client.CoreV1Api) -> None:
    expect_status(lambda: core.list_namespaced_pod("default", label_selector="a in (b"), 400, "BadRequest")
    expect_status(
        lambda: core.list_namespaced_pod("default", field_selector="spec.bogus=1"), 400, "BadRequest"
    )


def test_field_selectors(server: KubeApiServer, core: client.CoreV1Api) -> None:
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    server.create(pod("a"))
    server.create({**pod("b"), "status": {"phase": "Running"}})
    server.create({**pod("a"), "metadata": {"name": "a", "namespace": "other"}})
    names = lambda **kw: [  # noqa: E731
        (p.metadata.namespace, p.metadata.name) for p in core.list_pod_for_all_namespaces(**kw).items
    ]
    assert names(field_selector="metadata.name=a") == [("default", "a"), ("other", "a")]
    assert names(field_selector="metadata.namespace==other") == [("other", "a")]
    assert names(field_selector="metadata.name!=a") == [("default", "b")]
    assert names(field_selector="status.phase=Running,metadata.namespace=default") == [("default", "b")]


# ---------------------------------------------------------------------------------------------
# watches
# ---------------------------------------------------------------------------------------------


def test_watch_replays_history_then_streams_live(core: client.CoreV1Api, server: KubeApiServer) -> None:
    start = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("p1"))  # before the watch: replayed from history
    core.patch_namespaced_pod("p1", "default", {"metadata": {"labels": {"a": "b"}}})

    def live_changes() -> None:
        server.patch_status("v1", "Pod", "default", "p1", {"phase": "Running"})
        server.delete("v1", "Pod", "default", "p1")

    writer = later(live_changes, delay=0.3)
    w = watch.Watch()
    events = collect(
        w.stream(core.list_namespaced_pod, "default", resource_version=start, timeout_seconds=5), 4
    )
    writer.join()
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]
    assert all(isinstance(e["object"], client.V1Pod) for e in events)
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 4
    assert events[2]["object"].status.phase == "Running"
    assert events[0]["raw_object"]["kind"] == "Pod"  # watch objects carry kind/apiVersion
    assert w.resource_version == str(versions[-1])


def test_watch_without_resource_version_sends_current_state_first(
    core: client.CoreV1Api, server: KubeApiServer
) -> None:
    server.create(pod("p1"))
    server.create(pod("p2"))
    writer = later(lambda: server.create(pod("p3")), delay=0.2)
    events = collect(watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=5), 3)
    writer.join()
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "p1"),
        ("ADDED", "p2"),
        ("ADDED", "p3"),
    ]


def test_watch_filters_by_namespace_and_selectors(core: client.CoreV1Api, server: KubeApiServer) -> None:
    server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    start = server.resource_version
    server.create(
        {**pod("x", {"app": "vllm"}), "metadata": {"name": "x", "namespace": "other", "labels": {}}}
    )
    server.create(pod("p1", {"app": "router"}))
    server.create(pod("p2", {"app": "vllm"}))
    # p1 starts matching (ADDED for this watcher), p2 stops matching (DELETED)
    server.patch("v1", "Pod", "default", "p1", {"metadata": {"labels": {"app": "vllm"}}})
    server.patch("v1", "Pod", "default", "p2", {"metadata": {"labels": {"app": "router"}}})
    server.patch("v1", "Pod", "default", "p2", {"metadata": {"labels": {"app": "gone"}}})
    server.create(pod("end", {"app": "vllm"}))
    server.patch("v1", "Pod", "other", "x", {"metadata": {"labels": {"seen": "yes"}}})
    events = until_named(
        watch.Watch().stream(
            core.list_namespaced_pod,
            "default",
            label_selector="app=vllm",
            resource_version=start,
            timeout_seconds=5,
        ),
        "end",
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "p2"),
        ("ADDED", "p1"),
        ("DELETED", "p2"),
        ("ADDED", "end"),
    ]
    # the DELETED object is the last state that matched, at the event's resourceVersion
    assert events[2]["object"].metadata.labels == {"app": "vllm"}
    assert int(events[2]["object"].metadata.resource_version) > int(
        events[1]["object"].metadata.resource_version
    )

    by_name = collect(
        watch.Watch().stream(
            core.list_pod_for_all_namespaces,
            field_selector="metadata.name=x",
            resource_version=start,
            timeout_seconds=5,
        ),
        2,
    )
    assert [(e["type"], e["object"].metadata.namespace) for e in by_name] == [
        ("ADDED", "other"),
        ("MODIFIED", "other"),
    ]


def test_watch_after_compaction_is_gone(core: client.CoreV1Api, server: KubeApiServer) -> None:
    start = core.list_namespaced_pod("default").metadata.resource_version
    server.create(pod("p1"))
    compacted = server.compact()
    assert compacted == server.resource_version
    with pytest.raises(ApiException) as info:
        list(
            watch.Watch().stream(
                core.list_namespaced_pod, "default", resource_version=start, timeout_seconds=1
            )
        )
    assert info.value.status == 410
    assert "Expired" in info.value.reason
    # watching from the compaction point (or later) is fine
    server.create(pod("p2"))
    events = until_named(
        watch.Watch().stream(
            core.list_namespaced_pod, "default", resource_version=compacted, timeout_seconds=5
        ),
        "p2",
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "p2")]


async def test_compaction_ends_open_watches_that_owe_events(server: KubeApiServer) -> None:
    """Like etcd: a caught-up watch survives a compaction; one that has not yet sent a change from
    before it ends with 410 Expired, and that change is lost with it (the client must re-list)."""
    url = f"{server.base_url}/api/v1/namespaces/default/pods"
    params = {"watch": "true", "resourceVersion": server.resource_version, "timeoutSeconds": "30"}

    async def next_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
        line = await asyncio.wait_for(resp.content.readline(), timeout=5)
        return {"type": None} if not line else json.loads(line)

    async with aiohttp.ClientSession() as session, session.get(url, params=params) as resp:
        server.create(pod("p0"))
        assert (await next_event(resp))["object"]["metadata"]["name"] == "p0"  # open and caught up
        server.compact()
        server.create(pod("p1"))
        assert (await next_event(resp))["object"]["metadata"]["name"] == "p1"  # survived
        with server.hold_watches():
            server.create(pod("p2"))
            with pytest.raises(TimeoutError):  # held back, as for a client that fell behind
                await asyncio.wait_for(resp.content.readline(), timeout=0.3)
        assert (await next_event(resp))["object"]["metadata"]["name"] == "p2"  # sent when released
        with server.hold_watches():
            server.create(pod("p3"))
            server.compact()
        event = await next_event(resp)
        assert event["type"] == "ERROR"
        assert event["object"] == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "The resourceVersion for the provided watch is too old.",
            "reason": "Expired",
            "code": 410,
        }
        assert (await next_event(resp))["type"] is None  # the stream ends; p3 never came


def test_history_limit_expires_old_resource_versions() -> None:
    with KubeApiServer(history_limit=3) as srv, srv.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        start = srv.resource_version
        for i in range(5):
            srv.create(configmap(f"c{i}"))
        with pytest.raises(ApiException) as info:
            list(
                watch.Watch().stream(
                    core.list_namespaced_config_map, "default", resource_version=start, timeout_seconds=1
                )
            )
        assert info.value.status == 410
        recent = str(int(srv.resource_version) - 3)
        stream = watch.Watch().stream(
            core.list_namespaced_config_map, "default", resource_version=recent, timeout_seconds=5
        )
        assert [e["object"].metadata.name for e in until_named(stream, "c4")] == ["c2", "c3", "c4"]


def test_raw_watch_wire_format(server: KubeApiServer, api: client.ApiClient) -> None:
    start = server.resource_version
    server.create(pod("p1"))
    server.compact()
    http = api.rest_client.pool_manager
    ok = http.request(
        "GET", f"{server.base_url}/api/v1/namespaces/default/pods?watch=1&resourceVersion=0&timeoutSeconds=1"
    )
    assert ok.status == 200
    assert ok.headers["Transfer-Encoding"] == "chunked"
    assert ok.headers["Content-Type"].startswith("application/json")
    lines = ok.data.decode().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["ADDED"]
    gone = http.request(
        "GET", f"{server.base_url}/api/v1/namespaces/default/pods?watch=true&resourceVersion={start}"
    )
    assert gone.status == 200  # the real server reports expiry inside the stream, then ends it
    (line,) = gone.data.decode().splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert event["object"] == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {start} ({server.resource_version})",
        "reason": "Expired",
        "code": 410,
    }


def test_watch_timeout_ends_stream_cleanly(core: client.CoreV1Api) -> None:
    began = time.monotonic()
    events = list(watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=1))
    elapsed = time.monotonic() - began
    assert events == []
    assert 0.9 <= elapsed < 3


def test_watch_bookmarks(core: client.CoreV1Api, server: KubeApiServer) -> None:
    start = core.list_namespaced_pod("default").metadata.resource_version
    server.create(configmap("unrelated"))  # advances the store past the watched resource
    w = watch.Watch()
    events = collect(
        w.stream(
            core.list_namespaced_pod,
            "default",
            resource_version=start,
            allow_watch_bookmarks=True,
            timeout_seconds=3,
        ),
        2,
    )
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    bookmark = events[0]["raw_object"]
    assert bookmark["kind"] == "Pod" and bookmark["apiVersion"] == "v1"
    assert bookmark["metadata"] == {"resourceVersion": server.resource_version}
    assert w.resource_version == server.resource_version
    # A bookmarked resourceVersion survives compaction: resuming from it is not 410.
    server.compact()
    server.create(pod("p1"))
    resumed = until_named(
        watch.Watch().stream(
            core.list_namespaced_pod, "default", resource_version=w.resource_version, timeout_seconds=5
        ),
        "p1",
    )
    assert [(e["type"], e["object"].metadata.name) for e in resumed] == [("ADDED", "p1")]


def test_watch_without_bookmarks_sends_none(core: client.CoreV1Api) -> None:
    events = list(
        watch.Watch().stream(core.list_namespaced_pod, "default", resource_version="1", timeout_seconds=1)
    )
    assert all(e["type"] != "BOOKMARK" for e in events)


def test_watch_send_initial_events(server: KubeApiServer, api: client.ApiClient) -> None:
    server.create(pod("p1"))
    response = api.rest_client.pool_manager.request(
        "GET",
        f"{server.base_url}/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true"
        "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1",
    )
    events = [json.loads(line) for line in response.data.decode().splitlines()]
    assert [e["type"] for e in events[:2]] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_custom_objects(server: KubeApiServer, custom: client.CustomObjectsApi) -> None:
    server.register_crd(crd_manifest())
    args = ("brickyard.dev", "v1alpha1", "default", "inferencepools")
    start = custom.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"]
    custom.create_namespaced_custom_object(*args, {"metadata": {"name": "a"}, "spec": {}})
    custom.patch_namespaced_custom_object(*args, "a", {"spec": {"x": 1}})
    custom.delete_namespaced_custom_object(*args, "a")
    custom.create_namespaced_custom_object(*args, {"metadata": {"name": "end"}, "spec": {}})
    events = until_named(
        watch.Watch().stream(
            custom.list_namespaced_custom_object, *args, resource_version=start, timeout_seconds=5
        ),
        "end",
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "a"),
        ("ADDED", "end"),
    ]


def test_stop_ends_open_watches(server: KubeApiServer, core: client.CoreV1Api) -> None:
    finished = threading.Event()

    def consume() -> None:
        list(watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=30))
        finished.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.2)
    began = time.monotonic()
    server.stop()
    consumer.join(timeout=5)
    assert finished.is_set() and time.monotonic() - began < 3


# ---------------------------------------------------------------------------------------------
# Python API, threads, async callers
# ---------------------------------------------------------------------------------------------


def test_python_api(server: KubeApiServer, core: client.CoreV1Api) -> None:
    created = server.create({**pod("p1"), "status": {"phase": "Running", "podIP": "10.0.0.7"}})
    assert created["status"]["podIP"] == "10.0.0.7"  # the Python API may set status directly
    assert core.read_namespaced_pod("p1", "default").status.pod_ip == "10.0.0.7"
    assert server.get("v1", "pods", "default", "missing") is None

    stale = dict(created)
    server.patch("v1", "Pod", "default", "p1", {"metadata": {"labels": {"a": "b"}}})
    with pytest.raises(KubeApiError) as info:
        server.update(stale)
    assert info.value.code == 409 and info.value.status()["reason"] == "Conflict"
    stale["metadata"] = {k: v for k, v in stale["metadata"].items() if k != "resourceVersion"}
    assert server.update(stale)["metadata"].get("labels") == {}

    server.patch_status("v1", "Pod", "default", "p1", {"phase": "Succeeded"})
    assert [
        p["metadata"]["name"] for p in server.list("v1", "Pod", field_selector="status.phase=Succeeded")
    ] == ["p1"]
    assert server.list("v1", "Pod", label_selector="a=b") == []

    server.create(configmap("c1", finalizers=["f"]))
    pending = server.delete("v1", "ConfigMap", "default", "c1")
    assert pending is not None and pending["metadata"]["deletionTimestamp"]
    server.update({**pending, "metadata": {**pending["metadata"], "finalizers": []}})
    assert server.get("v1", "ConfigMap", "default", "c1") is None
    assert server.delete("v1", "Pod", "default", "p1") is None

    # model objects are accepted too
    server.create(
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="typed"), data={"a": "1"}, api_version="v1", kind="ConfigMap"
        )
    )
    assert server.get("v1", "configmap", "default", "typed")["data"] == {"a": "1"}


def test_concurrent_writers_get_unique_versions(server: KubeApiServer, core: client.CoreV1Api) -> None:
    start = server.resource_version

    def write(prefix: str) -> None:
        with server.api_client() as own_client:
            own = client.CoreV1Api(own_client)
            for i in range(10):
                own.create_namespaced_config_map("default", configmap(f"{prefix}-{i}"))

    threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
    threads += [threading.Thread(target=lambda: [server.create(configmap(f"py-{i}")) for i in range(10)])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = collect(
        watch.Watch().stream(
            core.list_namespaced_config_map, "default", resource_version=start, timeout_seconds=5
        ),
        50,
    )
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert len(events) == 50
    assert versions == list(range(int(start) + 1, int(start) + 51))


async def test_async_caller_on_another_loop(server: KubeApiServer) -> None:
    """An async test (pytest's loop) streams a watch while a sync write happens on a thread."""
    start = server.resource_version
    url = f"{server.base_url}/api/v1/namespaces/default/configmaps"
    async with aiohttp.ClientSession() as session:
        async with session.get(
            url, params={"watch": "true", "resourceVersion": start, "timeoutSeconds": "5"}
        ) as resp:
            assert resp.status == 200
            await asyncio.to_thread(server.create, configmap("from-thread"))
            line = await asyncio.wait_for(resp.content.readline(), timeout=5)
        event = json.loads(line)
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "from-thread")
        async with session.get(url) as resp:
            listed = await resp.json()
        assert listed["kind"] == "ConfigMapList"
        assert "kind" not in listed["items"][0]  # typed lists carry no per-item kind, like the real server
