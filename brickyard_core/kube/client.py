"""The Kubernetes API as raw JSON: ``KubeClient``, the ``Resource`` it addresses, ``ApiError``.

The official ``kubernetes`` client is synchronous, and its typed models cost far more than the few fields
anyone here reads. ``KubeClient`` calls its ``ApiClient.call_api`` (what the typed APIs wrap) with
``_preload_content=False`` and decodes the JSON itself: the async verbs run that blocking call in a thread
(``asyncio.to_thread``), an informer's watch thread calls ``request`` and ``stream`` directly. Every
failure is an ``ApiError`` carrying the HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A Kubernetes object as the API sends it: decoded JSON, no typed model.
Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


def api_client_from_environment() -> Any:
    """An ``ApiClient`` from the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import client, config  # optional dependency, imported where used

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


@dataclass(frozen=True)
class Resource:
    """A REST resource: where its objects live and what they are called."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


PODS = Resource("", "v1", "pods", "Pod")
SECRETS = Resource("", "v1", "secrets", "Secret")
EVENTS = Resource("", "v1", "events", "Event")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
HTTP_ROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")
MODEL_ADAPTERS = Resource("brickyard.dev", "v1alpha1", "modeladapters", "ModelAdapter")
POD_AUTOSCALERS = Resource("brickyard.dev", "v1alpha1", "podautoscalers", "PodAutoscaler")

#: Kinds whose plural is known without asking the API server's discovery.
_KNOWN_PLURALS = {
    ("apps", "Deployment"): "deployments",
    ("apps", "StatefulSet"): "statefulsets",
    ("apps", "ReplicaSet"): "replicasets",
    ("", "ReplicationController"): "replicationcontrollers",
}


class ApiError(Exception):
    """A failed API call: ``status`` is the HTTP status (0: no response), ``reason`` the Status reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def gone(self) -> bool:
        """410 Gone: a watch asked for history the server no longer keeps."""
        return self.status == 410


def _api_error(exc: Any) -> ApiError:
    """The ``ApiError`` of the official client's ``ApiException`` (its body is a ``Status`` object)."""
    reason, message = getattr(exc, "reason", "") or "", str(exc)
    body = getattr(exc, "body", None)
    with contextlib.suppress(ValueError, TypeError):
        data = json.loads(body) if body else {}
        reason, message = data.get("reason", reason), data.get("message", message)
    return ApiError(exc.status or 0, str(reason), str(message))


class KubeClient:
    """Raw-JSON calls of the official client; the async methods run them in a thread.

    Without an ``ApiClient`` one is built from the environment on first use, in the thread that makes the
    call: an informer then retries a kubeconfig that is not there yet like any other failure.
    """

    def __init__(self, api_client: Any = None, *, timeout_seconds: float = 30.0) -> None:
        self.timeout_seconds = timeout_seconds
        self._api_client = api_client
        self._api_client_lock = threading.Lock()
        self._plurals: dict[tuple[str, str, str], Resource] = {}

    @property
    def api_client(self) -> Any:
        with self._api_client_lock:
            if self._api_client is None:
                self._api_client = api_client_from_environment()
            return self._api_client

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Obj:
        """One blocking call; the decoded JSON answer. Raises ``ApiError``."""
        response = self._call(
            method, path, query=query, body=body, content_type=content_type, timeout=self.timeout_seconds
        )
        data = response.data
        return json.loads(data) if data else {}

    def stream(self, path: str, *, query: Mapping[str, Any], timeout: tuple[float, float]) -> Any:
        """A blocking GET whose answer is read as it arrives (a watch): the urllib3 response, which the
        caller reads with ``stream()`` and closes. ``timeout``: (connect, read) seconds."""
        return self._call("GET", path, query=query, timeout=timeout)

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None,
        timeout: float | tuple[float, float],
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api_client.call_api(
                path,
                method,
                query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        except Exception as exc:  # connection refused, timeouts, no kubeconfig: no response at all
            raise ApiError(0, "Unavailable", str(exc)) from exc

    async def call(self, method: str, path: str, **kwargs: Any) -> Obj:
        return await asyncio.to_thread(self.request, method, path, **kwargs)

    # -- verbs --------------------------------------------------------------------------------------------

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return await self.call("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list(
        self, resource: Resource, namespace: str | None, *, label_selector: str | None = None
    ) -> list[Obj]:
        data = await self.call("GET", resource.path(namespace), query={"labelSelector": label_selector})
        return data.get("items") or []

    async def create(self, resource: Resource, namespace: str | None, obj: Obj) -> Obj:
        return await self.call("POST", resource.path(namespace), body=obj)

    async def replace(self, resource: Resource, obj: Obj, *, subresource: str | None = None) -> Obj:
        """PUT the whole object (its ``metadata.resourceVersion`` makes it conditional: 409 if stale)."""
        meta = obj["metadata"]
        return await self.call(
            "PUT", resource.path(meta.get("namespace"), meta["name"], subresource), body=obj
        )

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Obj,
        *,
        subresource: str | None = None,
    ) -> Obj:
        """JSON merge patch (what custom resources accept); a resourceVersion in it is a precondition."""
        return await self.call(
            "PATCH", resource.path(namespace, name, subresource), body=patch, content_type=MERGE_PATCH
        )

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> None:
        """Delete; an object already gone is fine."""
        try:
            await self.call("DELETE", resource.path(namespace, name))
        except ApiError as exc:
            if not exc.not_found:
                raise

    async def resource_for(self, api_version: str, kind: str) -> Resource:
        """The resource of a kind (for a ``scaleTargetRef``): a small table, else the server's discovery."""
        group, _, version = api_version.rpartition("/")
        cache_key = (group, version, kind)
        if (found := self._plurals.get(cache_key)) is not None:
            return found
        plural = _KNOWN_PLURALS.get((group, kind))
        namespaced = True
        if plural is None:
            path = f"/apis/{group}/{version}" if group else f"/api/{version}"
            listing = await self.call("GET", path)
            entry = next(
                (r for r in listing.get("resources") or [] if r.get("kind") == kind and "/" not in r["name"]),
                None,
            )
            if entry is None:
                raise ApiError(404, "NotFound", f"no kind {kind} in {api_version}")
            plural, namespaced = entry["name"], bool(entry.get("namespaced", True))
        resource = self._plurals[cache_key] = Resource(group, version, plural, kind, namespaced)
        return resource
