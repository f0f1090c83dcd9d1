"""A small controller-runtime on asyncio and the official (synchronous) ``kubernetes`` client.

The shape is controller-runtime's, cut down to what the controllers here use:

* ``KubeClient``: raw-JSON API calls through the official client's ``ApiClient.call_api`` (what its typed
  APIs wrap), addressed by ``Resource`` (group, version, plural); every async method runs the blocking
  call in a thread (``asyncio.to_thread``). Failures are ``ApiError`` with the HTTP status.
* ``Informer``: the cache of one resource, fed by a list/watch thread (``brickyard_core.kube.ListWatch``:
  list, watch from its resourceVersion, re-list on 410 Gone); handlers see ``(old, new)`` of every change.
* ``WorkQueue``: de-duplicating (a key queued twice is reconciled once), never one key on two workers
  (a key added while being reconciled is queued again when that ends), delayed adds, per-key exponential
  backoff (``add_rate_limited``, reset by ``forget``).
* ``Controller``: maps informer changes to keys, runs ``reconcile(key) -> Result`` on worker tasks,
  re-queues every key of its primary informer each ``resync_seconds`` (level-triggered: a reconcile
  reads the world and converges, whatever event woke it). An exception re-queues the key with backoff;
  a 409 Conflict is just that (the cache catches up and the next try reads the newer object).
* ``EventRecorder``: ``core/v1`` Events about an object; ``Manager``: shared informers, start order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from brickyard_core.kube import ListCall, ListWatch, api_status

log = logging.getLogger(__name__)

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


# -- resources and the client ------------------------------------------------------------------------------


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


def _api_error(exc: Exception) -> ApiError:
    status = api_status(exc) or 0
    reason, message = getattr(exc, "reason", "") or "", str(exc)
    body = getattr(exc, "body", None)
    with contextlib.suppress(ValueError, TypeError):
        data = json.loads(body) if body else {}
        reason, message = data.get("reason", reason), data.get("message", message)
    return ApiError(status, str(reason), str(message))


class KubeClient:
    """Raw-JSON calls of the official client; the async methods run them in a thread."""

    def __init__(self, api_client: Any, *, timeout_seconds: float = 30.0) -> None:
        self.api_client = api_client
        self.timeout_seconds = timeout_seconds
        self._plurals: dict[tuple[str, str, str], Resource] = {}

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
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api_client.call_api(
                path,
                method,
                query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=self.timeout_seconds,
            )
        except ApiException as exc:
            raise _api_error(exc) from None
        except Exception as exc:  # connection refused, timeouts: no response at all
            raise ApiError(0, "Unavailable", str(exc)) from exc
        data = response.data
        return json.loads(data) if data else {}

    async def call(self, method: str, path: str, **kwargs: Any) -> Obj:
        return await asyncio.to_thread(self.request, method, path, **kwargs)

    def list_call(self, resource: Resource, namespace: str | None, label_selector: str | None) -> ListCall:
        """A list function for ``ListWatch``, taking the official client's list/watch keyword arguments."""

        def call(**kwargs: Any) -> Any:
            query = {
                "labelSelector": label_selector,
                "watch": "true" if kwargs.get("watch") else None,
                "resourceVersion": kwargs.get("resource_version"),
                "allowWatchBookmarks": "true" if kwargs.get("allow_watch_bookmarks") else None,
                "timeoutSeconds": kwargs.get("timeout_seconds"),
            }
            return self.api_client.call_api(
                resource.path(namespace),
                "GET",
                query_params=[(k, v) for k, v in query.items() if v is not None],
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=kwargs.get("_request_timeout"),
            )

        return call

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


# -- selectors, pods, conditions, time -----------------------------------------------------------------------


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """Whether ``labels`` match a ``metav1.LabelSelector`` (``{}`` matches all, None matches nothing)."""
    if selector is None:
        return False
    labels = labels or {}
    if any(labels.get(k) != str(v) for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and (not present or labels[key] not in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False
    return True


def selector_string(selector: Mapping[str, Any]) -> str:
    """A ``metav1.LabelSelector`` in the query-string form the API accepts."""
    terms = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], ",".join(expr.get("values") or [])
        terms.append(
            {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key}.get(
                op, f"!{key}"
            )
        )
    return ",".join(terms)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Running, Ready, not terminating, with an IP: a pod that can serve."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return (
        bool(status.get("podIP"))
        and status.get("phase") == "Running"
        and not meta.get("deletionTimestamp")
        and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
    )


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(at: float | None = None) -> str:
    """A ``metav1.MicroTime``: RFC 3339 with microseconds."""
    when = datetime.fromtimestamp(at, UTC) if at is not None else datetime.now(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch of an RFC 3339 time (with or without fractions); None if absent or bad."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def set_condition(
    conditions: Iterable[Obj],
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    *,
    observed_generation: int | None = None,
) -> list[Obj]:
    """``conditions`` with ``type_`` set; ``lastTransitionTime`` moves only when the status changes."""
    value = "True" if status else "False"
    result, found = [], False
    for cond in conditions:
        if cond.get("type") != type_:
            result.append(cond)
            continue
        found = True
        changed = cond.get("status") != value
        new = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_rfc3339() if changed else cond.get("lastTransitionTime", now_rfc3339()),
        }
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        result.append(new)
    if not found:
        new = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_rfc3339(),
        }
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        result.append(new)
    return result


def condition(obj: Mapping[str, Any], type_: str) -> Obj | None:
    """The condition of ``type_`` in an object's ``status.conditions``."""
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None
    )


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (just ``name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name', '')}" if namespace else meta.get("name", "")


def split_key(key: str) -> tuple[str | None, str]:
    namespace, _, name = key.rpartition("/")
    return (namespace or None), name


def owner_reference(owner: Mapping[str, Any], resource: Resource, *, controller: bool = True) -> Obj:
    """An ownerReference to ``owner``: the garbage collector deletes the child with it. Without
    ``blockOwnerDeletion`` (which would need ``update`` on the owner's ``finalizers`` subresource where
    OwnerReferencesPermissionEnforcement is on): a foreground deletion of the owner does not wait."""
    meta = owner["metadata"]
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
    }


@dataclass(frozen=True)
class Written:
    """A status write that happened: the object as written, and the resourceVersion it replaced."""

    obj: Obj
    replaced_version: str


async def write_status(client: KubeClient, resource: Resource, obj: Obj, status: Obj) -> Written | None:
    """Write ``status`` through the status subresource unless the object already has it (None then).

    A 409 is answered by re-reading the object and trying again on the fresh resourceVersion (the
    status is ours to compute), unless its spec changed meanwhile: then the 409 is raised and the
    reconcile re-runs on the new spec."""
    for _ in range(3):
        if obj.get("status") == status:
            return None
        try:
            written = await client.replace(resource, {**obj, "status": status}, subresource="status")
            return Written(written, obj["metadata"].get("resourceVersion", ""))
        except ApiError as exc:
            if not exc.conflict:
                raise
            meta = obj["metadata"]
            fresh = await client.get(resource, meta.get("namespace"), meta["name"])
            if fresh is None:
                return None
            if fresh["metadata"].get("generation") != meta.get("generation"):
                raise
            obj = fresh
    raise ApiError(409, "Conflict", f"the status of {object_key(obj)} kept changing")


# -- informer --------------------------------------------------------------------------------------------

Handler = Callable[[Obj | None, Obj | None], None]


class Informer:
    """The cache of one resource (optionally one namespace, one label selector), kept by list/watch.

    Handlers run on the loop with ``(old, new)``: ``(None, obj)`` added, ``(obj, obj2)`` changed,
    ``(obj, None)`` deleted (or no longer selected). A re-list reports the differences it finds.
    """

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        watch_timeout_seconds: int = 300,
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self.cache: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.absent = False
        self._handlers: list[Handler] = []
        self._watch = ListWatch(
            resource.plural,
            lambda: client.list_call(resource, namespace, label_selector),
            on_list=self._listed,
            on_event=self._event,
            on_absent=self._absent,
            watch_timeout_seconds=watch_timeout_seconds,
        )

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def get(self, key: str) -> Obj | None:
        return self.cache.get(key)

    def list(self, namespace: str | None = None) -> list[Obj]:
        if namespace is None:
            return list(self.cache.values())
        return [
            obj for obj in self.cache.values() if (obj.get("metadata") or {}).get("namespace") == namespace
        ]

    async def run(self) -> None:
        await self._watch.run()

    def _typed(self, obj: Obj) -> Obj:
        """List items of built-in kinds come without apiVersion/kind; every cached object has them."""
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        return obj

    def _listed(self, items: list[Obj]) -> None:
        old, new = self.cache, {object_key(item): self._typed(item) for item in items}
        self.cache = new
        self.absent = False
        for key in old.keys() - new.keys():
            self._notify(old[key], None)
        for key, obj in new.items():
            before = old.get(key)
            if before is None or before["metadata"].get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self._notify(before, obj)
        self.synced.set()

    def _event(self, kind: str, obj: Obj) -> None:
        key = object_key(obj)
        self._typed(obj)
        if kind == "DELETED":
            before = self.cache.pop(key, None)
            self._notify(before or obj, None)
        else:
            before = self.cache.get(key)
            self.cache[key] = obj
            self._notify(before, obj)

    def _absent(self) -> None:
        self.absent = True
        log.warning(
            "%s (%s) is not served by the API server (CRD not installed?); will look again",
            self.resource.plural,
            self.resource.api_version,
        )
        self.synced.set()  # an empty cache is the truth until it appears

    def _notify(self, old: Obj | None, new: Obj | None) -> None:
        for handler in self._handlers:
            try:
                handler(old, new)
            except Exception:
                log.exception("%s informer handler failed", self.resource.plural)


# -- work queue --------------------------------------------------------------------------------------------


class WorkQueue:
    """client-go's rate-limited work queue, on the event loop (see the module docstring)."""

    def __init__(self, *, backoff_base: float = 0.005, backoff_max: float = 60.0) -> None:
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._queue: collections.deque[str] = collections.deque()
        self._dirty: set[str] = set()  # wanted: queued, or to be queued when its reconcile ends
        self._processing: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[str, int] = {}
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: str) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._ready.set()

    def add_after(self, key: str, delay: float) -> None:
        """Add ``key`` after ``delay`` seconds; an earlier pending add of the same key wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def add_rate_limited(self, key: str) -> None:
        """Add after this key's backoff: ``backoff_base x 2^failures``, capped at ``backoff_max``."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        self.add_after(key, min(self.backoff_base * 2**failures, self.backoff_max))

    def forget(self, key: str) -> None:
        """Reset the key's backoff (it reconciled fine)."""
        self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        return self._failures.get(key, 0)

    async def get(self) -> str:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._ready.set()

    def shutdown(self) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)


# -- controller --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for: nothing (wait for a change or the resync), a visit after
    ``requeue_after`` seconds, or (``requeue``) another try with the key's backoff."""

    requeue_after: float | None = None
    requeue: bool = False


Reconcile = Callable[[str], Awaitable[Result]]
KeyMapper = Callable[[Obj], Iterable[str]]
Predicate = Callable[[Obj | None, Obj | None], bool]


def own_key(obj: Obj) -> Iterable[str]:
    return (object_key(obj),)


def generation_changed(old: Obj | None, new: Obj | None) -> bool:
    """controller-runtime's GenerationChangedPredicate, plus deletion marks: a controller's own writes
    (status, finalizers, annotations) do not wake it again; creation, spec changes and deletion do. The
    resync catches anything else."""
    if old is None or new is None:
        return True
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    return any(old_meta.get(k) != new_meta.get(k) for k in ("generation", "deletionTimestamp"))


@dataclass
class ControllerStats:
    reconciles: int = 0
    errors: int = 0
    conflicts: int = 0


class Controller:
    """Reconciles the keys its watches produce on ``workers`` tasks; resyncs every ``resync_seconds``."""

    def __init__(
        self,
        name: str,
        reconcile: Reconcile,
        primary: Informer,
        *,
        primary_keys: KeyMapper = own_key,
        primary_predicate: Predicate | None = None,
        workers: int = 2,
        resync_seconds: float = 10.0,
        backoff_base: float = 0.005,
        backoff_max: float = 60.0,
    ) -> None:
        self.name = name
        self.reconcile = reconcile
        self.primary = primary
        self.primary_keys = primary_keys
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.queue = WorkQueue(backoff_base=backoff_base, backoff_max=backoff_max)
        self.stats = ControllerStats()
        self.watch(primary, primary_keys, primary_predicate)

    def watch(
        self, informer: Informer, to_keys: KeyMapper = own_key, predicate: Predicate | None = None
    ) -> None:
        """Enqueue the keys ``to_keys`` maps each change to (of the old and of the new object)."""

        def handler(old: Obj | None, new: Obj | None) -> None:
            if predicate is not None and not predicate(old, new):
                return
            keys: set[str] = set()
            for obj in (old, new):
                if obj is not None:
                    keys.update(to_keys(obj))
            for key in keys:
                self.queue.add(key)

        informer.add_handler(handler)

    def enqueue_all(self) -> None:
        for obj in list(self.primary.cache.values()):
            for key in self.primary_keys(obj):
                self.queue.add(key)

    async def run(self) -> None:
        """Run the workers and the resync until cancelled (informers must be running and synced)."""
        tasks = [
            asyncio.create_task(self._worker(), name=f"{self.name}-worker-{i}") for i in range(self.workers)
        ]
        try:
            while True:
                self.enqueue_all()
                await asyncio.sleep(self.resync_seconds)
        finally:
            self.queue.shutdown()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                self.stats.reconciles += 1
                result = await self.reconcile(key)
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.conflict:
                    self.stats.conflicts += 1
                    log.info("%s %s: conflict, re-queued: %s", self.name, key, exc.message)
                else:
                    self.stats.errors += 1
                    log.warning("%s %s: API error, re-queued with backoff: %s", self.name, key, exc)
                self.queue.add_rate_limited(key)
            except Exception:
                self.stats.errors += 1
                log.exception("%s %s: reconcile failed, re-queued with backoff", self.name, key)
                self.queue.add_rate_limited(key)
            else:
                self.queue.forget(key)
                if result.requeue:
                    self.queue.add_rate_limited(key)
                elif result.requeue_after is not None:
                    self.queue.add_after(key, result.requeue_after)
            finally:
                self.queue.done(key)


# -- events ------------------------------------------------------------------------------------------------


class EventRecorder:
    """Writes ``core/v1`` Events about objects; a failure to record is logged, never raised."""

    def __init__(self, client: KubeClient, component: str, instance: str | None = None) -> None:
        self.client = client
        self.component = component
        self.instance = instance or socket.gethostname()

    async def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.client.create(EVENTS, namespace, event)
        except ApiError as exc:
            log.warning("cannot record event %s on %s: %s", reason, object_key(obj), exc)

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.event(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self.event(obj, "Warning", reason, message)


# -- manager -----------------------------------------------------------------------------------------------


class Manager:
    """Shared informers and the controllers that use them: start informers, wait until they have
    listed, then run the controllers."""

    def __init__(
        self, client: KubeClient, *, namespace: str | None = None, watch_timeout_seconds: int = 300
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.watch_timeout_seconds = watch_timeout_seconds
        self._informers: dict[tuple[Resource, str | None], Informer] = {}
        self.controllers: list[Controller] = []
        self.ready = asyncio.Event()

    def informer(self, resource: Resource, label_selector: str | None = None) -> Informer:
        """The one informer of ``resource`` (with this selector) in the manager's namespace."""
        key = (resource, label_selector)
        if key not in self._informers:
            self._informers[key] = Informer(
                self.client,
                resource,
                namespace=self.namespace if resource.namespaced else None,
                label_selector=label_selector,
                watch_timeout_seconds=self.watch_timeout_seconds,
            )
        return self._informers[key]

    def add(self, controller: Controller) -> None:
        self.controllers.append(controller)

    async def run(self, *, sync_timeout: float | None = None) -> None:
        informers = list(self._informers.values())
        tasks = [asyncio.create_task(i.run(), name=f"informer-{i.resource.plural}") for i in informers]
        try:
            async with asyncio.timeout(sync_timeout):
                await asyncio.gather(*(i.synced.wait() for i in informers))
            tasks += [asyncio.create_task(c.run(), name=f"controller-{c.name}") for c in self.controllers]
            self.ready.set()
            log.info("controllers running", extra={"controllers": [c.name for c in self.controllers]})
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
