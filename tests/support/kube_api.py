"""In-process stand-in for the Kubernetes API server, for tests.

Point the official ``kubernetes`` client at it::

    with KubeApiServer() as server:
        api = kubernetes.client.CoreV1Api(server.api_client())
        api.create_namespaced_pod("default", {...})
        server.patch_status("v1", "Pod", "default", "p", {"phase": "Running"})

It serves the real URL shapes, Status error bodies, resourceVersion/generation bookkeeping,
optimistic concurrency, status and scale subresources, finalizer-aware deletion, the three
patch flavours, custom resources admitted through their CRD's structural schema (pruning,
defaulting, validation, CEL rules: tests/support/crd_schema.py) and streaming watches (history
replay, bookmarks, selector-driven ADDED/DELETED transitions, 410 Gone after ``compact()``, for
new watches and for open ones that still owe events from before it), because those are what
controllers and watchers depend on. Nothing here runs controllers: no garbage collector, no
deployment/replicaset controller, no kubelet, no namespace controller.

Sections: 1. errors; 2. resource types; 3. selectors; 4. patching; 5. store (objects,
history, watchers); 6. HTTP; 7. ``KubeApiServer`` (thread and loop lifecycle, Python API).

Deliberate simplifications (see the section comments for the details):
  * lists and continue tokens always read the current state (no snapshot at an old revision);
  * server-side apply (``application/apply-patch+yaml``) and ``dryRun`` are not supported;
  * strategic merge patch knows the merge keys of the common list fields only;
  * built-in kinds are validated for what clients need to deserialize them, not their full schemas;
  * deleting a namespace deletes its contents at once instead of going through Terminating;
  * DELETE ignores gracePeriodSeconds and propagationPolicy: pods go at once (no kubelet) and
    ownerReferences are not followed (no garbage collector).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import contextlib
import copy
import json
import logging
import random
import re
import string
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.support.crd_schema import SchemaError, StructuralSchema

__all__ = [
    "FieldSelector",
    "KubeApiError",
    "KubeApiServer",
    "LabelSelector",
    "RecordedRequest",
    "ResourceType",
    "ScaleSpec",
    "Store",
    "apply_json_patch",
    "json_merge_patch",
    "strategic_merge_patch",
]

Obj = dict[str, Any]
_log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# 1. Errors: every failure is a `Status` body with the reason/code the real server would use.
# ---------------------------------------------------------------------------------------------


class KubeApiError(Exception):
    """An API failure; ``status()`` is the ``Status`` object sent as the response body."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


_MODIFIED = "the object has been modified; please apply your changes to the latest version and try again"


def _bad_request(message: str) -> KubeApiError:
    return KubeApiError(400, "BadRequest", message)


def _route_not_found() -> KubeApiError:
    return KubeApiError(404, "NotFound", "the server could not find the requested resource", {})


# ---------------------------------------------------------------------------------------------
# 2. Resource types: built-ins and custom resources registered from CRD manifests.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleSpec:
    """Where the ``scale`` subresource reads and writes (JSON paths like ``.spec.replicas``)."""

    spec_replicas_path: str = ".spec.replicas"
    status_replicas_path: str = ".status.replicas"
    # A string selector, or (for deployments) a LabelSelector object that is rendered to one.
    label_selector_path: str | None = None


@dataclass(frozen=True, eq=False)
class ResourceType:
    """One REST resource: how it is addressed and which server-side rules apply to it."""

    group: str
    versions: tuple[str, ...]  # served versions, preferred first
    storage_version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    scale: ScaleSpec | None = None
    custom: bool = False  # a custom resource: CRD rules for patching, generation, lists
    returns_deleted_object: bool = False  # DELETE answers with the object instead of a Status
    allow_unconditional_update: bool = True  # PUT without metadata.resourceVersion allowed
    # Field selector labels beyond metadata.name/namespace, mapped to the JSON path they read.
    field_labels: Mapping[str, str] = field(default_factory=dict)
    schema: StructuralSchema | None = None  # a custom resource's, from its CRD's storage version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def qualified(self) -> str:
        """``pods`` or ``deployments.apps``: how the real server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str | None = None) -> str:
        version = version or self.storage_version
        return f"{self.group}/{version}" if self.group else version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    def not_found(self, name: str) -> KubeApiError:
        return KubeApiError(
            404,
            "NotFound",
            f'{self.qualified} "{name}" not found',
            {"name": name, "group": self.group, "kind": self.plural},
        )

    def conflict(self, name: str, why: str) -> KubeApiError:
        return KubeApiError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {self.qualified} "{name}": {why}',
            {"name": name, "group": self.group, "kind": self.plural},
        )

    def invalid(self, name: str, causes: list[tuple[str, str]]) -> KubeApiError:
        text = ", ".join(f"{path}: {msg}" for path, msg in causes)
        text = f"[{text}]" if len(causes) > 1 else text  # an aggregate, as Go prints it
        return KubeApiError(
            422,
            "Invalid",
            f'{self.kind}.{self.group} "{name}" is invalid: {text}'
            if self.group
            else f'{self.kind} "{name}" is invalid: {text}',
            {
                "name": name,
                "group": self.group,
                "kind": self.kind,
                "causes": [{"field": path, "message": msg} for path, msg in causes],
            },
        )


_POD_FIELDS = {
    label: label
    for label in (
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    )
}
_EVENT_FIELDS = {
    **{
        f"involvedObject.{f}": f"involvedObject.{f}"
        for f in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
    },
    "reason": "reason",
    "reportingComponent": "reportingComponent",
    "source": "source.component",
    "type": "type",
}


def _builtin(group_version: str, plural: str, kind: str, **options: Any) -> ResourceType:
    group, _, version = group_version.rpartition("/")
    return ResourceType(group, (version,), version, plural, kind, singular=kind.lower(), **options)


NAMESPACES = _builtin(
    "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",), status_subresource=True,
    field_labels={"status.phase": "status.phase"},
)  # fmt: skip
CRDS = _builtin(
    "apiextensions.k8s.io/v1", "customresourcedefinitions", "CustomResourceDefinition", namespaced=False,
    short_names=("crd", "crds"), status_subresource=True, allow_unconditional_update=False,
)  # fmt: skip
BUILTIN_TYPES: tuple[ResourceType, ...] = (
    NAMESPACES,
    _builtin("v1", "pods", "Pod", short_names=("po",), status_subresource=True, returns_deleted_object=True,
             field_labels=_POD_FIELDS),
    _builtin("v1", "services", "Service", short_names=("svc",), status_subresource=True,
             returns_deleted_object=True),
    _builtin("v1", "events", "Event", short_names=("ev",), field_labels=_EVENT_FIELDS),
    _builtin("v1", "configmaps", "ConfigMap", short_names=("cm",)),
    _builtin("v1", "secrets", "Secret", field_labels={"type": "type"}),
    _builtin("apps/v1", "deployments", "Deployment", short_names=("deploy",), status_subresource=True,
             scale=ScaleSpec(label_selector_path=".spec.selector")),
    _builtin("autoscaling/v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short_names=("hpa",),
             status_subresource=True),
    _builtin("discovery.k8s.io/v1", "endpointslices", "EndpointSlice"),
    CRDS,
)  # fmt: skip


def resource_type_from_crd(crd: Obj) -> ResourceType:
    """The resource a CRD manifest declares. Subresources, selectable fields and the schema are read
    from the storage version (the real server allows them to differ per version; we do not)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    versions = spec.get("versions") or []
    index, storage = next(((i, v) for i, v in enumerate(versions) if v.get("storage")), (0, versions[0]))
    subresources = storage.get("subresources") or {}
    scale = subresources.get("scale")
    schema = (storage.get("schema") or {}).get("openAPIV3Schema")
    try:
        structural = StructuralSchema(schema) if schema is not None else None
    except SchemaError as err:
        at = f"spec.versions[{index}].schema.openAPIV3Schema"
        raise CRDS.invalid(
            crd["metadata"]["name"], [(f"{at}.{e.field}", e.body) for e in err.errors]
        ) from None
    return ResourceType(
        group=spec["group"],
        versions=tuple(v["name"] for v in versions if v.get("served", True)),
        storage_version=storage["name"],
        plural=names["plural"],
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        singular=names.get("singular") or names["kind"].lower(),
        short_names=tuple(names.get("shortNames") or ()),
        status_subresource="status" in subresources,
        scale=ScaleSpec(
            spec_replicas_path=scale.get("specReplicasPath", ".spec.replicas"),
            status_replicas_path=scale.get("statusReplicasPath", ".status.replicas"),
            label_selector_path=scale.get("labelSelectorPath"),
        )
        if scale is not None
        else None,
        custom=True,
        allow_unconditional_update=False,
        field_labels={
            f["jsonPath"].lstrip("."): f["jsonPath"].lstrip(".")
            for f in storage.get("selectableFields") or ()
            if f.get("jsonPath")
        },
        schema=structural,
    )


def _get_path(obj: Any, path: str) -> Any:
    """Value at a dotted path (``.spec.replicas`` or ``spec.replicas``), None when absent."""
    for part in path.lstrip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _set_path(obj: Obj, path: str, value: Any) -> None:
    parts = path.lstrip(".").split(".")
    for part in parts[:-1]:
        nxt = obj.get(part)
        if not isinstance(nxt, dict):
            nxt = obj[part] = {}
        obj = nxt
    obj[parts[-1]] = value


# ---- defaults: only those the real server fills in and that clients commonly read ----


def _default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if not isinstance(container, dict):
            continue
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        image = str(container.get("image", ""))
        last = image.rsplit("/", 1)[-1]
        latest = "@" not in image and (":" not in last or last.endswith(":latest"))
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        for port in container.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")


def _default_deployment(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
    if strategy.get("type", "RollingUpdate") == "RollingUpdate":
        strategy.setdefault("type", "RollingUpdate")
        strategy.setdefault("rollingUpdate", {"maxSurge": "25%", "maxUnavailable": "25%"})
    template_spec = _get_path(spec, "template.spec")
    if isinstance(template_spec, dict):
        _default_pod_spec(template_spec)


# ---- validation: required fields (so typed clients can deserialize) and name syntax ----

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _validation_errors(rt: ResourceType, obj: Obj) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    name = obj["metadata"].get("name", "")
    label_names = rt.key in {("", "namespaces"), ("", "services")}
    if label_names and (len(name) > 63 or not _DNS_LABEL.match(name)):
        errors.append(("metadata.name", f'Invalid value: "{name}": must be a DNS-1123 label'))
    elif not label_names and (len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
        errors.append(("metadata.name", f'Invalid value: "{name}": must be a DNS-1123 subdomain'))
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}

    def containers(prefix: str, pod_spec: Any) -> None:
        items = pod_spec.get("containers") if isinstance(pod_spec, dict) else None
        if not items:
            errors.append((f"{prefix}.containers", "Required value"))
            return
        for i, container in enumerate(items):
            for key in ("name", "image"):
                if not (isinstance(container, dict) and container.get(key)):
                    errors.append((f"{prefix}.containers[{i}].{key}", "Required value"))

    if rt.key == ("", "pods"):
        containers("spec", spec)
    elif rt.key == ("apps", "deployments"):
        selector = spec.get("selector")
        if not isinstance(selector, dict) or not (
            selector.get("matchLabels") or selector.get("matchExpressions")
        ):
            errors.append(("spec.selector", "Required value"))
        else:
            labels = _get_path(spec, "template.metadata.labels") or {}
            if not LabelSelector.from_object(selector).matches(labels):
                errors.append(("spec.template.metadata.labels", "Invalid value: `selector` does not match"))
        containers("spec.template.spec", _get_path(spec, "template.spec"))
    elif rt.key == ("autoscaling", "horizontalpodautoscalers"):
        ref = spec.get("scaleTargetRef")
        if not (isinstance(ref, dict) and ref.get("kind") and ref.get("name")):
            errors.append(("spec.scaleTargetRef", "Required value"))
        if not isinstance(spec.get("maxReplicas"), int) or spec["maxReplicas"] < 1:
            errors.append(("spec.maxReplicas", "Invalid value: must be greater than or equal to 1"))
    elif rt.key == ("discovery.k8s.io", "endpointslices"):
        if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
            errors.append(("addressType", 'Unsupported value: must be one of "IPv4", "IPv6", "FQDN"'))
    elif rt is CRDS:
        names = spec.get("names") or {}
        for key, value in (
            ("spec.group", spec.get("group")),
            ("spec.names.plural", names.get("plural")),
            ("spec.names.kind", names.get("kind")),
        ):
            if not value:
                errors.append((key, "Required value"))
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            errors.append(("spec.scope", 'Unsupported value: must be "Namespaced" or "Cluster"'))
        versions = spec.get("versions") or []
        if not versions or any(not v.get("name") for v in versions):
            errors.append(("spec.versions", "Required value"))
        elif sum(1 for v in versions if v.get("storage")) != 1:
            errors.append(("spec.versions", "Invalid value: must have exactly one version marked as storage"))
        if names.get("plural") and spec.get("group") and name != f"{names['plural']}.{spec['group']}":
            errors.append(("metadata.name", 'Invalid value: must be spec.names.plural+"."+spec.group'))
    return errors


# ---------------------------------------------------------------------------------------------
# 3. Selectors: label selectors (set-based grammar) and field selectors.
# ---------------------------------------------------------------------------------------------

_LABEL_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_TERM = re.compile(rf"^(?P<key>{_LABEL_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_CMP_TERM = re.compile(rf"^(?P<key>{_LABEL_KEY})\s*(?P<op>==|=|!=|>|<)\s*(?P<value>{_LABEL_VALUE})$")
_EXISTS_TERM = re.compile(rf"^(?P<neg>!?)\s*(?P<key>{_LABEL_KEY})$")


@dataclass(frozen=True)
class Requirement:
    """One label requirement; ``op`` is one of = != in notin exists !exists > <."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
            case ">" | "<":
                try:
                    have, want = int(str(value)), int(self.values[0])
                except ValueError:
                    return False
                return present and (have > want if self.op == ">" else have < want)
        raise AssertionError(self.op)


def _split_terms(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [t.strip() for t in terms if t.strip()]


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        reqs: list[Requirement] = []
        for term in _split_terms(text or ""):
            if m := _SET_TERM.match(term):
                values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
                if not values or not all(re.fullmatch(_LABEL_VALUE, v) for v in values):
                    raise _bad_request(f"unable to parse requirement: {term!r}: invalid value set")
                reqs.append(Requirement(m["key"], m["op"], values))
            elif m := _CMP_TERM.match(term):
                op = "=" if m["op"] == "==" else m["op"]
                if op in (">", "<") and not m["value"].lstrip("-").isdigit():
                    raise _bad_request(f"unable to parse requirement: {term!r}: value must be an integer")
                reqs.append(Requirement(m["key"], op, (m["value"],)))
            elif m := _EXISTS_TERM.match(term):
                reqs.append(Requirement(m["key"], "!exists" if m["neg"] else "exists"))
            else:
                raise _bad_request(f"unable to parse requirement: {term!r}")
        return cls(tuple(reqs))

    @classmethod
    def from_object(cls, selector: Mapping[str, Any]) -> LabelSelector:
        """From a ``metav1.LabelSelector`` (matchLabels + matchExpressions)."""
        reqs = [Requirement(k, "=", (str(v),)) for k, v in (selector.get("matchLabels") or {}).items()]
        ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}
        for expr in selector.get("matchExpressions") or []:
            reqs.append(Requirement(expr["key"], ops[expr["operator"]], tuple(expr.get("values") or ())))
        return cls(tuple(reqs))

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(req.matches(labels) for req in self.requirements)

    def __str__(self) -> str:
        parts = []
        for req in self.requirements:
            if req.op in ("in", "notin"):
                parts.append(f"{req.key} {req.op} ({','.join(sorted(req.values))})")
            elif req.op == "exists":
                parts.append(req.key)
            elif req.op == "!exists":
                parts.append(f"!{req.key}")
            else:
                parts.append(f"{req.key}{req.op}{req.values[0]}")
        return ",".join(parts)


@dataclass(frozen=True)
class FieldSelector:
    """``path=value``/``path==value``/``path!=value`` terms over the labels a resource supports."""

    terms: tuple[tuple[str, str, bool], ...] = ()  # (json path, value, equal?)

    @classmethod
    def parse(cls, text: str | None, rt: ResourceType) -> FieldSelector:
        supported = {"metadata.name": "metadata.name", "metadata.namespace": "metadata.namespace"}
        supported.update(rt.field_labels)
        terms = []
        for term in _split_terms(text or ""):
            m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", term)
            if not m:
                raise _bad_request(f"invalid selector: {term!r}; can't understand {term!r}")
            label, op, value = m.groups()
            if label not in supported:
                raise _bad_request(f'field label not supported: "{label}"')
            terms.append((supported[label], value, op != "!="))
        return cls(tuple(terms))

    def matches(self, obj: Obj) -> bool:
        for path, value, equal in self.terms:
            have = _get_path(obj, path)
            have = "" if have is None else str(have).lower() if isinstance(have, bool) else str(have)
            if (have == value) != equal:
                return False
        return True


@dataclass(frozen=True)
class _Filter:
    """What a list or watch selects: namespace (None = all), labels and fields."""

    namespace: str | None = None
    labels: LabelSelector = LabelSelector()
    fields: FieldSelector = FieldSelector()

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and self.labels.matches(meta.get("labels"))
            and self.fields.matches(obj)
        )


# ---------------------------------------------------------------------------------------------
# 4. Patching: JSON merge patch (RFC 7386), strategic merge patch, JSON patch (RFC 6902).
# ---------------------------------------------------------------------------------------------

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
_PATCH_ALIASES = {"merge": MERGE_PATCH, "strategic": STRATEGIC_MERGE_PATCH, "json": JSON_PATCH}


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# Lists merged by a key instead of replaced (patchStrategy=merge in the Kubernetes types).
# Keyed by field name alone, which is exact for the fields listed here.
_SMP_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "resourceClaims": "name",
}
_SMP_SET_LISTS = {"finalizers"}  # primitive lists with patchStrategy=merge: union


def _smp_list(name: str, current: list[Any], patch: list[Any]) -> list[Any]:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    if name in _SMP_SET_LISTS:
        return [*current, *(copy.deepcopy(v) for v in patch if v not in current)]
    key = _SMP_MERGE_KEYS.get(name)
    if name == "ports":  # container ports merge on containerPort, service ports on port
        key = "containerPort" if any(isinstance(i, dict) and "containerPort" in i for i in patch) else "port"
    if key is None:
        return copy.deepcopy(patch)
    result = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            result.append(copy.deepcopy(item))
            continue
        index = next(
            (i for i, c in enumerate(result) if isinstance(c, dict) and c.get(key) == item[key]), None
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Merge patch plus the Kubernetes list semantics: lists with a merge key merge element-wise,
    ``finalizers`` unions, and the ``$patch``/``$deleteFromPrimitiveList``/``$retainKeys``
    directives apply. ``$setElementOrder`` is accepted and ignored."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        current = result.get(key)
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(current, list):
            result[key] = _smp_list(key, current, value)
        elif isinstance(value, list):
            result[key] = _smp_list(key, [], value)
        else:
            result[key] = strategic_merge_patch(current, value)
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
    if isinstance(patch.get("$retainKeys"), list):
        result = {k: v for k, v in result.items() if k in patch["$retainKeys"]}
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise ValueError(f"path /{'/'.join(parts)} does not exist")
    return doc


def _json_patch_op(doc: Any, op: Obj) -> Any:
    kind = op.get("op")
    parts = _pointer(op.get("path", ""))
    if kind in ("move", "copy"):
        source = _pointer(op.get("from", ""))
        value = copy.deepcopy(_container(doc, source))
        if kind == "move":
            doc = _json_patch_op(doc, {"op": "remove", "path": op["from"]})
        return _json_patch_op(doc, {"op": "add", "path": op["path"], "value": value})
    if kind == "test":
        if _container(doc, parts) != op.get("value"):
            raise ValueError(f"testing value {op.get('path')} failed")
        return doc
    if kind not in ("add", "remove", "replace"):
        raise ValueError(f"unknown JSON patch operation {kind!r}")
    if not parts:  # the whole document
        if kind == "remove":
            raise ValueError("cannot remove the whole document")
        return copy.deepcopy(op["value"])
    parent, last = _container(doc, parts[:-1]), parts[-1]
    if isinstance(parent, dict):
        if kind != "add" and last not in parent:
            raise ValueError(f"unable to {kind} nonexistent key {last!r}")
        if kind == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])
    elif isinstance(parent, list):
        if last == "-" and kind == "add":
            parent.append(copy.deepcopy(op["value"]))
            return doc
        if not last.isdigit() or int(last) > len(parent) or (kind != "add" and int(last) == len(parent)):
            raise ValueError(f"index {last!r} out of range")
        index = int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "remove":
            del parent[index]
        else:
            parent[index] = copy.deepcopy(op["value"])
    else:
        raise ValueError(f"path {op.get('path')!r} does not point into an object or array")
    return doc


def apply_json_patch(doc: Any, ops: list[Obj]) -> Any:
    """RFC 6902 (add, remove, replace, move, copy, test); atomic: works on a copy."""
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or ("value" not in op and op.get("op") in ("add", "replace", "test")):
            raise ValueError(f"invalid JSON patch operation {op!r}")
        doc = _json_patch_op(doc, op)
    return doc


def _apply_patch(rt: ResourceType, name: str, doc: Obj, patch_type: str, patch: Any) -> Obj:
    patch_type = _PATCH_ALIASES.get(patch_type, patch_type).split(";")[0].strip()
    if patch_type == STRATEGIC_MERGE_PATCH and rt.custom:
        # The real server cannot do strategic merge on custom resources (no Go struct tags).
        raise KubeApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f"{JSON_PATCH}, {MERGE_PATCH}, {APPLY_PATCH}",
        )
    if patch_type == MERGE_PATCH:
        if not isinstance(patch, dict):
            raise _bad_request("merge patch body must be a JSON object")
        result = json_merge_patch(doc, patch)
    elif patch_type == STRATEGIC_MERGE_PATCH:
        if not isinstance(patch, dict):
            raise _bad_request("strategic merge patch body must be a JSON object")
        result = strategic_merge_patch(doc, patch)
    elif patch_type == JSON_PATCH:
        if not isinstance(patch, list):
            raise _bad_request("json patch body must be a JSON array")
        try:
            result = apply_json_patch(doc, patch)
        except ValueError as err:
            raise KubeApiError(422, "Invalid", str(err), {"name": name, "kind": rt.kind}) from None
    else:
        raise KubeApiError(
            415, "UnsupportedMediaType", f"patch type {patch_type!r} is not supported by the stand-in"
        )
    if not isinstance(result, dict):
        raise KubeApiError(422, "Invalid", "patched document is not an object", {"name": name})
    return result


# ---------------------------------------------------------------------------------------------
# 5. Store: objects, the global resourceVersion, the change history and watchers.
#
# One lock guards everything. Stored dicts are never mutated after commit (writes build a
# new dict), so history entries and list results can share them. Watchers live on the HTTP
# loop; writers (any thread) hand them changes with call_soon_threadsafe while holding the
# lock, which keeps every watcher's queue in resourceVersion order.
#
# Compaction works like etcd's: a watch that still owes its client events from before the
# compaction point (handed to it, not yet written) ends with 410 Expired and those events are
# lost, so the client must re-list; a watch that is caught up goes on. ``hold_watches()`` keeps
# changes from being written, as for a client that falls behind, so tests can make that happen.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Change:
    """One committed write, kept for watch replay. ``prev`` is the object before the write."""

    rv: int
    key: tuple[str, str]
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    prev: Obj | None


@dataclass(frozen=True)
class _BookmarkMark:
    rv: int


class _Watcher:
    """A watch stream's inbox: changes of one resource type, bookmark marks, None = close (with
    ``expired``'s Status when a compaction ended it).

    ``owed``: resourceVersions of the changes handed over and not yet written, history replay
    first; ``held``: what ``Store.hold_watches()`` keeps back. Both are guarded by the store lock.
    """

    def __init__(self, key: tuple[str, str], loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.queue: asyncio.Queue[_Change | _BookmarkMark | None] = asyncio.Queue()
        self.owed: collections.deque[int] = collections.deque()
        self.held: list[_Change | _BookmarkMark] = []
        self.expired: Obj | None = None

    def push(self, item: _Change | _BookmarkMark | None) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: the stream is gone anyway
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _as_dict(obj: Any) -> Obj:
    """A deep copy of a dict, or a kubernetes client model rendered to its JSON form."""
    if isinstance(obj, dict):
        return copy.deepcopy(obj)
    from kubernetes.client import ApiClient  # only needed for model objects

    data = ApiClient().sanitize_for_serialization(obj)
    if not isinstance(data, dict):
        raise TypeError(f"expected a dict or a kubernetes model, got {type(obj).__name__}")
    return data


def _rv_of(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


class Store:
    """The API semantics, independent of HTTP. ``privileged`` writes (the Python API used by
    tests) may set ``status`` through the main resource; HTTP writes follow the real rules."""

    def __init__(self, *, history_limit: int | None = None) -> None:
        self._lock = threading.RLock()
        self._rv = 0
        self._compacted_rv = 0
        self._history: list[_Change] = []
        self._history_limit = history_limit
        self._types: dict[tuple[str, str], ResourceType] = {}
        self._objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self._watchers: set[_Watcher] = set()
        self._holding = False
        self._next_cluster_ip = 1
        for rt in BUILTIN_TYPES:
            self._add_type(rt)
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(NAMESPACES, None, {"metadata": {"name": name}}, privileged=True)

    # ---- type registry ----

    def _add_type(self, rt: ResourceType) -> None:
        self._types[rt.key] = rt
        self._objects.setdefault(rt.key, {})

    def types(self) -> list[ResourceType]:
        with self._lock:
            return list(self._types.values())

    def resolve(self, group: str, version: str, plural: str) -> ResourceType:
        """The type served at /{group}/{version}/{plural}; 404 like the real router otherwise."""
        with self._lock:
            rt = self._types.get((group, plural))
        if rt is None or version not in rt.versions:
            raise _route_not_found()
        return rt

    def find_type(self, api_version: str, kind_or_plural: str) -> tuple[ResourceType, str]:
        """(type, version) for an apiVersion plus a kind, plural or singular name."""
        group, _, version = api_version.rpartition("/")
        lowered = kind_or_plural.lower()
        with self._lock:
            for rt in self._types.values():
                if rt.group == group and lowered in (rt.kind.lower(), rt.plural, rt.singular):
                    if version not in rt.versions:
                        break
                    return rt, version
        raise KeyError(f"no resource {kind_or_plural!r} in {api_version!r}")

    def group_versions(self) -> dict[str, list[str]]:
        """Served versions per group, preferred first ("" is the core group)."""
        result: dict[str, list[str]] = {}
        with self._lock:
            for rt in self._types.values():
                versions = result.setdefault(rt.group, [])
                versions.extend(v for v in rt.versions if v not in versions)
        return result

    # ---- reads ----

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._rv

    @property
    def compacted_rv(self) -> int:
        with self._lock:
            return self._compacted_rv

    def _get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._objects[rt.key].get((namespace or "", name))
        if obj is None:
            raise rt.not_found(name)
        return obj

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        with self._lock:
            return self._get(rt, namespace, name)

    def list(self, rt: ResourceType, flt: _Filter) -> tuple[list[Obj], int]:
        """Matching objects ordered by (namespace, name), and the store's resourceVersion."""
        with self._lock:
            items = [obj for key, obj in sorted(self._objects[rt.key].items()) if flt.matches(obj)]
            return items, self._rv

    # ---- writes ----

    def _commit(self, rt: ResourceType, kind: str, obj: Obj, prev: Obj | None) -> Obj:
        """Stamp the next resourceVersion, store (or drop) the object, record and fan out."""
        self._rv += 1
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if kind == "DELETED":
            obj = {**obj, "metadata": {**meta, "resourceVersion": str(self._rv)}}
            del self._objects[rt.key][key]
        else:
            meta["resourceVersion"] = str(self._rv)
            self._objects[rt.key][key] = obj
        change = _Change(self._rv, rt.key, kind, obj, prev)
        self._history.append(change)
        for watcher in self._watchers:
            if watcher.key == rt.key:
                watcher.owed.append(change.rv)
                self._hand(watcher, change)
        if self._history_limit is not None and len(self._history) > self._history_limit:
            dropped = self._history[: len(self._history) - self._history_limit]
            del self._history[: len(dropped)]
            self._compact_to(dropped[-1].rv)
        return obj

    def _hand(self, watcher: _Watcher, item: _Change | _BookmarkMark) -> None:
        """Queue ``item`` for the watch stream, or keep it back while watches are held."""
        if self._holding:
            watcher.held.append(item)
        else:
            watcher.push(item)

    def _check_type_meta(self, rt: ResourceType, obj: Obj) -> None:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if kind and kind != rt.kind:
            raise _bad_request(f"the kind of the object ({kind}) does not match the resource ({rt.kind})")
        if api_version and api_version not in {rt.api_version(v) for v in rt.versions}:
            raise _bad_request(f"the API version in the data ({api_version}) does not match the resource")

    def _defaults(self, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        """Server-side defaults; ``old`` is the stored object on updates."""
        meta = obj["metadata"]
        status = obj.get("status") if isinstance(obj.get("status"), dict) else None
        match rt.key:
            case ("", "pods"):
                _default_pod_spec(obj.setdefault("spec", {}))
                if status is None or "phase" not in status:
                    obj["status"] = {**(status or {}), "phase": "Pending"}
            case ("", "services"):
                self._default_service(obj, old)
            case ("", "namespaces"):
                meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
                obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
                if status is None or "phase" not in status:
                    obj["status"] = {**(status or {}), "phase": "Active"}
            case ("", "secrets"):
                obj.setdefault("type", "Opaque")
                string_data = obj.pop("stringData", None) or {}
                data = obj.setdefault("data", {}) if string_data else obj.get("data")
                for key, value in string_data.items():
                    data[key] = base64.b64encode(str(value).encode()).decode()
            case ("apps", "deployments"):
                _default_deployment(obj)
            case ("autoscaling", "horizontalpodautoscalers"):
                obj.setdefault("spec", {}).setdefault("minReplicas", 1)
                obj["status"] = {"desiredReplicas": 0, **(status or {})}  # not omitempty in Go
            case ("discovery.k8s.io", "endpointslices"):
                obj.setdefault("endpoints", [])
            case ("apiextensions.k8s.io", "customresourcedefinitions"):
                spec = obj.setdefault("spec", {})
                spec.setdefault("conversion", {"strategy": "None"})
                names = dict(spec.get("names") or {})
                if names.get("kind"):
                    names.setdefault("singular", names["kind"].lower())
                    names.setdefault("listKind", f"{names['kind']}List")
                storage = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
                old_status = (old or {}).get("status") or {}
                stored = list((status or {}).get("storedVersions") or old_status.get("storedVersions") or [])
                stored += [v for v in storage if v not in stored]
                obj["status"] = {
                    **(status or {}),
                    "acceptedNames": names,
                    "storedVersions": stored,
                    "conditions": [
                        {
                            "type": t,
                            "status": "True",
                            "reason": r,
                            "message": m,
                            "lastTransitionTime": meta.get("creationTimestamp") or _now(),
                        }
                        for t, r, m in (
                            ("NamesAccepted", "NoConflicts", "no conflicts found"),
                            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                        )
                    ],
                }

    def _default_service(self, obj: Obj, old: Obj | None) -> None:
        spec = obj.setdefault("spec", {})
        old_spec = (old or {}).get("spec") or {}
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])
        if spec["type"] != "ExternalName":
            if not spec.get("clusterIP") and old_spec.get("clusterIP"):
                spec["clusterIP"] = old_spec["clusterIP"]  # allocated values survive updates
            if not spec.get("clusterIP"):
                n = self._next_cluster_ip
                self._next_cluster_ip += 1
                spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        obj.setdefault("status", {"loadBalancer": {}})

    def _admit(self, rt: ResourceType, obj: Obj, old: Obj | None) -> ResourceType | None:
        """Raise 422 for invalid objects; for a CRD return the resource type it declares. A custom
        resource is first pruned and defaulted in place by its schema (``old``: the stored object)."""
        errors = _validation_errors(rt, obj)
        if rt.schema is not None:
            errors += [(e.field, e.body) for e in rt.schema.admit(obj, old).errors]
        if errors:
            raise rt.invalid(obj["metadata"].get("name", ""), errors)
        if rt is not CRDS:
            return None
        declared = resource_type_from_crd(obj)
        existing = self._types.get(declared.key)
        if existing is not None and (not existing.custom or existing.kind != declared.kind):
            raise rt.invalid(obj["metadata"]["name"], [("spec.names", "Invalid value: names conflict")])
        return declared

    def _generation_changes(self, rt: ResourceType, old: Obj, new: Obj) -> bool:
        """Whether an update bumps metadata.generation, per the real strategies."""
        if rt.custom:  # everything but metadata (and status, with the status subresource)
            ignored = {"metadata", "apiVersion", "kind"} | ({"status"} if rt.status_subresource else set())
            return {k: v for k, v in old.items() if k not in ignored} != {
                k: v for k, v in new.items() if k not in ignored
            }
        changed = old.get("spec") != new.get("spec")
        if rt.key == ("apps", "deployments"):  # annotations are copied to ReplicaSets
            changed = changed or old["metadata"].get("annotations") != new["metadata"].get("annotations")
        return changed

    def create(self, rt: ResourceType, namespace: str | None, body: Any, *, privileged: bool = False) -> Obj:
        """POST semantics. ``namespace`` comes from the URL (None: the object's own)."""
        obj = _as_dict(body)
        self._check_type_meta(rt, obj)
        obj["apiVersion"], obj["kind"] = rt.api_version(), rt.kind
        meta = obj["metadata"] = dict(obj.get("metadata") or {})
        if rt.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, "", namespace):
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if meta.pop("resourceVersion", None) and not privileged:
            raise KubeApiError(
                500, "InternalError", "resourceVersion should not be set on objects to be created"
            )
        with self._lock:
            if not meta.get("name") and meta.get("generateName"):
                while True:
                    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
                    candidate = meta["generateName"] + suffix
                    if (meta.get("namespace", ""), candidate) not in self._objects[rt.key]:
                        meta["name"] = candidate
                        break
            if not meta.get("name"):
                raise rt.invalid("", [("metadata.name", "Required value: name or generateName is required")])
            name = meta["name"]
            if (meta.get("namespace", ""), name) in self._objects[rt.key]:
                raise KubeApiError(
                    409,
                    "AlreadyExists",
                    f'{rt.qualified} "{name}" already exists',
                    {"name": name, "group": rt.group, "kind": rt.plural},
                )
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
            for system_field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
                meta.pop(system_field, None)
            if rt.status_subresource and not privileged:
                obj.pop("status", None)  # PrepareForCreate resets status
            self._defaults(rt, obj, None)
            declared = self._admit(rt, obj, None)
            committed = self._commit(rt, "ADDED", obj, None)
            if declared is not None:
                self._add_type(declared)
            return committed

    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        privileged: bool = False,
        patching: bool = False,
    ) -> Obj:
        """PUT semantics on the resource or its ``status`` subresource."""
        new = _as_dict(body)
        self._check_type_meta(rt, new)
        body_meta = new.get("metadata") or {}
        if body_meta.get("name") not in (None, "", name):
            raise _bad_request(
                f"the name of the object ({body_meta['name']}) does not match the name on the URL ({name})"
            )
        if rt.namespaced and body_meta.get("namespace") not in (None, "", namespace):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        with self._lock:
            cur = self._get(rt, namespace, name)
            cur_meta = cur["metadata"]
            rv = body_meta.get("resourceVersion")
            if rv and str(rv) != cur_meta["resourceVersion"]:
                raise rt.conflict(name, _MODIFIED)
            if not rv and not (privileged or patching or rt.allow_unconditional_update):
                raise rt.invalid(
                    name, [("metadata.resourceVersion", "Invalid value: 0: must be specified for an update")]
                )
            if body_meta.get("uid") and body_meta["uid"] != cur_meta["uid"]:
                raise rt.conflict(
                    name,
                    f"Precondition failed: UID in precondition: {body_meta['uid']}, UID in object meta: "
                    f"{cur_meta['uid']}",
                )
            if subresource == "status":  # only status changes; metadata and spec stay as stored
                status = new.get("status")
                new = copy.deepcopy(cur)
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
            else:
                new["apiVersion"], new["kind"] = rt.api_version(), rt.kind
                if rt.status_subresource and not privileged:
                    if "status" in cur:
                        new["status"] = copy.deepcopy(cur["status"])
                    else:
                        new.pop("status", None)
                meta = new["metadata"] = dict(body_meta)
                for system_field in (
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ):
                    if system_field in cur_meta:
                        meta[system_field] = cur_meta[system_field]
                    else:
                        meta.pop(system_field, None)
                meta.pop("managedFields", None)
                if cur_meta.get("deletionTimestamp"):
                    added = [
                        f for f in meta.get("finalizers") or [] if f not in (cur_meta.get("finalizers") or [])
                    ]
                    if added:
                        raise rt.invalid(
                            name,
                            [
                                (
                                    "metadata.finalizers",
                                    f"Forbidden: no new finalizers can be "
                                    f"added if the object is being deleted, found new finalizers {added}",
                                )
                            ],
                        )
            new["metadata"]["resourceVersion"] = cur_meta["resourceVersion"]
            self._defaults(rt, new, cur)
            declared = self._admit(rt, new, cur)
            if self._generation_changes(rt, cur, new):
                new["metadata"]["generation"] = cur_meta.get("generation", 0) + 1
            if new == cur:  # no-op updates write nothing: same resourceVersion, no watch event
                return cur
            committed = self._commit(rt, "MODIFIED", new, cur)
            if declared is not None:
                self._add_type(declared)
            if committed["metadata"].get("deletionTimestamp") and not committed["metadata"].get("finalizers"):
                self._remove(rt, committed)  # the last finalizer is gone: the deletion completes
            return committed

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch_type: str,
        patch: Any,
        *,
        subresource: str | None = None,
        privileged: bool = False,
    ) -> Obj:
        """PATCH semantics: patch the stored object, then apply the result like an update (a
        resourceVersion put into the patch is therefore a precondition, as on the real server)."""
        with self._lock:
            cur = self._get(rt, namespace, name)
            patched = _apply_patch(rt, name, copy.deepcopy(cur), patch_type, patch)
            return self.update(
                rt, namespace, name, patched, subresource=subresource, privileged=privileged, patching=True
            )

    def delete(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        *,
        preconditions: Mapping[str, Any] | None = None,
    ) -> tuple[Obj, bool]:
        """DELETE semantics; returns (object, gone). With finalizers the object stays, marked
        with deletionTimestamp (generation bumps, as graceful deletion does on the real server)."""
        with self._lock:
            cur = self._get(rt, namespace, name)
            meta = cur["metadata"]
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise rt.conflict(
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, "
                    f"UID in object meta: {meta['uid']}",
                )
            if pre.get("resourceVersion") and str(pre["resourceVersion"]) != meta["resourceVersion"]:
                raise rt.conflict(
                    name,
                    f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                    f"ResourceVersion in object meta: {meta['resourceVersion']}",
                )
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return cur, False
                new = copy.deepcopy(cur)
                new["metadata"].update(
                    deletionTimestamp=_now(),
                    deletionGracePeriodSeconds=0,
                    generation=meta.get("generation", 0) + 1,
                )
                return self._commit(rt, "MODIFIED", new, cur), False
            if rt is NAMESPACES:  # stands in for the namespace controller
                for other in list(self._types.values()):
                    if other.namespaced:
                        for ns, obj_name in list(self._objects[other.key]):
                            if ns == name:
                                self.delete(other, ns, obj_name)
            return self._remove(rt, cur), True

    def _remove(self, rt: ResourceType, obj: Obj) -> Obj:
        gone = self._commit(rt, "DELETED", obj, obj)
        if rt is CRDS:  # stands in for the CRD finalizer: instances go, the endpoint goes
            declared = resource_type_from_crd(obj)
            for ns, obj_name in list(self._objects.get(declared.key, {})):
                instance = self._objects[declared.key][(ns, obj_name)]
                self._commit(declared, "DELETED", instance, instance)
            self._types.pop(declared.key, None)
            self._objects.pop(declared.key, None)
            for watcher in self._watchers:
                if watcher.key == declared.key:
                    watcher.push(None)
        return gone

    # ---- scale subresource ----

    def get_scale(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        """The autoscaling/v1 Scale view of an object with a scale subresource."""
        assert rt.scale is not None
        with self._lock:
            obj = self._get(rt, namespace, name)
        meta = obj["metadata"]
        status: Obj = {"replicas": _get_path(obj, rt.scale.status_replicas_path) or 0}
        if rt.scale.label_selector_path:
            selector = _get_path(obj, rt.scale.label_selector_path)
            if isinstance(selector, dict):
                selector = str(LabelSelector.from_object(selector))
            if selector is not None:
                status["selector"] = selector
        scale_meta = {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if k in meta
        }
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": scale_meta,
            "spec": {"replicas": _get_path(obj, rt.scale.spec_replicas_path) or 0},
            "status": status,
        }

    def update_scale(self, rt: ResourceType, namespace: str | None, name: str, scale: Any) -> Obj:
        """PUT .../scale: writes spec.replicas (at the type's path) of the object."""
        assert rt.scale is not None
        scale = _as_dict(scale)
        with self._lock:
            cur = self._get(rt, namespace, name)
            rv = (scale.get("metadata") or {}).get("resourceVersion")
            if rv and str(rv) != cur["metadata"]["resourceVersion"]:
                raise rt.conflict(
                    name,
                    _MODIFIED,
                )
            replicas = (scale.get("spec") or {}).get("replicas", 0)
            if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
                raise KubeApiError(
                    422,
                    "Invalid",
                    f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                    f"{replicas!r}: must be greater than or equal to 0",
                    {"name": name, "kind": "Scale"},
                )
            new = copy.deepcopy(cur)
            _set_path(new, rt.scale.spec_replicas_path, replicas)
            self._admit(rt, new, cur)  # the replicas land in the object: its schema applies
            if new != cur:
                if self._generation_changes(rt, cur, new):
                    new["metadata"]["generation"] = cur["metadata"].get("generation", 0) + 1
                self._commit(rt, "MODIFIED", new, cur)
            return self.get_scale(rt, namespace, name)

    def patch_scale(
        self, rt: ResourceType, namespace: str | None, name: str, patch_type: str, patch: Any
    ) -> Obj:
        with self._lock:
            scale = self.get_scale(rt, namespace, name)
            scale_type = ResourceType("autoscaling", ("v1",), "v1", "scale", "Scale")  # built-in: SMP is fine
            return self.update_scale(
                rt, namespace, name, _apply_patch(scale_type, name, scale, patch_type, patch)
            )

    # ---- history and watches ----

    def compact(self) -> int:
        """Forget the change history: watches from an older resourceVersion now get 410 Gone, and
        open watches that still owe events from before now end with it."""
        with self._lock:
            self._history.clear()
            self._compact_to(self._rv)
            return self._rv

    def _compact_to(self, rv: int) -> None:
        self._compacted_rv = rv
        for watcher in [w for w in self._watchers if w.owed and w.owed[0] <= rv]:
            self._watchers.discard(watcher)
            watcher.owed.clear()
            watcher.held.clear()
            watcher.expired = KubeApiError(
                410, "Expired", "The resourceVersion for the provided watch is too old."
            ).status()
            watcher.push(None)

    @contextlib.contextmanager
    def hold_watches(self) -> Iterator[None]:
        """Keep changes (and bookmarks, and the first events of watches opened meanwhile) from reaching
        the watch streams until the block ends, as for clients that fell behind; a compaction inside
        the block ends the watches that owe changes with 410."""
        with self._lock:
            self._holding = True
        try:
            yield
        finally:
            with self._lock:
                self._holding = False
                for watcher in self._watchers:
                    for item in watcher.held:
                        watcher.push(item)
                    watcher.held.clear()

    def open_watch(
        self, rt: ResourceType, since: int | None, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[_Change], _Watcher, int]:
        """Register a watcher; returns (changes to send first, watcher, store resourceVersion).

        ``since`` None means "current state first": synthetic ADDED changes for every object.
        Otherwise the history after ``since`` is replayed, or 410 Expired when compacted away.
        """
        with self._lock:
            if since is None:
                first = [
                    _Change(_rv_of(obj), rt.key, "ADDED", obj, None)
                    for _, obj in sorted(self._objects[rt.key].items())
                ]
            else:
                if since < self._compacted_rv:
                    raise KubeApiError(
                        410, "Expired", f"too old resource version: {since} ({self._compacted_rv})"
                    )
                start = bisect.bisect_right([c.rv for c in self._history], since)
                first = [c for c in self._history[start:] if c.key == rt.key]
            watcher = _Watcher(rt.key, loop)
            if since is not None:
                watcher.owed.extend(c.rv for c in first)
            if self._holding:  # a watch opened meanwhile falls behind from the start
                watcher.held.extend(first)
                first = []
            self._watchers.add(watcher)
            return first, watcher, self._rv

    def written(self, watcher: _Watcher, rv: int) -> None:
        """The stream is writing (or filtering out) the change at ``rv``: it owes it no more."""
        with self._lock:
            while watcher.owed and watcher.owed[0] <= rv:
                watcher.owed.popleft()

    def request_bookmark(self, watcher: _Watcher) -> None:
        """Queue a bookmark behind every change already handed to the watcher."""
        with self._lock:
            self._hand(watcher, _BookmarkMark(self._rv))

    def close_watch(self, watcher: _Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def close_all_watches(self) -> None:
        with self._lock:
            for watcher in self._watchers:
                watcher.push(None)
            self._watchers.clear()


def _watch_event(change: _Change, flt: _Filter) -> tuple[str, Obj] | None:
    """What a filtered watch sees of a change, as the real watch cache does it: an object
    that starts matching arrives as ADDED, one that stops matching leaves as DELETED."""
    now = change.type != "DELETED" and flt.matches(change.obj)
    before = change.prev is not None and flt.matches(change.prev)
    if now:
        return ("MODIFIED" if before else "ADDED"), change.obj
    if before:
        if change.type == "DELETED":
            return "DELETED", change.obj
        assert change.prev is not None
        prev = change.prev
        return "DELETED", {**prev, "metadata": {**prev["metadata"], "resourceVersion": str(change.rv)}}
    return None


# ---------------------------------------------------------------------------------------------
# 6. HTTP: the real URL shapes, Status error bodies, chunked watch streams.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """A request the server received, for assertions about what a controller did."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise _bad_request(f"invalid {name} {value!r}: must be an integer") from None


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _served(rt: ResourceType, version: str, obj: Obj, *, in_list: bool = False) -> Obj:
    """An object as served at ``version``. Typed (built-in) list items carry no kind/apiVersion;
    custom resources are served at the requested version (conversion strategy None)."""
    if in_list and not rt.custom:
        return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
    if rt.custom and version != rt.storage_version:
        return {**obj, "apiVersion": rt.api_version(version)}
    return obj


_READ_VERBS = ["get", "list", "watch"]
_ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


class _HttpApi:
    """aiohttp handlers over a ``Store``. Runs on the server thread's loop."""

    def __init__(self, store: Store, bookmark_interval: float) -> None:
        self.store = store
        self.bookmark_interval = bookmark_interval
        self.requests: list[RecordedRequest] = []
        self._requests_lock = threading.Lock()
        self.address = "127.0.0.1:0"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        with self._requests_lock:
            self.requests.append(
                RecordedRequest(request.method, request.path, dict(request.query), request.content_type, body)
            )
        try:
            if isinstance(body, str):
                raise _bad_request("the request body is not valid JSON")
            return await self._route(request, body)
        except KubeApiError as err:
            return _json(err.status(), err.code)
        except Exception as err:  # a bug in the stand-in: make it loud, but keep the Status shape
            _log.exception("kube-api stand-in failed on %s %s", request.method, request.path_qs)
            return _json(KubeApiError(500, "InternalError", f"stand-in error: {err!r}").status(), 500)

    # ---- routing ----

    async def _route(self, request: web.Request, body: Any) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts == ["version"]:
            return _json(self._version())
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return web.Response(text="ok")
        if not parts or parts[0] not in ("api", "apis"):
            raise _route_not_found()
        if parts[0] == "api":
            group = ""
            if len(parts) == 1:
                return _json(
                    {
                        "kind": "APIVersions",
                        "versions": ["v1"],
                        "serverAddressByClientCIDRs": [
                            {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}
                        ],
                    }
                )
            version, rest = parts[1], parts[2:]
        else:
            if len(parts) == 1:
                return _json(self._group_list())
            group = parts[1]
            if len(parts) == 2:
                return _json(self._group(group))
            version, rest = parts[2], parts[3:]
        if not rest:
            return _json(self._resource_list(group, version))

        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and self._is_namespaced(group, version, rest[2]):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise _route_not_found()
        plural, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
        rt = self.store.resolve(group, version, plural)
        if (not rt.namespaced and namespace is not None) or (rt.namespaced and name and namespace is None):
            raise _route_not_found()
        if sub is not None and not (
            (sub == "status" and rt.status_subresource) or (sub == "scale" and rt.scale is not None)
        ):
            raise _route_not_found()
        method, query = request.method, request.query
        if name is None:
            if method == "GET" and _truthy(query.get("watch")):
                return await self._watch(request, rt, version, namespace)
            if method == "GET":
                return self._list(rt, version, namespace, query)
            if method == "POST" and (namespace is not None or not rt.namespaced):
                obj = self.store.create(rt, namespace, self._body_object(body), privileged=False)
                return _json(_served(rt, version, obj), 201)
            if method == "DELETE" and (namespace is not None or not rt.namespaced):
                return self._delete_collection(rt, version, namespace, query)
        elif sub == "scale":
            if method == "GET":
                return _json(self.store.get_scale(rt, namespace, name))
            if method == "PUT":
                return _json(self.store.update_scale(rt, namespace, name, self._body_object(body)))
            if method == "PATCH":
                return _json(self.store.patch_scale(rt, namespace, name, request.content_type, body))
        else:
            if method == "GET":
                return _json(_served(rt, version, self.store.get(rt, namespace, name)))
            if method == "PUT":
                obj = self.store.update(
                    rt, namespace, name, self._body_object(body), subresource=sub, privileged=False
                )
                return _json(_served(rt, version, obj))
            if method == "PATCH":
                obj = self.store.patch(
                    rt, namespace, name, request.content_type, body, subresource=sub, privileged=False
                )
                return _json(_served(rt, version, obj))
            if method == "DELETE" and sub is None:
                return self._delete(rt, version, namespace, name, body)
        raise KubeApiError(
            405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
        )

    def _is_namespaced(self, group: str, version: str, plural: str) -> bool:
        try:
            return self.store.resolve(group, version, plural).namespaced
        except KubeApiError:
            return False

    @staticmethod
    def _body_object(body: Any) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        return body

    # ---- handlers ----

    def _list(
        self, rt: ResourceType, version: str, namespace: str | None, query: Mapping[str, str]
    ) -> web.Response:
        flt = _Filter(
            namespace,
            LabelSelector.parse(query.get("labelSelector")),
            FieldSelector.parse(query.get("fieldSelector"), rt),
        )
        items, rv = self.store.list(rt, flt)
        meta: Obj = {"resourceVersion": str(rv)}
        if token := query.get("continue"):
            # Continue tokens carry the first page's resourceVersion and the last key served;
            # later pages read the current state (the real server reads a snapshot).
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode()))
                token_rv, start = int(state["rv"]), tuple(state["start"])
            except (ValueError, KeyError, TypeError):
                raise _bad_request("continue key is not valid") from None
            if token_rv < self.store.compacted_rv:
                raise KubeApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue parameter.",
                )
            items = [i for i in items if _obj_key(i) > start]
            meta["resourceVersion"] = str(token_rv)
        limit = _int_param(query, "limit") or 0
        if 0 < limit < len(items):
            remaining = len(items) - limit
            items = items[:limit]
            state = {"rv": int(meta["resourceVersion"]), "start": list(_obj_key(items[-1]))}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
            meta["remainingItemCount"] = remaining
        return _json(
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version(version),
                "metadata": meta,
                "items": [_served(rt, version, i, in_list=True) for i in items],
            }
        )

    def _delete(
        self, rt: ResourceType, version: str, namespace: str | None, name: str, body: Any
    ) -> web.Response:
        options = body if isinstance(body, dict) else {}
        obj, gone = self.store.delete(rt, namespace, name, preconditions=options.get("preconditions"))
        if gone and not rt.returns_deleted_object:
            meta = obj["metadata"]
            return _json(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": meta["uid"]},
                }
            )
        return _json(_served(rt, version, obj))

    def _delete_collection(
        self, rt: ResourceType, version: str, namespace: str | None, query: Mapping[str, str]
    ) -> web.Response:
        flt = _Filter(
            namespace,
            LabelSelector.parse(query.get("labelSelector")),
            FieldSelector.parse(query.get("fieldSelector"), rt),
        )
        items, _ = self.store.list(rt, flt)
        deleted = []
        for item in items:
            meta = item["metadata"]
            with contextlib.suppress(KubeApiError):  # raced with another delete
                deleted.append(self.store.delete(rt, meta.get("namespace"), meta["name"])[0])
        return _json(
            {
                "kind": rt.list_kind,
                "apiVersion": rt.api_version(version),
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": [_served(rt, version, i, in_list=True) for i in deleted],
            }
        )

    async def _watch(
        self, request: web.Request, rt: ResourceType, version: str, namespace: str | None
    ) -> web.StreamResponse:
        query = request.query
        flt = _Filter(
            namespace,
            LabelSelector.parse(query.get("labelSelector")),
            FieldSelector.parse(query.get("fieldSelector"), rt),
        )
        rv_param = query.get("resourceVersion") or ""
        send_initial = query.get("sendInitialEvents")
        if rv_param not in ("", "0") and not rv_param.isdigit():
            raise _bad_request(f"invalid resource version {rv_param!r}")
        since: int | None = None if rv_param in ("", "0") else int(rv_param)
        if _truthy(send_initial):
            since = None
        elif send_initial is not None and since is None:  # sendInitialEvents=false: start now
            since = self.store.resource_version
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        timeout = _int_param(query, "timeoutSeconds")

        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        loop = asyncio.get_running_loop()

        async def send(event_type: str, obj: Obj) -> None:
            await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

        def bookmark(rv: int, annotations: Obj | None = None) -> Obj:
            meta: Obj = {"resourceVersion": str(rv)}
            if annotations:
                meta["annotations"] = annotations
            return {"kind": rt.kind, "apiVersion": rt.api_version(version), "metadata": meta}

        try:
            first, watcher, start_rv = self.store.open_watch(rt, since, loop)
        except KubeApiError as err:  # the real server answers 200 and sends one ERROR event
            with contextlib.suppress(ConnectionError):
                await send("ERROR", err.status())
                await response.write_eof()
            return response

        async def send_change(change: _Change) -> None:
            self.store.written(watcher, change.rv)  # the write below reaches the transport before any await
            if event := _watch_event(change, flt):
                await send(event[0], _served(rt, version, event[1]))

        deadline = loop.time() + timeout if timeout is not None else None
        next_bookmark = loop.time() + self.bookmark_interval
        try:
            for change in first:
                if watcher.expired is not None:
                    break
                await send_change(change)
            if _truthy(send_initial) and bookmarks and watcher.expired is None:
                await send("BOOKMARK", bookmark(start_rv, {"k8s.io/initial-events-end": "true"}))
            while watcher.expired is None:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                if request.transport is None or request.transport.is_closing():
                    break
                if bookmarks and now >= next_bookmark:
                    self.store.request_bookmark(watcher)
                    next_bookmark = now + self.bookmark_interval
                wait = 0.5
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if bookmarks:
                    wait = min(wait, max(next_bookmark - now, 0.0))
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=max(wait, 0.0))
                except TimeoutError:
                    continue
                if item is None or watcher.expired is not None:
                    break
                if isinstance(item, _BookmarkMark):
                    await send("BOOKMARK", bookmark(item.rv))
                else:
                    await send_change(item)
            if watcher.expired is not None:  # a compaction ended it: what it still owed is lost
                await send("ERROR", watcher.expired)
        except ConnectionError:
            pass
        finally:
            self.store.close_watch(watcher)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    # ---- discovery ----

    @staticmethod
    def _version() -> Obj:
        return {
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0",
            "gitCommit": "0" * 40,
            "gitTreeState": "clean",
            "buildDate": "2025-04-23T00:00:00Z",
            "goVersion": "go1.24.2",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _group(self, group: str) -> Obj:
        versions = self.store.group_versions().get(group)
        if not group or not versions:
            raise _route_not_found()
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def _group_list(self) -> Obj:
        groups = [self._group(g) for g in sorted(self.store.group_versions()) if g]
        for entry in groups:
            del entry["kind"], entry["apiVersion"]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _resource_list(self, group: str, version: str) -> Obj:
        resources: list[Obj] = []
        for rt in self.store.types():
            if rt.group != group or version not in rt.versions:
                continue
            resources.append(
                {
                    "name": rt.plural,
                    "singularName": rt.singular,
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": _ALL_VERBS,
                    "shortNames": list(rt.short_names),
                }
            )
            if rt.status_subresource:
                resources.append(
                    {
                        "name": f"{rt.plural}/status",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
            if rt.scale is not None:
                resources.append(
                    {
                        "name": f"{rt.plural}/scale",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "group": "autoscaling",
                        "version": "v1",
                        "kind": "Scale",
                        "verbs": ["get", "patch", "update"],
                    }
                )
        if not resources:
            raise _route_not_found()
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }


def _obj_key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


# ---------------------------------------------------------------------------------------------
# 7. KubeApiServer: the HTTP server on its own thread and loop, plus the Python API for tests.
# ---------------------------------------------------------------------------------------------


class KubeApiServer:
    """The stand-in. ``start()`` serves on 127.0.0.1 from a background thread with its own event
    loop, so synchronous clients (any thread) and async tests (any loop) can use it.

    The Python API is thread-safe and goes through the same store as HTTP, so every change it
    makes gets a resourceVersion and reaches watchers. Unlike HTTP writes it may set ``status``
    through the main resource (tests play kubelet and controllers that way).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 1.0,
        history_limit: int | None = None,
    ) -> None:
        self.store = Store(history_limit=history_limit)
        self._http = _HttpApi(self.store, bookmark_interval)
        self._host, self._port = host, port
        self._base_url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ----

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("KubeApiServer is not started")
        return self._base_url

    def start(self) -> str:
        """Start serving (idempotent); returns the base URL, e.g. ``http://127.0.0.1:38123``. After
        ``stop()`` it serves again on the same port with the same objects and history, as an API
        server restarting in front of etcd: clients reconnect to the address they know."""
        if self._thread is not None:
            return self.base_url
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._startup())
            except BaseException as err:
                failure.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="kube-api-stand-in", daemon=True)
        self._thread.start()
        ready.wait(timeout=30)
        if failure or not ready.is_set():
            self._thread.join(timeout=5)
            self._thread = self._loop = None
            raise RuntimeError("KubeApiServer failed to start") from (failure[0] if failure else None)
        return self.base_url

    async def _startup(self) -> None:
        self._runner = web.AppRunner(
            self._http.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        host, port = self._runner.addresses[0][:2]
        self._port = port  # a restart binds the same one
        self._base_url = f"http://{host}:{port}"
        self._http.address = f"{host}:{port}"

    def stop(self) -> None:
        """End all watch streams, close the listener and the thread (idempotent); the store stays,
        for ``start()`` to serve again."""
        if self._thread is None or self._loop is None:
            return
        self.store.close_all_watches()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = self._loop = self._runner = None
        self._base_url = None

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configuration(self) -> Any:
        """A ``kubernetes.client.Configuration`` pointing at this server."""
        from kubernetes import client  # keeps the stand-in importable without it

        return client.Configuration(host=self.base_url)

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for this server (close it when done)."""
        from kubernetes import client

        return client.ApiClient(self.configuration())

    # ---- Python API (thread-safe; results are deep copies) ----

    @property
    def resource_version(self) -> str:
        """The current (last written) resourceVersion."""
        return str(self.store.resource_version)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every HTTP request received so far, oldest first."""
        with self._http._requests_lock:
            return list(self._http.requests)

    def clear_requests(self) -> None:
        with self._http._requests_lock:
            self._http.requests.clear()

    def _type(self, api_version: str, kind_or_plural: str) -> ResourceType:
        return self.store.find_type(api_version, kind_or_plural)[0]

    def _type_of(self, obj: Obj) -> ResourceType:
        if not obj.get("apiVersion") or not obj.get("kind"):
            raise ValueError("the object needs apiVersion and kind")
        return self._type(obj["apiVersion"], obj["kind"])

    def create(self, obj: Any) -> Obj:
        """Create like POST; namespaced objects without a namespace go to ``default``. Unlike POST
        the given ``status`` is kept and a stale ``metadata.resourceVersion`` is ignored."""
        data = _as_dict(obj)
        return copy.deepcopy(self.store.create(self._type_of(data), None, data, privileged=True))

    def get(self, api_version: str, kind_or_plural: str, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return copy.deepcopy(self.store.get(self._type(api_version, kind_or_plural), namespace, name))
        except KubeApiError as err:
            if err.code == 404:
                return None
            raise

    def list(
        self,
        api_version: str,
        kind_or_plural: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        """Matching objects (all namespaces when ``namespace`` is None), ordered by namespace/name."""
        rt = self._type(api_version, kind_or_plural)
        flt = _Filter(namespace, LabelSelector.parse(label_selector), FieldSelector.parse(field_selector, rt))
        return copy.deepcopy(self.store.list(rt, flt)[0])

    def update(self, obj: Any) -> Obj:
        """Replace the whole object, status included. A ``metadata.resourceVersion`` in it must be
        current (else 409 Conflict); without one the update is unconditional."""
        data = _as_dict(obj)
        rt = self._type_of(data)
        meta = data.get("metadata") or {}
        namespace = (meta.get("namespace") or "default") if rt.namespaced else None
        return copy.deepcopy(self.store.update(rt, namespace, meta["name"], data, privileged=True))

    def patch(
        self,
        api_version: str,
        kind_or_plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
    ) -> Obj:
        """Patch the whole object (status included). ``patch_type``: merge, strategic, json, or a
        content type."""
        rt = self._type(api_version, kind_or_plural)
        return copy.deepcopy(
            self.store.patch(rt, namespace, name, patch_type, patch, subresource=subresource, privileged=True)
        )

    def patch_status(
        self, api_version: str, kind_or_plural: str, namespace: str | None, name: str, status: Obj
    ) -> Obj:
        """Merge-patch ``status`` (what a kubelet or a controller's status writer would do)."""
        return self.patch(
            api_version, kind_or_plural, namespace, name, {"status": status}, subresource="status"
        )

    def delete(self, api_version: str, kind_or_plural: str, namespace: str | None, name: str) -> Obj | None:
        """Delete like DELETE. Returns the object if finalizers keep it (now with a
        deletionTimestamp), None if it is gone."""
        obj, gone = self.store.delete(self._type(api_version, kind_or_plural), namespace, name)
        return None if gone else copy.deepcopy(obj)

    def register_crd(self, manifest: Obj) -> Obj:
        """Create a CustomResourceDefinition (apiextensions.k8s.io/v1 manifest dict); its resource
        is served at once. Same as creating the CRD through the API; ``metadata.name`` defaults to
        ``<plural>.<group>``."""
        data = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            **_as_dict(manifest),
        }
        spec = data.get("spec") or {}
        meta = data["metadata"] = dict(data.get("metadata") or {})
        meta.setdefault("name", f"{(spec.get('names') or {}).get('plural')}.{spec.get('group')}")
        return copy.deepcopy(self.store.create(CRDS, None, data, privileged=True))

    def compact(self) -> str:
        """Drop the change history (like etcd compaction): watches and continue tokens from an
        older resourceVersion get 410 Gone, and so do open watches that still owe events from
        before it (see ``hold_watches``). Returns the compaction resourceVersion."""
        return str(self.store.compact())

    def hold_watches(self) -> contextlib.AbstractContextManager[None]:
        """``with server.hold_watches():`` changes made in the block reach the open watches when it
        ends, as if their clients had fallen behind; a ``compact()`` in the block ends those watches
        with 410 Expired instead, and their clients must re-list to learn the changes."""
        return self.store.hold_watches()

    def iter_types(self) -> Iterable[ResourceType]:
        """The resource types currently served."""
        return self.store.types()
