"""Model routes: one Gateway API ``HTTPRoute`` per model served by labelled Deployments.

For each model named by the ``model.aibrix.ai/name`` label of Deployments in a namespace, the controller
keeps an ``HTTPRoute`` ``<model>-router`` (gateway.networking.k8s.io/v1) attached to the configured
Envoy Gateway ``Gateway``: requests with header ``model: <model>`` go to the model's Services (each
Deployment's ``model.aibrix.ai/service`` label, else the Deployment's name) on the port of its
``model.aibrix.ai/port`` label (default 8000). The route is owned by those Deployments (garbage
collected with the last one) and labelled as ours; it is deleted as soon as no Deployment carries the
label any more. A route of that name that is not ours is left alone (a Warning event says so).

The reconcile key is ``<namespace>/<model>``, not a Deployment: several Deployments (one per GPU type,
say) may serve one model, and they share its route.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from brickyard_core.kube.client import DEPLOYMENTS, HTTP_ROUTES, KubeClient, Obj
from brickyard_core.kube.objects import owner_reference, split_key
from controllers.config import ControllerSettings
from controllers.runtime.controller import Controller, Result
from controllers.runtime.events import EventRecorder
from controllers.runtime.manager import Manager

log = logging.getLogger(__name__)

MODEL_LABEL = "model.aibrix.ai/name"
PORT_LABEL = "model.aibrix.ai/port"
SERVICE_LABEL = "model.aibrix.ai/service"
DEFAULT_PORT = 8000
MANAGED_BY = {"app.kubernetes.io/managed-by": "brickyard-controllers"}
ROUTE_SUFFIX = "-router"


def route_name(model: str) -> str:
    """``<model>-router`` as a DNS subdomain: lowercase, anything else replaced by ``-``."""
    name = re.sub(r"[^a-z0-9.-]+", "-", model.lower()).strip("-.") or "model"
    return f"{name[: 253 - len(ROUTE_SUFFIX)]}{ROUTE_SUFFIX}"


class ModelRouteController:
    def __init__(self, manager: Manager, settings: ControllerSettings, recorder: EventRecorder) -> None:
        self.client: KubeClient = manager.client
        self.settings = settings.model_routes
        self.recorder = recorder
        self._conflicts: set[str] = set()
        self.deployments = manager.informer(DEPLOYMENTS, MODEL_LABEL)
        self.routes = manager.informer(HTTP_ROUTES, ",".join(f"{k}={v}" for k, v in MANAGED_BY.items()))
        self.controller = Controller(
            "model-routes",
            self.reconcile,
            self.deployments,
            primary_keys=self._model_key,
            primary_predicate=self._deployment_changed,
            workers=settings.workers,
            resync_seconds=settings.resync_seconds,
            backoff_base=settings.backoff_base_seconds,
            backoff_max=settings.backoff_max_seconds,
        )
        self.controller.watch(self.routes, self._route_key)  # drift and orphans
        manager.add(self.controller)

    @staticmethod
    def _model_key(deployment: Obj) -> Iterable[str]:
        meta = deployment["metadata"]
        model = (meta.get("labels") or {}).get(MODEL_LABEL)
        return (f"{meta['namespace']}/{model}",) if model else ()

    @staticmethod
    def _route_key(route: Obj) -> Iterable[str]:
        meta = route["metadata"]
        model = (meta.get("labels") or {}).get(MODEL_LABEL)
        return (f"{meta['namespace']}/{model}",) if model else ()

    @staticmethod
    def _deployment_changed(old: Obj | None, new: Obj | None) -> bool:
        """Only what the route is made of: labels, uid (a re-created Deployment), deletion."""
        if old is None or new is None:
            return True
        keys = ("labels", "uid", "deletionTimestamp")
        return any(old["metadata"].get(k) != new["metadata"].get(k) for k in keys)

    async def reconcile(self, key: str) -> Result:
        namespace, model = split_key(key)
        assert namespace is not None
        name = route_name(model)
        servers = sorted(
            (
                d
                for d in self.deployments.list(namespace)
                if (d["metadata"].get("labels") or {}).get(MODEL_LABEL) == model
                and not d["metadata"].get("deletionTimestamp")
            ),
            key=lambda d: d["metadata"]["name"],
        )
        have = self.routes.get(f"{namespace}/{name}") or await self.client.get(HTTP_ROUTES, namespace, name)
        if (
            have is not None
            and (have["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by")
            != (MANAGED_BY["app.kubernetes.io/managed-by"])
        ):
            conflict = f"{namespace}/{name}/{have['metadata'].get('uid')}"
            if servers and conflict not in self._conflicts:  # once per foreign route, not per resync
                self._conflicts.add(conflict)
                await self.recorder.warning(
                    servers[0], "RouteConflict", f"HTTPRoute {name} exists and is not managed by brickyard"
                )
            return Result()
        if not servers:
            if have is not None:
                await self.client.delete(HTTP_ROUTES, namespace, name)
                log.info("route deleted", extra={"route": f"{namespace}/{name}", "model": model})
            return Result()
        want = self._route(namespace, name, model, servers)
        if have is None:
            await self.client.create(HTTP_ROUTES, namespace, want)
            await self.recorder.normal(servers[0], "RouteCreated", f"HTTPRoute {name} routes model {model}")
        elif have.get("spec") != want["spec"] or any(
            have["metadata"].get(k) != want["metadata"][k] for k in ("labels", "ownerReferences")
        ):
            updated = {**have, "spec": want["spec"]}
            updated["metadata"] = {
                **have["metadata"],
                "labels": want["metadata"]["labels"],
                "ownerReferences": want["metadata"]["ownerReferences"],
            }
            await self.client.replace(HTTP_ROUTES, updated)
            await self.recorder.normal(servers[0], "RouteUpdated", f"HTTPRoute {name} routes model {model}")
        return Result()

    def _route(self, namespace: str, name: str, model: str, servers: list[Obj]) -> Obj:
        parent: dict[str, Any] = {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": self.settings.gateway_name,
        }
        if self.settings.gateway_namespace:
            parent["namespace"] = self.settings.gateway_namespace
        backends = []
        for deployment in servers:
            labels = deployment["metadata"].get("labels") or {}
            port = labels.get(PORT_LABEL, "")
            backends.append(
                {
                    "group": "",
                    "kind": "Service",
                    "name": labels.get(SERVICE_LABEL) or deployment["metadata"]["name"],
                    "port": int(port) if port.isdigit() else DEFAULT_PORT,
                    "weight": 1,
                }
            )
        backends = [
            b for i, b in enumerate(backends) if b not in backends[:i]
        ]  # Deployments sharing a Service
        rule: dict[str, Any] = {
            "matches": [
                {
                    "path": {"type": "PathPrefix", "value": "/"},
                    "headers": [{"type": "Exact", "name": "model", "value": model}],
                }
            ],
            "backendRefs": backends,
        }
        if self.settings.request_timeout:
            rule["timeouts"] = {"request": self.settings.request_timeout}
        return {
            "apiVersion": HTTP_ROUTES.api_version,
            "kind": HTTP_ROUTES.kind,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {**MANAGED_BY, MODEL_LABEL: model},  # a label value already
                "ownerReferences": [owner_reference(d, DEPLOYMENTS, controller=False) for d in servers],
            },
            "spec": {"parentRefs": [parent], "rules": [rule]},
        }
