"""Status conditions, and status writes that converge under concurrent writers.

The status is the controllers' record of the world (computed from it, never from the last status), so a
write that meets a 409 is answered by re-reading the object and writing again, unless the spec changed
meanwhile: then the reconcile runs again on the new spec.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from brickyard_core.kube.client import ApiError, KubeClient, Obj, Resource
from brickyard_core.kube.objects import now_rfc3339, object_key


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

    def updated(before: Obj | None) -> Obj:
        new = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": (
                before.get("lastTransitionTime", now_rfc3339())
                if before is not None and before.get("status") == value
                else now_rfc3339()
            ),
        }
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        return new

    result = [updated(c) if c.get("type") == type_ else c for c in conditions]
    if not any(c.get("type") == type_ for c in result):
        result.append(updated(None))
    return result


def find_condition(conditions: Iterable[Any] | None, type_: str) -> Obj | None:
    """The condition of ``type_`` in a ``status.conditions`` list (None when absent)."""
    return next((c for c in conditions or [] if isinstance(c, dict) and c.get("type") == type_), None)


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
