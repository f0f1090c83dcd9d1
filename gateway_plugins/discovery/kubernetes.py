"""Discovery from the Kubernetes API: engine Pods, and the ModelAdapters saying where each adapter runs.

Both watch through ``brickyard_core.kube.informer.Informer``, the controllers' informer too: list, watch
from the list's resourceVersion, re-list on 410 Gone, in a thread that hands every change to the event
loop, so the registry is only ever touched on the loop. Objects stay raw JSON: turning every Pod into the
client's typed models costs far more than the few fields read. What makes a pod serve is
``brickyard_core.kube.objects.pod_ready``, the rule the controllers place adapters by.

ModelAdapters (``brickyard.dev/v1alpha1``, written by the ModelAdapter
controller) restrict an adapter's name to the pods in their
``status.instances``: the gateway then routes the adapter only to pods that
both the controller placed it on and whose pod-metrics record lists it. Without
the CRD (404 on the list) the informer logs it once and adapters route by the
records alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from brickyard_core.kube.client import MODEL_ADAPTERS, PODS, KubeClient, Obj
from brickyard_core.kube.informer import Informer
from brickyard_core.kube.objects import pod_ready
from gateway_plugins.discovery.registry import PodInfo, PodKey, PodRegistry

log = logging.getLogger(__name__)

MODEL_LABEL = "model.aibrix.ai/name"
PORT_LABEL = "model.aibrix.ai/port"
DEFAULT_PORT = 8000


def pod_info(pod: Mapping[str, Any]) -> PodInfo | None:
    """A Pod object (JSON) as the gateway sees it; None if it is not an engine pod."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    model = labels.get(MODEL_LABEL)
    if not model:
        return None
    ip = (pod.get("status") or {}).get("podIP") or ""
    port = labels.get(PORT_LABEL, "")
    return PodInfo(
        name=meta.get("name", ""),
        address=f"{ip}:{int(port) if port.isdigit() else DEFAULT_PORT}",
        model=model,
        namespace=meta.get("namespace", "default"),
        ready=pod_ready(pod),
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
        self.informer = Informer(
            KubeClient(api_client),
            PODS,
            namespace=namespace or None,  # unset or empty: every namespace
            label_selector=label_selector,
            watch_timeout_seconds=watch_timeout_seconds,
        )
        # A (re-)list replaces the registry's pods at once: one re-index, not one per pod.
        self.informer.add_handler(self._changed, on_list=self._listed)

    @property
    def synced(self) -> asyncio.Event:
        """Set by the first list."""
        return self.informer.synced

    async def run(self) -> None:
        """Run until cancelled."""
        await self.informer.run()

    def _listed(self, items: list[Obj]) -> None:
        pods = [info for item in items if (info := pod_info(item)) is not None]
        self.registry.replace_all(pods)
        log.info("listed %d engine pods", len(pods))

    def _changed(self, old: Obj | None, new: Obj | None) -> None:
        info = pod_info(new) if new is not None else None
        if info is not None:
            self.registry.upsert(info)
        else:  # deleted, or no longer an engine pod
            namespace, name = _key(new or old or {})
            self.registry.remove(namespace, name)


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
        self.informer = Informer(
            KubeClient(api_client),
            MODEL_ADAPTERS,
            namespace=namespace or None,  # unset or empty: every namespace
            watch_timeout_seconds=watch_timeout_seconds,
        )
        self.informer.add_handler(self._changed)

    @property
    def synced(self) -> asyncio.Event:
        """Set by the first list, or when the CRD is found missing (nothing to wait for)."""
        return self.informer.synced

    @property
    def absent(self) -> bool:
        """The API server does not serve ModelAdapters (CRD not installed): adapters route by records."""
        return self.informer.absent

    async def run(self) -> None:
        await self.informer.run()

    def _changed(self, old: Obj | None, new: Obj | None) -> None:
        """Hand the registry the union of the instances of every ModelAdapter of each adapter named."""
        for adapter in {adapter_instances(obj)[0] for obj in (old, new) if obj is not None}:
            owners = [
                pods for name, pods in map(adapter_instances, self.informer.cache.values()) if name == adapter
            ]
            self.registry.set_adapter_instances(adapter, frozenset().union(*owners) if owners else None)


def _key(obj: Mapping[str, Any]) -> PodKey:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace", "default"), meta.get("name", ""))
