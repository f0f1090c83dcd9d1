"""Discovery from the Kubernetes API: engine Pods, and the ModelAdapters saying where each adapter runs.

Both follow the same list/watch loop (``brickyard_core.kube.ListWatch``): the
official client is synchronous, so the loop runs in a daemon thread and hands
every change to the event loop; the registry is only ever touched on the loop.
Responses are read as raw JSON (``_preload_content=False``): turning every Pod
into the client's typed models costs far more than the three fields read.

ModelAdapters (``brickyard.dev/v1alpha1``, written by the ModelAdapter
controller) restrict an adapter's name to the pods in their
``status.instances``: the gateway then routes the adapter only to pods that
both the controller placed it on and whose pod-metrics record lists it. Without
the CRD (404 on the list) this is logged once and adapters route by the records
alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import Any

from brickyard_core.kube import ListCall, ListWatch, api_client_from_environment
from gateway_plugins.discovery.registry import PodInfo, PodKey, PodRegistry

log = logging.getLogger(__name__)

MODEL_LABEL = "model.aibrix.ai/name"
PORT_LABEL = "model.aibrix.ai/port"
DEFAULT_PORT = 8000
MODEL_ADAPTER_GROUP = "brickyard.dev"
MODEL_ADAPTER_VERSION = "v1alpha1"
MODEL_ADAPTER_PLURAL = "modeladapters"


def pod_info(pod: Mapping[str, Any]) -> PodInfo | None:
    """A Pod object (JSON) as the gateway sees it; None if it is not an engine pod."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    model = labels.get(MODEL_LABEL)
    if not model:
        return None
    status = pod.get("status") or {}
    ip = status.get("podIP") or ""
    port = labels.get(PORT_LABEL, "")
    conditions = status.get("conditions") or []
    ready = (
        bool(ip)
        and status.get("phase") == "Running"
        and not meta.get("deletionTimestamp")
        and any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    )
    return PodInfo(
        name=meta.get("name", ""),
        address=f"{ip}:{int(port) if port.isdigit() else DEFAULT_PORT}",
        model=model,
        namespace=meta.get("namespace", "default"),
        ready=ready,
        labels=labels,
        annotations=meta.get("annotations") or {},
    )


def adapter_instances(model_adapter: Mapping[str, Any]) -> tuple[str, frozenset[PodKey]]:
    """(adapter name, pods) of a ModelAdapter object: its name and its ``status.instances``."""
    meta = model_adapter.get("metadata") or {}
    namespace = meta.get("namespace", "default")
    instances = (model_adapter.get("status") or {}).get("instances") or []
    return meta.get("name", ""), frozenset((namespace, pod) for pod in instances if isinstance(pod, str))


class KubernetesDiscovery:
    """Engine pods (labelled ``model.aibrix.ai/name``) into the registry."""

    def __init__(
        self,
        registry: PodRegistry,
        *,
        namespace: str | None = None,
        label_selector: str = MODEL_LABEL,
        watch_timeout_seconds: int = 300,
        api_client: Any = None,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        self.label_selector = label_selector
        self._api_client = api_client
        self.synced = asyncio.Event()
        self._watch = ListWatch(
            "pods",
            self._connect,
            on_list=self._listed,
            on_event=self._apply,
            watch_timeout_seconds=watch_timeout_seconds,
        )

    async def run(self) -> None:
        """Run until cancelled; the first successful list sets ``synced``."""
        await self._watch.run()

    def _connect(self) -> ListCall:
        from kubernetes import client

        if self._api_client is None:
            self._api_client = api_client_from_environment()
        api = client.CoreV1Api(self._api_client)
        if self.namespace:
            return functools.partial(
                api.list_namespaced_pod, self.namespace, label_selector=self.label_selector
            )
        return functools.partial(api.list_pod_for_all_namespaces, label_selector=self.label_selector)

    def _listed(self, items: list[dict[str, Any]]) -> None:
        pods = [info for item in items if (info := pod_info(item)) is not None]
        self.registry.replace_all(pods)
        self.synced.set()
        log.info("listed %d engine pods", len(pods))

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        info = pod_info(obj)
        if info is None:
            meta = obj.get("metadata") or {}
            self.registry.remove(meta.get("namespace", "default"), meta.get("name", ""))
        elif kind == "DELETED":
            self.registry.remove(info.namespace, info.name)
        else:
            self.registry.upsert(info)


class ModelAdapterDiscovery:
    """Each ModelAdapter's ``status.instances`` into the registry, as the only pods its adapter may use."""

    def __init__(
        self,
        registry: PodRegistry,
        *,
        namespace: str | None = None,
        watch_timeout_seconds: int = 300,
        api_client: Any = None,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        self._api_client = api_client
        #: ModelAdapter (namespace, name) -> (adapter name, its instances).
        self._adapters: dict[PodKey, tuple[str, frozenset[PodKey]]] = {}
        self.synced = asyncio.Event()
        self.absent = False
        self._watch = ListWatch(
            "modeladapters",
            self._connect,
            on_list=self._listed,
            on_event=self._apply,
            on_absent=self._crd_absent,
            watch_timeout_seconds=watch_timeout_seconds,
        )

    async def run(self) -> None:
        await self._watch.run()

    def _connect(self) -> ListCall:
        from kubernetes import client

        if self._api_client is None:
            self._api_client = api_client_from_environment()
        api = client.CustomObjectsApi(self._api_client)
        args = (MODEL_ADAPTER_GROUP, MODEL_ADAPTER_VERSION)
        if self.namespace:
            return functools.partial(
                api.list_namespaced_custom_object, *args, self.namespace, MODEL_ADAPTER_PLURAL
            )
        return functools.partial(api.list_cluster_custom_object, *args, MODEL_ADAPTER_PLURAL)

    def _crd_absent(self) -> None:
        self.absent = True
        self.synced.set()  # nothing to wait for
        log.warning(
            "ModelAdapter CRD (%s/%s) not installed: adapters route by pod-metrics records alone",
            MODEL_ADAPTER_GROUP,
            MODEL_ADAPTER_VERSION,
        )

    def _listed(self, items: list[dict[str, Any]]) -> None:
        self.absent = False
        before = {adapter for adapter, _ in self._adapters.values()}
        self._adapters = {_key(item): adapter_instances(item) for item in items}
        self._publish(before | {adapter for adapter, _ in self._adapters.values()})
        self.synced.set()

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        touched = set()
        if (old := self._adapters.pop(key, None)) is not None:
            touched.add(old[0])
        if kind != "DELETED":
            self._adapters[key] = new = adapter_instances(obj)
            touched.add(new[0])
        self._publish(touched)

    def _publish(self, adapters: set[str]) -> None:
        """Hand the registry the union of the instances of every ModelAdapter of each named adapter."""
        for adapter in adapters:
            owners = [pods for name, pods in self._adapters.values() if name == adapter]
            self.registry.set_adapter_instances(adapter, frozenset().union(*owners) if owners else None)


def _key(obj: Mapping[str, Any]) -> PodKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace", "default"), meta.get("name", ""))
