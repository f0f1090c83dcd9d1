"""Pod discovery from the Kubernetes API: list, then watch, re-list when the watch expires.

The official ``kubernetes`` client is synchronous, so the list/watch loop runs
in one daemon thread and hands every change to the event loop with
``call_soon_threadsafe``; the registry is only ever touched on the loop.
Responses are read as raw JSON (``_preload_content=False``): turning every
Pod into the client's typed models costs far more than the three fields read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gateway_plugins.discovery.registry import PodInfo, PodRegistry

log = logging.getLogger(__name__)

MODEL_LABEL = "model.aibrix.ai/name"
PORT_LABEL = "model.aibrix.ai/port"
DEFAULT_PORT = 8000
_BACKOFF_MAX = 30.0


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


class KubernetesDiscovery:
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
        self.watch_timeout_seconds = watch_timeout_seconds
        self._api_client = api_client
        self._stop = threading.Event()
        self._response: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """Run until cancelled; the first successful list sets ``synced``."""
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._run_thread, name="k8s-pod-watch", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()
            response = self._response
            if response is not None:
                response.close()  # unblocks a watch waiting for the next event

    # -- the watch thread --------------------------------------------------------------

    def _run_thread(self) -> None:
        from kubernetes import client, config  # optional dependency, imported where used

        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        api = client.CoreV1Api(self._api_client)
        backoff = 1.0
        while not self._stop.is_set():
            try:
                version = self._list(api)
                backoff = 1.0
                while not self._stop.is_set():
                    version = self._watch(api, version)
                    if version is None:
                        break  # history expired (410): re-list
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("pod watch failed, retrying in %.0f s: %s", backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _call(self, api: Any, **kwargs: Any) -> Any:
        kwargs.update(label_selector=self.label_selector, _preload_content=False)
        if self.namespace:
            return api.list_namespaced_pod(self.namespace, **kwargs)
        return api.list_pod_for_all_namespaces(**kwargs)

    def _list(self, api: Any) -> str:
        response = self._call(api, _request_timeout=30)
        data = json.loads(response.data)
        pods = [info for item in data.get("items") or [] if (info := pod_info(item)) is not None]
        self._post(lambda: self.registry.replace_all(pods))
        self._post(self.synced.set)
        log.info("listed %d engine pods", len(pods))
        return data["metadata"]["resourceVersion"]

    def _watch(self, api: Any, version: str) -> str | None:
        """Apply watch events from ``version``; the next version, or None on 410 Gone."""
        self._response = response = self._call(
            api,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_seconds,
            _request_timeout=(10, self.watch_timeout_seconds + 30),
        )
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.info("pod watch expired at resourceVersion %s; re-listing", version)
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                self._apply(kind, obj)
        finally:
            self._response = None
            response.close()
        return version

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        info = pod_info(obj)
        if info is None:
            meta = obj.get("metadata") or {}
            namespace, name = meta.get("namespace", "default"), meta.get("name", "")
            self._post(lambda: self.registry.remove(namespace, name))
        elif kind == "DELETED":
            self._post(lambda: self.registry.remove(info.namespace, info.name))
        else:
            self._post(lambda: self.registry.upsert(info))

    def _post(self, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback)


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited events from a streamed urllib3 response."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending
