"""Raw Kubernetes objects (decoded JSON), read the same way by the gateway and the controllers.

Keys, label selectors, what makes a pod able to serve, owner references and the API's time formats: each
defined once, so that the gateway never routes to a pod the controllers would not place an adapter on.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from brickyard_core.kube.client import Obj, Resource


def object_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` (just ``name`` for cluster-scoped objects): how caches and work queues key it."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name', '')}" if namespace else meta.get("name", "")


def split_key(key: str) -> tuple[str | None, str]:
    """(namespace or None, name) of an ``object_key``."""
    namespace, _, name = key.rpartition("/")
    return (namespace or None), name


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


def now_rfc3339() -> str:
    """A ``metav1.Time`` of now: RFC 3339 in seconds."""
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
