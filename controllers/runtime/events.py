"""``EventRecorder``: ``core/v1`` Events about the objects the controllers act on.

Events tell a human what a controller did and why (``kubectl describe``); they are not state, so a failure
to record one is logged and never fails a reconcile.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any

from brickyard_core.kube.client import EVENTS, ApiError, KubeClient
from brickyard_core.kube.objects import now_rfc3339, object_key

log = logging.getLogger(__name__)


class EventRecorder:
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
