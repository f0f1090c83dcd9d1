"""deploy/ (kustomize): every overlay builds, every object it makes validates, every overlay keeps its word.

Validation, by kind (an object of any other kind fails; nothing is skipped):

* Kubernetes kinds: the OpenAPI schemas ``kubernetes-validate`` ships for the newest Kubernetes it knows,
  strict (an unknown field fails, as ``kubectl apply`` does);
* our kinds (``brickyard.dev``): the ``openAPIV3Schema`` of our CRDs in deploy/base/crds, applied the way
  the API server does: JSON schema, unknown fields, and the ``x-kubernetes-validations`` CEL rules
  (evaluated with cel-python);
* third-party kinds (Gateway API, Envoy Gateway, Inference Extension), whose CRDs are not here: a closed
  subset of their schemas covering the fields we write (a misspelled field fails), plus the references
  between objects (the Gateway, Service, port, listener or policy a field names must be in the build).

Closed by default: the NetworkPolicies are evaluated (which pod may open which port of which pod, for the
build's pods and a few from outside it), Redis and every client use the generated password, the secrets
Job and the controllers hold no more RBAC than they need, and the Envoy Gateway proxies keep the client
limits of the standalone Envoy configs (envoy/aibrix.yaml).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kube_validate

from brickyard.cli import build_parser
from brickyard_core.typed_config import (
    ConfigError,
    Layer,
    config_files,
    from_layers,
    from_mapping,
    load,
    read_file,
)
from controllers.config import ControllerSettings
from gateway_plugins.config import GatewaySettings
from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.extproc.contracts import DECISION_NAMESPACE, decision_metadata
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import build_strategies
from tests.support.crd_schema import DEPLOY_CRDS, StructuralSchema, cel_program, load_crds

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("dev", "prod", "heterogeneous")
KUBERNETES_VERSION = kube_validate.latest_version()
OUR_GROUP = "brickyard.dev"
CLUSTER_SCOPED = frozenset(
    {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "GatewayClass"}
)
MODEL_LABEL = "model.aibrix.ai/name"
PORT_LABEL = "model.aibrix.ai/port"
GPU_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
CONTROL_PLANE = "brickyard-system"
#: The Secret the secrets Job generates, and its keys.
CREDENTIALS = "brickyard-credentials"
REDIS_PASSWORD = ("BRICKYARD_REDIS_PASSWORD", "redis-password")
SIDECAR_TOKEN = ("BRICKYARD_SIDECAR_TOKEN", "sidecar-token")
#: The label of namespaces whose pods may scrape metrics (deploy/README.md).
SCRAPER_LABEL = "brickyard.dev/metrics-scraper"
#: Keys of the decision metadata the gateway writes (pod, pod_ip, strategy, session_id).
DECISION_KEYS = frozenset(
    decision_metadata(
        SimpleNamespace(  # type: ignore[arg-type]
            pod=SimpleNamespace(name="p", address="10.0.0.1:8000"),
            strategy="random",
            request=SimpleNamespace(bound_session="s"),
        )
    )[DECISION_NAMESPACE]
)
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models")


# --- building -----------------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: it is part of this machine (/usr/bin/kubectl) and builds deploy/ "
            "with `kubectl kustomize`"
        )
    return path


@functools.cache
def build(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize deploy/overlays/<overlay>`` makes."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/overlays/{overlay} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return build(overlay)


# --- helpers ------------------------------------------------------------------------------------------


def group_of(obj: Mapping[str, Any]) -> str:
    api_version = obj["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def ident(obj: Mapping[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace', '-')}/{meta['name']}"


def namespace_of(obj: Mapping[str, Any]) -> str | None:
    return obj["metadata"].get("namespace")


def namespaces(objects: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every namespace the build puts something in."""
    return {ns for o in objects if (ns := namespace_of(o))}


def find(
    objects: Iterable[Mapping[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objects: Iterable[Mapping[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def template_labels(workload: Mapping[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(match_labels: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def selected_workloads(
    objects: Iterable[Mapping[str, Any]], match_labels: Mapping[str, str], namespace: str
) -> list[dict[str, Any]]:
    return [
        d
        for d in find(objects, "Deployment", namespace=namespace)
        if selects(match_labels, template_labels(d))
    ]


def workloads(objects: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What runs pods: Deployments and Jobs."""
    return find(objects, "Deployment") + find(objects, "Job")


def label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A ``metav1.LabelSelector`` as the API server reads it: ``{}`` selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for term in selector.get("matchExpressions", []):
        key, values = term["key"], term.get("values", [])
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[term["operator"]]
        if not holds:
            return False
    return True


@contextlib.contextmanager
def mounted_config(objects: Iterable[Mapping[str, Any]], deployment: str, name: str) -> Iterator[list[Path]]:
    """The ``--config`` paths of a control-plane container, on a copy of the ConfigMaps its volumes mount laid
    out as the kubelet mounts them (a file per key; a projected volume's sources side by side)."""
    workload = one(objects, "Deployment", deployment, CONTROL_PLANE)
    c = container(workload, name)
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    with tempfile.TemporaryDirectory() as tmp:
        root, mounted = Path(tmp), set()
        for mount in c["volumeMounts"]:
            volume = volumes[mount["name"]]
            sources = [volume] if "configMap" in volume else volume.get("projected", {}).get("sources", [])
            for source in (s["configMap"] for s in sources if "configMap" in s):
                assert "items" not in source, f"{ident(workload)}: a ConfigMap's keys are its settings files"
                directory = root / mount["mountPath"].lstrip("/")
                directory.mkdir(parents=True, exist_ok=True)
                for key, text in one(objects, "ConfigMap", source["name"], CONTROL_PLANE)["data"].items():
                    assert not (directory / key).exists(), f"{ident(workload)}: two ConfigMaps give {key}"
                    (directory / key).write_text(text)
                    mounted.add(directory / key)
        config = parse_command(c).config or []
        assert config and all(p.startswith("/") for p in config), f"{ident(workload)}: --config {config}"
        paths = [root / path.lstrip("/") for path in config]
        # A settings file mounted but not read would be a layer silently dropped.
        assert set(config_files(paths)) == mounted, f"{ident(workload)}: --config {config} skips a file"
        yield paths


Settings = TypeVar("Settings")
#: The control plane's settings: Deployment, container, settings class.
CONTROL_PLANE_SETTINGS: tuple[tuple[str, str, type], ...] = (
    ("brickyard-gateway", "gateway", GatewaySettings),
    ("brickyard-controllers", "controllers", ControllerSettings),
)


def control_plane_settings(
    objects: Iterable[Mapping[str, Any]], deployment: str, name: str, cls: type[Settings]
) -> Settings:
    """A control-plane container's settings as its `brickyard ... --config` loads them in its pod: the files
    its volumes mount, merged by the CLI's own loader (strictly)."""
    with mounted_config(objects, deployment, name) as paths:
        return load(cls, paths)


def gateway_settings(objects: Iterable[Mapping[str, Any]]) -> GatewaySettings:
    return control_plane_settings(objects, "brickyard-gateway", "gateway", GatewaySettings)


def controllers_settings(objects: Iterable[Mapping[str, Any]]) -> ControllerSettings:
    return control_plane_settings(objects, "brickyard-controllers", "controllers", ControllerSettings)


def engine_workloads(objects: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in find(objects, "Deployment") if MODEL_LABEL in template_labels(d)]


def gateway_deployment(objects: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "brickyard-gateway", "brickyard-system")


def container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{ident(workload)}: no container {name}"
    return found[0]


def parse_command(c: Mapping[str, Any]) -> Any:
    """The arguments of a ``brickyard ...`` container command, as the CLI parses them."""
    return build_parser().parse_args([*c["command"][1:], *c.get("args", [])])


def secret_ref(c: Mapping[str, Any], env: str) -> dict[str, Any] | None:
    """The ``secretKeyRef`` of the container's environment variable ``env``."""
    return next(
        (e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if e["name"] == env and "valueFrom" in e),
        None,
    )


def service_port(service: Mapping[str, Any], port: int) -> dict[str, Any] | None:
    return next((p for p in service["spec"]["ports"] if p["port"] == port), None)


def gpu_requests(workload: Mapping[str, Any]) -> list[str]:
    return [
        c["name"]
        for c in pod_spec(workload)["containers"]
        if any(GPU_RESOURCE in (c.get("resources", {}).get(part) or {}) for part in ("requests", "limits"))
    ]


def _path(parts: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts) or "."


# --- our CRDs: admitted as the API server admits custom resources (tests/support/crd_schema.py) ---------


@functools.cache
def our_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CustomResourceDefinition, from deploy/base/crds."""
    crds = {}
    for crd in load_crds(DEPLOY_CRDS):
        for version in crd["spec"]["versions"]:
            crds[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = crd
    return crds


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = our_crds()[(api_version, kind)]
    version = next(v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == api_version)
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def structural_schema(api_version: str, kind: str) -> StructuralSchema:
    return StructuralSchema(crd_schema(api_version, kind))


def crd_errors(obj: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse ``obj`` (one of our kinds) with strict field validation, as
    ``kubectl apply`` asks for it; empty when it would take it."""
    if (obj["apiVersion"], obj["kind"]) not in our_crds():
        return [f"no CRD in deploy/base/crds defines {obj['apiVersion']} {obj['kind']}"]
    pruned, errors = structural_schema(obj["apiVersion"], obj["kind"]).admit(copy.deepcopy(dict(obj)))
    return [f"{path}: unknown field" for path in pruned] + [str(e) for e in errors]


# --- third-party kinds: closed subsets of their schemas ---------------------------------------------------


def _obj(*required: str, **properties: Any) -> dict[str, Any]:
    """A closed object schema: these properties only."""
    return {
        "type": "object",
        "required": list(required),
        "properties": properties,
        "additionalProperties": False,
    }


def _array(items: Mapping[str, Any], min_items: int = 0, max_items: int | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": min_items}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


def _enum(*values: Any) -> dict[str, Any]:
    return {"enum": list(values)}


STRING = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
ANY_OBJECT = {"type": "object"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^[1-9]+[0-9]*([EPTGMK]i|[EPTGMk])?$"}
JSON_PATCH_OPERATION = _obj(
    "op",
    op=_enum("add", "remove", "replace", "move", "copy", "test"),
    path={"type": "string"},
    jsonPath=STRING,
    value={},
    **{"from": STRING},
)
LOCAL_REF = _obj("group", "kind", "name", group={"type": "string"}, kind=STRING, name=STRING)
POLICY_TARGETS = _array(
    _obj("group", "kind", "name", group=STRING, kind=STRING, name=STRING, sectionName=STRING), 1
)
BACKEND_REF = _obj(
    "name", group={"type": "string"}, kind=STRING, name=STRING, namespace=STRING, port=PORT, weight=INT
)
PARENT_REF = _obj(
    "name",
    group={"type": "string"},
    kind=STRING,
    namespace=STRING,
    name=STRING,
    sectionName=STRING,
    port=PORT,
)
HTTP_ROUTE_RULE = _obj(
    matches=_array(
        _obj(
            path=_obj("type", "value", type=_enum("Exact", "PathPrefix", "RegularExpression"), value=STRING),
            headers=_array(
                _obj("name", "value", type=_enum("Exact", "RegularExpression"), name=STRING, value=STRING)
            ),
        ),
        max_items=64,
    ),
    backendRefs=_array(BACKEND_REF),
    timeouts=_obj(request=DURATION, backendRequest=DURATION),
)
EXT_PROC_BODY = _enum("Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed")
EXT_PROC = _obj(
    "backendRefs",
    backendRefs=_array(BACKEND_REF, 1),
    processingMode=_obj(
        request=_obj(body=EXT_PROC_BODY, attributes=_array(STRING)),
        response=_obj(body=EXT_PROC_BODY, attributes=_array(STRING)),
        allowModeOverride=BOOL,
    ),
    messageTimeout=DURATION,
    failOpen=BOOL,
    metadata=_obj(accessibleNamespaces=_array(STRING), writableNamespaces=_array(STRING, 0, 8)),
)


def _resource(spec: Mapping[str, Any]) -> dict[str, Any]:
    meta = _obj("name", name=STRING, namespace=STRING, labels=STRING_MAP, annotations=STRING_MAP)
    return _obj(
        "apiVersion", "kind", "metadata", "spec", apiVersion=STRING, kind=STRING, metadata=meta, spec=spec
    )


THIRD_PARTY: dict[tuple[str, str], dict[str, Any]] = {
    ("gateway.networking.k8s.io/v1", "GatewayClass"): _resource(
        _obj("controllerName", controllerName=STRING, description=STRING, parametersRef=ANY_OBJECT)
    ),
    ("gateway.networking.k8s.io/v1", "Gateway"): _resource(
        _obj(
            "gatewayClassName",
            "listeners",
            gatewayClassName=STRING,
            listeners=_array(
                _obj(
                    "name",
                    "protocol",
                    "port",
                    name=STRING,
                    hostname=STRING,
                    protocol=_enum("HTTP", "HTTPS", "TLS", "TCP", "UDP"),
                    port=PORT,
                    allowedRoutes=_obj(namespaces=_obj(**{"from": _enum("All", "Same", "Selector")})),
                ),
                1,
                64,
            ),
            infrastructure=_obj(parametersRef=LOCAL_REF, labels=STRING_MAP, annotations=STRING_MAP),
        )
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _resource(
        _obj(
            "parentRefs",
            "rules",
            parentRefs=_array(PARENT_REF, 1, 32),
            hostnames=_array(STRING),
            rules=_array(HTTP_ROUTE_RULE, 1, 16),
        )
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): _resource(
        _obj("targetRefs", "extProc", targetRefs=POLICY_TARGETS, extProc=_array(EXT_PROC, 1, 16))
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"): _resource(
        _obj(
            "type",
            "targetRef",
            "jsonPatches",
            type=_enum("JSONPatch"),
            targetRef=_obj(
                "group", "kind", "name", group=STRING, kind=_enum("Gateway", "GatewayClass"), name=STRING
            ),
            priority=INT,
            jsonPatches=_array(
                _obj(
                    "type",
                    "name",
                    "operation",
                    type={"type": "string", "pattern": r"^type\.googleapis\.com/envoy\.config\."},
                    name=STRING,
                    operation=JSON_PATCH_OPERATION,
                ),
                1,
            ),
        )
    ),
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): _resource(
        _obj(
            "targetRefs",
            targetRefs=POLICY_TARGETS,
            timeout=_obj(
                http=_obj(requestReceivedTimeout=DURATION, idleTimeout=DURATION, streamIdleTimeout=DURATION)
            ),
            connection=_obj(
                bufferLimit=QUANTITY,
                connectionLimit=_obj("value", value={"type": "integer", "minimum": 1}, closeDelay=DURATION),
            ),
            http2=_obj(maxConcurrentStreams={"type": "integer", "minimum": 1, "maximum": 2147483647}),
            headers=_obj(withUnderscoresAction=_enum("Allow", "RejectRequest", "DropHeader")),
        )
    ),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"): _resource(
        _obj(
            bootstrap={
                **_obj(
                    type=_enum("Merge", "Replace", "JSONPatch"),
                    value=STRING,
                    jsonPatches=_array(JSON_PATCH_OPERATION, 1),
                ),
                # Its CEL rule: JSONPatch takes jsonPatches; Merge and Replace (the default) a value.
                "if": {"required": ["type"], "properties": {"type": {"const": "JSONPatch"}}},
                "then": {"required": ["jsonPatches"]},
                "else": {"required": ["value"]},
            },
            provider=_obj(
                "type",
                type=_enum("Kubernetes"),
                kubernetes=_obj(
                    envoyDeployment=_obj(
                        replicas={"type": "integer", "minimum": 1},
                        pod=_obj(
                            affinity=ANY_OBJECT, nodeSelector=STRING_MAP, tolerations=_array(ANY_OBJECT)
                        ),
                        container=_obj(resources=ANY_OBJECT),
                    ),
                    envoyPDB=_obj(minAvailable=INT, maxUnavailable=INT),
                ),
            ),
        )
    ),
    ("inference.networking.k8s.io/v1", "InferencePool"): _resource(
        _obj(
            "selector",
            "targetPorts",
            "endpointPickerRef",
            selector=_obj("matchLabels", matchLabels={**STRING_MAP, "minProperties": 1}),
            targetPorts=_array(_obj("number", number=PORT), 1, 8),
            appProtocol=_enum("http", "kubernetes.io/h2c"),
            endpointPickerRef=_obj(
                "name",
                "port",
                group={"type": "string"},
                kind=_enum("Service"),
                name=STRING,
                port=_obj("number", number=PORT),
                failureMode=_enum("FailOpen", "FailClose"),
            ),
        )
    ),
}


def validation_errors(obj: Mapping[str, Any]) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if group_of(obj) == OUR_GROUP:
        return crd_errors(obj)
    if key in THIRD_PARTY:
        validator = jsonschema.Draft202012Validator(THIRD_PARTY[key])
        return [f"{_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kube_validate.validate(dict(obj), KUBERNETES_VERSION, strict=True)
    except kube_validate.SchemaNotFoundError:
        return [
            f"no schema for {key}: not a Kubernetes {KUBERNETES_VERSION} kind, not one of ours, not a known "
            "third-party kind (add it to THIRD_PARTY)"
        ]
    except kube_validate.ValidationError as exc:
        return [f"{_path(exc.path)}: {exc.message}"]
    return []


# --- references between objects -----------------------------------------------------------------------


def reference_errors(objects: tuple[dict[str, Any], ...]) -> list[str]:
    """Every name a field gives (ServiceAccount, ConfigMap, Service and port, Gateway, policy target,
    selector...) resolves to an object of the build."""
    errors: list[str] = []

    def exists(kind: str, name: str, namespace: str | None) -> bool:
        return bool(find(objects, kind, name, namespace))

    for workload in workloads(objects):
        ns, spec = workload["metadata"]["namespace"], pod_spec(workload)
        account = spec.get("serviceAccountName")
        if account and not exists("ServiceAccount", account, ns):
            errors.append(f"{ident(workload)}: no ServiceAccount {account}")
        for volume in spec.get("volumes", []):
            if "configMap" in volume and not exists("ConfigMap", volume["configMap"]["name"], ns):
                errors.append(f"{ident(workload)}: no ConfigMap {volume['configMap']['name']}")
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and not exists("PersistentVolumeClaim", claim, ns):
                errors.append(f"{ident(workload)}: no PersistentVolumeClaim {claim}")
    for service in find(objects, "Service"):
        ns = service["metadata"]["namespace"]
        backends = selected_workloads(objects, service["spec"]["selector"], ns)
        if not backends:
            errors.append(f"{ident(service)}: its selector matches no Deployment")
        names = {
            p.get("name") for w in backends for c in pod_spec(w)["containers"] for p in c.get("ports", [])
        }
        errors += [
            f"{ident(service)}: targetPort {p['targetPort']} is no container port"
            for p in service["spec"]["ports"]
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names
        ]
    for pdb in find(objects, "PodDisruptionBudget"):
        ns = pdb["metadata"]["namespace"]
        guarded = selected_workloads(objects, pdb["spec"]["selector"]["matchLabels"], ns)
        if not guarded:
            errors.append(f"{ident(pdb)}: its selector matches no Deployment")
        min_available = pdb["spec"].get("minAvailable")
        errors += [
            f"{ident(pdb)}: minAvailable {min_available} of {w['spec'].get('replicas', 1)} replicas of "
            f"{ident(w)} blocks every node drain"
            for w in guarded
            if isinstance(min_available, int) and min_available >= w["spec"].get("replicas", 1)
        ]
    for policy in find(objects, "NetworkPolicy"):
        ns, spec = policy["metadata"]["namespace"], policy["spec"]
        guarded = [
            w
            for w in workloads(objects)
            if w["metadata"]["namespace"] == ns
            and label_selector_matches(spec["podSelector"], template_labels(w))
        ]
        if not guarded:
            errors.append(f"{ident(policy)}: its podSelector matches no workload")
        names = {
            p.get("name") for w in guarded for c in pod_spec(w)["containers"] for p in c.get("ports", [])
        }
        errors += [
            f"{ident(policy)}: port {p['port']} is no container port of the pods it selects"
            for rule in spec.get("ingress", [])
            for p in rule.get("ports", [])
            if isinstance(p.get("port"), str) and p["port"] not in names
        ]
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        role = binding["roleRef"]
        if not exists(
            role["kind"],
            role["name"],
            binding["metadata"].get("namespace") if role["kind"] == "Role" else None,
        ):
            errors.append(f"{ident(binding)}: no {role['kind']} {role['name']}")
        errors += [
            f"{ident(binding)}: no ServiceAccount {s['namespace']}/{s['name']}"
            for s in binding["subjects"]
            if s["kind"] == "ServiceAccount" and not exists("ServiceAccount", s["name"], s["namespace"])
        ]
    for gateway in find(objects, "Gateway"):
        if not exists("GatewayClass", gateway["spec"]["gatewayClassName"], None):
            errors.append(f"{ident(gateway)}: no GatewayClass {gateway['spec']['gatewayClassName']}")
        ref = gateway["spec"].get("infrastructure", {}).get("parametersRef")
        if ref and not exists(ref["kind"], ref["name"], gateway["metadata"]["namespace"]):
            errors.append(f"{ident(gateway)}: no {ref['kind']} {ref['name']}")
    for route in find(objects, "HTTPRoute"):
        ns = route["metadata"]["namespace"]
        errors += [
            f"{ident(route)}: no Gateway {p['name']}"
            for p in route["spec"]["parentRefs"]
            if not exists("Gateway", p["name"], p.get("namespace", ns))
        ]
        for rule in route["spec"]["rules"]:
            errors += backend_errors(objects, ident(route), rule.get("backendRefs", []), ns)
    for policy in find(objects, "EnvoyExtensionPolicy") + find(objects, "ClientTrafficPolicy"):
        ns = policy["metadata"]["namespace"]
        errors += [
            f"{ident(policy)}: no {t['kind']} {t['name']}"
            for t in policy["spec"]["targetRefs"]
            if not exists(t["kind"], t["name"], ns)
        ]
        for ext_proc in policy["spec"].get("extProc", []):
            errors += backend_errors(objects, ident(policy), ext_proc["backendRefs"], ns)
    listeners = {
        f"{g['metadata']['namespace']}/{g['metadata']['name']}/{lis['name']}"
        for g in find(objects, "Gateway")
        for lis in g["spec"]["listeners"]
    }
    for policy in find(objects, "EnvoyPatchPolicy"):
        target = policy["spec"]["targetRef"]
        if not exists(target["kind"], target["name"], policy["metadata"]["namespace"]):
            errors.append(f"{ident(policy)}: no {target['kind']} {target['name']}")
        # Envoy Gateway names a Gateway listener's xDS Listener and route configuration <ns>/<gateway>/<name>.
        errors += [
            f"{ident(policy)}: no Gateway listener {p['name']}"
            for p in policy["spec"]["jsonPatches"]
            if p["type"].endswith((".Listener", ".RouteConfiguration")) and p["name"] not in listeners
        ]
    for pool in find(objects, "InferencePool"):
        ns, spec = pool["metadata"]["namespace"], pool["spec"]
        picker = find(objects, "Service", spec["endpointPickerRef"]["name"], ns)
        if not picker or service_port(picker[0], spec["endpointPickerRef"]["port"]["number"]) is None:
            errors.append(f"{ident(pool)}: no Service {spec['endpointPickerRef']['name']} with that port")
        if not selected_workloads(objects, spec["selector"]["matchLabels"], ns):
            errors.append(f"{ident(pool)}: its selector matches no Deployment in {ns}")
    for autoscaler in find(objects, "PodAutoscaler"):
        target = autoscaler["spec"]["scaleTargetRef"]
        if not exists(target["kind"], target["name"], autoscaler["metadata"]["namespace"]):
            errors.append(f"{ident(autoscaler)}: no {target['kind']} {target['name']}")
    for adapter in find(objects, "ModelAdapter"):
        match = adapter["spec"]["podSelector"].get("matchLabels", {})
        if not selected_workloads(objects, match, adapter["metadata"]["namespace"]):
            errors.append(f"{ident(adapter)}: its podSelector matches no Deployment")
    return errors


def backend_errors(
    objects: tuple[dict[str, Any], ...], owner: str, refs: Iterable[Mapping], ns: str
) -> list[str]:
    errors = []
    for ref in refs:
        kind, namespace = ref.get("kind", "Service"), ref.get("namespace", ns)
        found = find(objects, kind, ref["name"], namespace)
        if not found:
            errors.append(f"{owner}: no {kind} {namespace}/{ref['name']}")
        elif kind == "Service" and service_port(found[0], ref["port"]) is None:
            errors.append(f"{owner}: Service {ref['name']} has no port {ref['port']}")
    return errors


# --- every overlay --------------------------------------------------------------------------------------


def test_every_overlay_is_tested() -> None:
    assert {p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir()} == set(OVERLAYS)


def test_overlay_builds(objects: tuple[dict[str, Any], ...]) -> None:
    keys = [
        (o["apiVersion"].split("/")[0], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in objects
    ]
    assert len(keys) == len(set(keys)), "duplicate objects"
    unscoped = [
        ident(o) for o in objects if o["kind"] not in CLUSTER_SCOPED and not o["metadata"].get("namespace")
    ]
    assert not unscoped, (
        f"namespaced objects without a namespace (they would land in kubectl's current one): {unscoped}"
    )


def test_every_object_validates(objects: tuple[dict[str, Any], ...]) -> None:
    errors = [f"{ident(o)} {e}" for o in objects for e in validation_errors(o)]
    assert not errors, "\n".join(errors)


def test_references_resolve(objects: tuple[dict[str, Any], ...]) -> None:
    errors = reference_errors(objects)
    assert not errors, "\n".join(errors)


def test_crds_are_built_unchanged(objects: tuple[dict[str, Any], ...]) -> None:
    built = {o["metadata"]["name"]: o for o in find(objects, "CustomResourceDefinition")}
    sources = {crd["metadata"]["name"]: crd for crd in our_crds().values()}
    assert built.keys() == sources.keys()
    for name, crd in sources.items():
        assert built[name]["spec"] == crd["spec"], f"{name} is patched by the overlay"


def test_gateway_settings_load_and_match_the_deployment(objects: tuple[dict[str, Any], ...]) -> None:
    settings = gateway_settings(objects)
    # The strategies must exist, as the gateway checks at start-up.
    Router(
        PodRegistry(),
        build_strategies(settings.routing),
        default_strategy=settings.default_strategy,
        model_strategies={m: s.routing_strategy for m, s in settings.models.items() if s.routing_strategy},
    )
    gateway = container(gateway_deployment(objects), "gateway")
    args = parse_command(gateway)
    assert args.kubernetes or settings.discovery.source == "kubernetes"
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert (ports["grpc"], ports["health"], ports["metrics"]) == (
        settings.grpc_port,
        settings.health_port,
        settings.metrics_port,
    )
    assert gateway["readinessProbe"]["grpc"] == {"port": settings.health_port, "service": "readiness"}
    assert gateway["livenessProbe"]["grpc"] == {"port": settings.health_port, "service": "liveness"}
    service = one(objects, "Service", "brickyard-gateway", "brickyard-system")
    grpc = service_port(service, settings.grpc_port)
    assert grpc is not None and grpc["appProtocol"] == "kubernetes.io/h2c"
    assert ports[grpc["targetPort"]] == settings.grpc_port
    # Redis: the gateway, the tenancy and every sidecar use the one Redis of the build.
    assert settings.redis_url is not None
    assert_redis_in_build(objects, settings.redis_url)
    sidecar_urls = {
        arg.partition("=")[2]
        for w in engine_workloads(objects)
        for arg in container(w, "sidecar")["command"]
        if arg.startswith("--redis-url=")
    }
    assert sidecar_urls == {settings.redis_url}


def assert_redis_in_build(objects: tuple[dict[str, Any], ...], url: str) -> None:
    parts = urlsplit(url)
    name, _, namespace = (parts.hostname or "").partition(".")
    service = one(objects, "Service", name, namespace.split(".")[0])
    assert service_port(service, parts.port or 6379) is not None, url


def test_controllers_settings_load_and_match_the_build(objects: tuple[dict[str, Any], ...]) -> None:
    settings = controllers_settings(objects)
    # One Redis for the sidecars that write the records and the controllers that read them.
    assert settings.redis_url == gateway_settings(objects).redis_url
    routes = settings.model_routes
    gateway = one(objects, "Gateway", routes.gateway_name, routes.gateway_namespace)
    engine_namespaces = {w["metadata"]["namespace"] for w in engine_workloads(objects)}
    if engine_namespaces - {gateway["metadata"]["namespace"]}:
        assert all(
            lis["allowedRoutes"]["namespaces"]["from"] == "All" for lis in gateway["spec"]["listeners"]
        )


def setting_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The key path of every value a settings mapping states (a list is one value: layers replace lists)."""
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from setting_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def without(data: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` that does not state the value at ``path``."""
    trimmed = copy.deepcopy(dict(data))
    node = trimmed
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return trimmed


def test_each_setting_is_stated_once(objects: tuple[dict[str, Any], ...]) -> None:
    """Nothing in deploy/ states a default twice: each value a settings file states changes what the defaults
    and the files read before it (the common file, the base's, a component's) make of the settings."""
    redundant = []
    for deployment, name, cls in CONTROL_PLANE_SETTINGS:
        with mounted_config(objects, deployment, name) as paths:
            layers = [Layer(file.name, read_file(file)) for file in config_files(paths)]
        for i, layer in enumerate(layers):
            stated = from_layers(cls, layers[: i + 1])
            redundant += [
                f"{deployment}: {layer.source}: {'.'.join(path)} repeats a default or an earlier file"
                for path in setting_paths(layer.data)
                if from_layers(cls, [*layers[:i], Layer(layer.source, without(layer.data, path))]) == stated
            ]
    assert not redundant, "\n".join(redundant)


def test_every_settings_file_is_in_an_overlay() -> None:
    """test_each_setting_is_stated_once sees each settings file of deploy/: every file a configMapGenerator
    reads is in the build of some overlay."""
    built = {
        text
        for overlay in OVERLAYS
        for config_map in find(build(overlay), "ConfigMap")
        for text in config_map.get("data", {}).values()
    }
    sources = [
        kustomization.parent / entry.rpartition("=")[2]
        for kustomization in DEPLOY.rglob("kustomization.yaml")
        for generator in yaml.safe_load(kustomization.read_text()).get("configMapGenerator", [])
        for entry in generator.get("files", [])
    ]
    assert sources
    assert [str(path.relative_to(DEPLOY)) for path in sources if path.read_text() not in built] == []


def test_misspelled_gateway_setting_fails() -> None:
    """The guard the settings test relies on: the strict loader refuses what the gateway would refuse."""
    with pytest.raises(ConfigError, match="enabeld"):
        from_mapping(GatewaySettings, {"tenancy": {"enabeld": True}})


def test_brickyard_commands_parse(objects: tuple[dict[str, Any], ...]) -> None:
    """Every `brickyard ...` container command is one the CLI accepts, with its $(VARS) defined."""
    parser = build_parser()
    known = next(a for a in parser._actions if a.dest == "command").choices
    errors, pending = [], []
    for workload in workloads(objects):
        for c in pod_spec(workload)["containers"]:
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv[:1] != ["brickyard"]:
                continue
            defined = {e["name"] for e in c.get("env", [])}
            errors += [
                f"{ident(workload)}/{c['name']}: $({var}) is not in its env"
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(argv))
                if var not in defined
            ]
            if argv[1] not in known:
                pending.append(f"{ident(workload)}/{c['name']}: brickyard {argv[1]}")
                continue
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    args = parser.parse_args(argv[1:])
            except SystemExit:
                errors.append(f"{ident(workload)}/{c['name']}: {stderr.getvalue().strip()}")
                continue
            profile = getattr(args, "profile", None) if argv[1] == "emulator" else None
            if (
                profile
                and profile != "instant"
                and not (REPO / "emulator" / "profiles" / f"{profile}.yaml").exists()
            ):
                errors.append(f"{ident(workload)}/{c['name']}: no emulator profile {profile}")
    assert not errors, "\n".join(errors)
    assert not pending, f"subcommands not registered in brickyard.cli: {pending}"


def test_rbac_is_least_privilege(objects: tuple[dict[str, Any], ...]) -> None:
    for role in find(objects, "ClusterRole") + find(objects, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"], f"{ident(role)}: wildcard verb in {rule}"
            assert not any("*" in r for r in rule["resources"]), f"{ident(role)}: wildcard resource in {rule}"
            assert "*" not in rule["apiGroups"], f"{ident(role)}: wildcard group in {rule}"
    for role in find(objects, "ClusterRole"):
        assert not allowed(role, "", "secrets"), f"{ident(role)}: the Secrets of every namespace"
    gateway = one(objects, "ClusterRole", "brickyard-gateway")
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in gateway["rules"])
    assert (
        allowed(gateway, "", "pods")
        == allowed(gateway, OUR_GROUP, "modeladapters")
        == {"get", "list", "watch"}
    )
    controllers = one(objects, "ClusterRole", "brickyard-controllers")
    needs = {
        ("", "pods"): {"get", "list", "watch"},
        ("", "services"): {"get", "list", "watch"},
        (OUR_GROUP, "modeladapters"): {"get", "list", "watch", "update", "patch"},
        (OUR_GROUP, "modeladapters/status"): {"update", "patch"},
        (OUR_GROUP, "modeladapters/finalizers"): {"update"},
        (OUR_GROUP, "podautoscalers"): {"get", "list", "watch"},
        (OUR_GROUP, "podautoscalers/status"): {"update", "patch"},
        ("apps", "deployments/scale"): {"get", "patch"},
        ("apps", "statefulsets/scale"): {"get", "patch"},
        ("autoscaling", "horizontalpodautoscalers"): {
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
        },
        ("", "events"): {"create", "patch"},
        ("gateway.networking.k8s.io", "httproutes"): {
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
        },
    }
    missing = {k: v - allowed(controllers, *k) for k, v in needs.items() if v - allowed(controllers, *k)}
    assert not missing, missing
    # The kinds a PodAutoscaler may name are exactly the kinds the controllers may scale.
    target = crd_schema(f"{OUR_GROUP}/v1alpha1", "PodAutoscaler")["properties"]["spec"]["properties"][
        "scaleTargetRef"
    ]["properties"]
    admitted = {
        (version.rpartition("/")[0], f"{kind.lower()}s/scale")
        for version in target["apiVersion"]["enum"]
        for kind in target["kind"]["enum"]
    }
    scalable = {
        (group, resource)
        for rule in controllers["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        if resource.endswith("/scale")
    }
    assert scalable == admitted
    # Secrets: get, in the namespaces that hold ModelAdapters (credentialsSecretRef), nowhere else.
    account = (CONTROL_PLANE, "brickyard-controllers")
    adapter_namespaces = {a["metadata"]["namespace"] for a in find(objects, "ModelAdapter")}
    for namespace in namespaces(objects):
        verbs = {v for role in bound_roles(objects, account, namespace) for v in allowed(role, "", "secrets")}
        assert verbs == ({"get"} if namespace in adapter_namespaces else set()), namespace
    # Every workload runs as its own account, bound to its role.
    accounts = {
        pod_spec(w).get("serviceAccountName") for w in workloads(objects) if namespace_of(w) == CONTROL_PLANE
    }
    assert {"brickyard-gateway", "brickyard-controllers", "brickyard-secrets"} <= accounts


def allowed(role: Mapping[str, Any], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in role["rules"]
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def bound_roles(
    objects: tuple[dict[str, Any], ...], account: tuple[str, str], namespace: str
) -> list[dict[str, Any]]:
    """The roles a ServiceAccount (namespace, name) holds in ``namespace``: its ClusterRoles, and the Roles
    and ClusterRoles bound to it there."""
    roles = []
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding", namespace=namespace):
        if any(
            s["kind"] == "ServiceAccount" and (s["namespace"], s["name"]) == account
            for s in binding["subjects"]
        ):
            ref = binding["roleRef"]
            roles += find(objects, ref["kind"], ref["name"], namespace if ref["kind"] == "Role" else None)
    return roles


def test_control_plane_pods_are_locked_down(objects: tuple[dict[str, Any], ...]) -> None:
    for kind, name in (
        ("Deployment", "brickyard-gateway"),
        ("Deployment", "brickyard-controllers"),
        ("Deployment", "brickyard-redis"),
        ("Job", "brickyard-secrets"),
    ):
        workload = one(objects, kind, name, CONTROL_PLANE)
        pod = pod_spec(workload).get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for c in pod_spec(workload)["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert {"cpu", "memory"} <= c["resources"]["requests"].keys(), name
            assert "memory" in c["resources"]["limits"], name


def test_engines_follow_the_discovery_contract(objects: tuple[dict[str, Any], ...]) -> None:
    engines = engine_workloads(objects)
    assert engines
    for workload in engines:
        labels = template_labels(workload)
        engine = container(workload, "engine")
        assert int(labels.get(PORT_LABEL, "8000")) in {p["containerPort"] for p in engine["ports"]}
        assert container(workload, "sidecar")["command"][:2] == ["brickyard", "sidecar"]
        # The sidecar downloads adapters where the engine loads them from.
        adapters = {m["mountPath"] for m in container(workload, "sidecar")["volumeMounts"]}
        assert "/var/lib/brickyard/adapters" in adapters & {m["mountPath"] for m in engine["volumeMounts"]}


# --- closed by default: network policies ------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod as network policies see it: its namespace and that namespace's labels, its labels, its named
    container ports."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]
    ports: Mapping[str, int]

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def namespace_labels(
    objects: Iterable[Mapping[str, Any]], namespace: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A namespace's labels: the build's Namespace object's, and the one the API server sets on every one."""
    found = find(objects, "Namespace", namespace)
    own = found[0]["metadata"].get("labels", {}) if found else {}
    return {**own, **(extra or {}), "kubernetes.io/metadata.name": namespace}


def build_pods(objects: tuple[dict[str, Any], ...]) -> dict[str, Pod]:
    """A pod of each workload of the build, by ``namespace/name`` of the workload."""
    pods = {}
    for w in workloads(objects):
        ns = w["metadata"]["namespace"]
        ports = {p["name"]: p["containerPort"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
        pod = Pod(ns, w["metadata"]["name"], template_labels(w), namespace_labels(objects, ns), ports)
        pods[str(pod)] = pod
    return pods


def outside_pods(objects: tuple[dict[str, Any], ...]) -> dict[str, Pod]:
    """Pods the build does not make: the Gateway's Envoy proxies, metrics scrapers, and strangers."""
    gateway = one(objects, "Gateway", "brickyard", CONTROL_PLANE)

    def pod(
        namespace: str, name: str, labels: Mapping[str, str], ns_labels: Mapping[str, str] | None = None
    ) -> Pod:
        return Pod(namespace, name, labels, namespace_labels(objects, namespace, ns_labels), {})

    # The labels Envoy Gateway puts on the proxies it runs for a Gateway.
    proxy = {
        "app.kubernetes.io/name": "envoy",
        "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/managed-by": "envoy-gateway",
        "gateway.envoyproxy.io/owning-gateway-name": gateway["metadata"]["name"],
        "gateway.envoyproxy.io/owning-gateway-namespace": gateway["metadata"]["namespace"],
    }
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    return {
        "envoy": pod("envoy-gateway-system", "envoy-brickyard", proxy),
        "other-envoy": pod(
            "envoy-gateway-system",
            "envoy-other",
            {**proxy, "gateway.envoyproxy.io/owning-gateway-name": "other"},
        ),
        "envoy-gateway": pod(
            "envoy-gateway-system", "envoy-gateway", {"app.kubernetes.io/name": "gateway-helm"}
        ),
        "scraper": pod("monitoring", "prometheus", prometheus, {SCRAPER_LABEL: "true"}),
        "unlabelled-scraper": pod("observability", "prometheus", prometheus),
        "stranger": pod("default", "web", {"app": "web"}),
        "stranger-in-control-plane": pod(CONTROL_PLANE, "debug", {"app": "debug"}),
        "fake-controllers": pod("default", "ctl", {"app.kubernetes.io/name": "brickyard-controllers"}),
        "fake-gateway": pod("default", "gw", {"app.kubernetes.io/name": "brickyard-gateway"}),
    }


def admits(policies: Iterable[Mapping[str, Any]], source: Pod, dest: Pod, port: int) -> bool:
    """Whether ``policies`` let ``source`` open a TCP connection to ``dest`` on ``port``: a pod no policy
    selects for ingress takes anything; a selected pod, what one rule of the policies selecting it admits."""
    isolating = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dest.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and label_selector_matches(p["spec"]["podSelector"], dest.labels)
    ]
    return not isolating or any(
        rule_admits(p["metadata"]["namespace"], rule, source, dest, port)
        for p in isolating
        for rule in p["spec"].get("ingress", [])
    )


def rule_admits(namespace: str, rule: Mapping[str, Any], source: Pod, dest: Pod, port: int) -> bool:
    """An ingress rule: one of its ports (none: all) and one of its peers (none: everyone)."""
    return (not rule.get("ports") or any(port_matches(p, dest, port) for p in rule["ports"])) and (
        not rule.get("from") or any(peer_matches(peer, namespace, source) for peer in rule["from"])
    )


def port_matches(spec: Mapping[str, Any], dest: Pod, port: int) -> bool:
    if spec.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in spec:
        return True
    if isinstance(spec["port"], str):  # a named port: the container port of that name on the destination
        return dest.ports.get(spec["port"]) == port
    return spec["port"] <= port <= spec.get("endPort", spec["port"])


def peer_matches(peer: Mapping[str, Any], namespace: str, source: Pod) -> bool:
    """A peer: pods its podSelector selects (all without one) in the namespaces its namespaceSelector
    selects (without one: the policy's own namespace)."""
    assert "ipBlock" not in peer, "ipBlock peers are not modelled (pods have no addresses here)"
    in_namespace = (
        label_selector_matches(peer["namespaceSelector"], source.namespace_labels)
        if "namespaceSelector" in peer
        else source.namespace == namespace
    )
    return in_namespace and label_selector_matches(peer.get("podSelector", {}), source.labels)


def test_policy_evaluator_follows_kubernetes_semantics() -> None:
    """The evaluator the tests below rely on, on a policy with every construct they use."""
    policy = {
        "metadata": {"name": "db", "namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        # Both selectors: apps in namespaces of team x (an AND within one peer).
                        {
                            "namespaceSelector": {"matchLabels": {"team": "x"}},
                            "podSelector": {"matchLabels": {"role": "app"}},
                        },
                        # A podSelector alone: the policy's own namespace.
                        {
                            "podSelector": {
                                "matchExpressions": [{"key": "role", "operator": "In", "values": ["cron"]}]
                            }
                        },
                    ],
                    "ports": [{"port": "sql"}, {"port": 9000, "endPort": 9010}],
                }
            ],
        },
    }

    def pod(namespace: str, role: str, ns_labels: Mapping[str, str] | None = None) -> Pod:
        return Pod(namespace, role, {"role": role}, namespace_labels((), namespace, ns_labels), {"sql": 5432})

    db, web = pod("a", "db"), pod("a", "web")
    assert admits([policy], pod("b", "app", {"team": "x"}), db, 5432)
    assert admits([policy], pod("b", "app", {"team": "x"}), db, 9010)
    assert not admits([policy], pod("b", "app", {"team": "x"}), db, 9011)
    assert not admits([policy], pod("b", "app", {"team": "x"}), db, 5433)
    assert not admits([policy], pod("b", "app"), db, 5432), "the namespace must be selected too"
    assert not admits([policy], pod("b", "cron", {"team": "x"}), db, 5432), "a pod of another namespace"
    assert admits([policy], pod("a", "cron"), db, 5432)
    assert not admits([policy], pod("a", "app"), db, 5432)
    assert admits([policy], pod("c", "anyone"), web, 80), "a pod no policy selects is open"
    deny = {
        "metadata": {"name": "deny", "namespace": "a"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    assert not admits([deny], pod("a", "cron"), web, 80)
    assert admits([deny, policy], pod("a", "cron"), db, 5432), "policies add up"


def test_brickyard_system_denies_ingress_by_default(objects: tuple[dict[str, Any], ...]) -> None:
    policies = find(objects, "NetworkPolicy")
    assert [
        p
        for p in policies
        if namespace_of(p) == CONTROL_PLANE
        and p["spec"]["podSelector"] == {}
        and p["spec"].get("policyTypes") == ["Ingress"]
        and not p["spec"].get("ingress")
    ], "no default-deny policy in brickyard-system"
    # No rule opens a port to every source, or every port to a source.
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from") and rule.get("ports"), f"{ident(policy)}: an open rule {rule}"
            assert not [
                peer
                for peer in rule["from"]
                if not peer.get("podSelector") and peer.get("namespaceSelector") == {}
            ], f"{ident(policy)}: a peer that is every pod of every namespace"


def test_network_policies_admit_only_the_expected_peers(objects: tuple[dict[str, Any], ...]) -> None:
    """For each port that matters, exactly who may connect, among the build's pods and pods outside it."""
    policies = find(objects, "NetworkPolicy")
    pods, outside = build_pods(objects), outside_pods(objects)
    everyone = [*pods.values(), *outside.values()]
    gateway = pods[f"{CONTROL_PLANE}/brickyard-gateway"]
    controllers = pods[f"{CONTROL_PLANE}/brickyard-controllers"]
    redis = pods[f"{CONTROL_PLANE}/brickyard-redis"]
    secrets_job = pods[f"{CONTROL_PLANE}/brickyard-secrets"]
    engines = [(pods[f"{namespace_of(w)}/{w['metadata']['name']}"], w) for w in engine_workloads(objects)]
    envoy, scraper = outside["envoy"], outside["scraper"]
    settings = gateway_settings(objects)
    other_port = 8080  # nothing listens there; the default-deny answers
    expected: list[tuple[Pod, int, list[Pod]]] = [
        (
            redis,
            urlsplit(settings.redis_url).port or 6379,
            [gateway, controllers, *(pod for pod, _ in engines)],
        ),
        (gateway, settings.grpc_port, [envoy]),
        (gateway, settings.health_port, [envoy]),
        (gateway, settings.metrics_port, [scraper]),
        (gateway, settings.tenancy.admin_port, []),  # kubectl port-forward only
        (controllers, other_port, []),
        (secrets_job, other_port, []),
    ]
    for pod, workload in engines:
        sidecar = parse_command(container(workload, "sidecar"))
        expected += [
            (pod, int(template_labels(workload).get(PORT_LABEL, "8000")), [envoy, controllers]),
            (pod, sidecar.port, [controllers]),
            (pod, sidecar.metrics_port, [scraper]),
            (pod, other_port, []),
        ]
    errors = []
    for dest, port, allowed_sources in expected:
        got = {str(s) for s in everyone if s is not dest and admits(policies, s, dest, port)}
        want = {str(s) for s in allowed_sources}
        if got != want:
            errors.append(f"{dest}:{port} admits {sorted(got)}, expected {sorted(want)}")
    assert not errors, "\n".join(errors)


# --- closed by default: credentials, Envoy's client limits -----------------------------------------------


def test_redis_and_its_clients_use_the_generated_password(objects: tuple[dict[str, Any], ...]) -> None:
    password = {"name": CREDENTIALS, "key": REDIS_PASSWORD[1]}  # no `optional`: no Secret, no start
    redis = container(one(objects, "Deployment", "brickyard-redis", CONTROL_PLANE), "redis")
    argv = [*redis.get("command", []), *redis["args"]]
    assert "--requirepass" in argv
    variable = re.fullmatch(r"\$\((\w+)\)", argv[argv.index("--requirepass") + 1])
    assert variable, "--requirepass takes the password from the environment"
    assert secret_ref(redis, variable[1]) == password
    # The probe authenticates: redis-cli reads REDISCLI_AUTH.
    auth = next(e for e in redis["env"] if e["name"] == "REDISCLI_AUTH")
    assert auth.get("value") == variable[0] or secret_ref(redis, "REDISCLI_AUTH") == password
    assert "redis-cli" in " ".join(redis["readinessProbe"]["exec"]["command"])
    clients = [
        container(gateway_deployment(objects), "gateway"),
        container(one(objects, "Deployment", "brickyard-controllers", CONTROL_PLANE), "controllers"),
        *(container(w, "sidecar") for w in engine_workloads(objects)),
    ]
    assert [c["name"] for c in clients if secret_ref(c, REDIS_PASSWORD[0]) != password] == []
    # The URLs carry no password: they sit in ConfigMaps and command lines.
    urls = [
        gateway_settings(objects).redis_url,
        controllers_settings(objects).redis_url,
        *(parse_command(container(w, "sidecar")).redis_url for w in engine_workloads(objects)),
    ]
    assert all(url and urlsplit(url).password is None for url in urls), urls


def test_the_sidecar_api_takes_the_token_the_controllers_send(objects: tuple[dict[str, Any], ...]) -> None:
    token = {"name": CREDENTIALS, "key": SIDECAR_TOKEN[1]}
    controllers = container(one(objects, "Deployment", "brickyard-controllers", CONTROL_PLANE), "controllers")
    assert secret_ref(controllers, SIDECAR_TOKEN[0]) == token
    for workload in engine_workloads(objects):
        sidecar = container(workload, "sidecar")
        assert secret_ref(sidecar, SIDECAR_TOKEN[0]) == token, ident(workload)
        args = parse_command(sidecar)
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        # On the pod network (the controllers call it), metrics alone on a port of their own.
        assert args.listen_host == "0.0.0.0"
        assert ports["sidecar"] == args.port
        assert ports["metrics"] == args.metrics_port != args.port
        # No Service leads to the adapter API: the controllers call pods.
        for service in find(objects, "Service", namespace=namespace_of(workload)):
            if selects(service["spec"]["selector"], template_labels(workload)):
                assert not [
                    p for p in service["spec"]["ports"] if p.get("targetPort") in ("sidecar", args.port)
                ], ident(service)


def test_the_secrets_job_makes_every_secret_the_pods_read(objects: tuple[dict[str, Any], ...]) -> None:
    job = one(objects, "Job", "brickyard-secrets", CONTROL_PLANE)
    # A finished Job must go away, or the next apply would not run it again; failures are retried.
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["backoffLimit"] > 0
    (ensure,) = pod_spec(job)["containers"]
    args = parse_command(ensure)
    assert (args.command, args.action, args.namespace, args.name) == (
        "secrets",
        "ensure",
        CONTROL_PLANE,
        CREDENTIALS,
    )
    made = {args.namespace, *args.copy_to}
    errors = [
        f"{ident(w)}/{c['name']}: {e['name']} from {ref}"
        for w in workloads(objects)
        for c in pod_spec(w)["containers"]
        for e in c.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef", {})).get("name") == CREDENTIALS
        and (namespace_of(w) not in made or ref["key"] not in args.key or ref.get("optional"))
    ]
    assert not errors, "\n".join(errors)
    # Its account may create Secrets, and read and update that one, where it makes it; nothing else.
    account = (CONTROL_PLANE, pod_spec(job)["serviceAccountName"])
    minimal = {
        ("", "secrets", (), ("create",)),
        ("", "secrets", (CREDENTIALS,), ("get", "update")),
    }
    for namespace in namespaces(objects):
        rules = {
            (
                *rule["apiGroups"],
                *rule["resources"],
                tuple(rule.get("resourceNames", [])),
                tuple(sorted(rule["verbs"])),
            )
            for role in bound_roles(objects, account, namespace)
            for rule in role["rules"]
        }
        assert rules == (minimal if namespace in made else set()), namespace


GLOBAL_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"
HCM = "envoy.filters.network.http_connection_manager"


def seconds(duration: str) -> float:
    """A duration as Envoy and Gateway API write it (``90s``, ``1m30s``, ``500ms``), in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def quantity_bytes(quantity: str | int) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(quantity))
    assert match, quantity
    return int(match[1]) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match[2]]


def test_envoy_gateway_keeps_the_standalone_client_limits(objects: tuple[dict[str, Any], ...]) -> None:
    """The proxies Envoy Gateway runs take clients on the terms of the standalone envoy/aibrix.yaml."""
    config = yaml.safe_load((REPO / "envoy" / "aibrix.yaml").read_text())
    (listener,) = config["static_resources"]["listeners"]
    filters = {f["name"]: f["typed_config"] for f in listener["filter_chains"][0]["filters"]}
    hcm = filters[HCM]
    (monitor,) = [
        m for m in config["overload_manager"]["resource_monitors"] if m["name"] == GLOBAL_CONNECTIONS
    ]
    global_limit = monitor["typed_config"]["max_active_downstream_connections"]

    gateway = one(objects, "Gateway", "brickyard", CONTROL_PLANE)
    target = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "brickyard"}
    (policy,) = [p for p in find(objects, "ClientTrafficPolicy") if target in p["spec"]["targetRefs"]]
    spec = policy["spec"]
    timeouts = {k: seconds(v) for k, v in spec["timeout"]["http"].items()}
    assert timeouts == {
        "requestReceivedTimeout": seconds(hcm["request_timeout"]),
        "idleTimeout": seconds(hcm["common_http_protocol_options"]["idle_timeout"]),
        "streamIdleTimeout": seconds(hcm["stream_idle_timeout"]),
    }
    assert quantity_bytes(spec["connection"]["bufferLimit"]) == listener["per_connection_buffer_limit_bytes"]
    assert spec["connection"]["connectionLimit"] == {
        "value": filters["envoy.filters.network.connection_limit"]["max_connections"]
    }
    assert spec["connection"]["connectionLimit"]["value"] <= global_limit
    assert spec["http2"]["maxConcurrentStreams"] == hcm["http2_protocol_options"]["max_concurrent_streams"]
    underscores = {"DROP_HEADER": "DropHeader", "REJECT_REQUEST": "RejectRequest", "ALLOW": "Allow"}
    action = hcm["common_http_protocol_options"]["headers_with_underscores_action"]
    assert spec["headers"]["withUnderscoresAction"] == underscores[action]
    # The global limit: a patch of Envoy Gateway's bootstrap (overload manager), in the Gateway's EnvoyProxy.
    ref = gateway["spec"]["infrastructure"]["parametersRef"]
    bootstrap = one(objects, ref["kind"], ref["name"], CONTROL_PLANE)["spec"]["bootstrap"]
    assert bootstrap == {
        "type": "JSONPatch",
        "jsonPatches": [
            {
                "op": "replace",
                "jsonPath": f"$.overload_manager.resource_monitors[?(@.name=='{GLOBAL_CONNECTIONS}')]"
                ".typed_config.max_active_downstream_connections",
                "value": global_limit,
            }
        ],
    }
    # The request headers timeout, which no ClientTrafficPolicy field sets: patched into the HTTP connection
    # manager of each of the Gateway's listeners.
    patched = {
        patch["name"]: patch["operation"]
        for p in find(objects, "EnvoyPatchPolicy")
        if p["spec"]["targetRef"]["name"] == gateway["metadata"]["name"]
        for patch in p["spec"]["jsonPatches"]
        if patch["type"].endswith(".Listener")
    }
    assert patched == {
        f"{CONTROL_PLANE}/brickyard/{lis['name']}": {
            "op": "add",
            "jsonPath": f"$.default_filter_chain.filters[?(@.name=='{HCM}')].typed_config",
            "path": "/request_headers_timeout",
            "value": hcm["request_headers_timeout"],
        }
        for lis in gateway["spec"]["listeners"]
    }


# --- contracts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [o for o in OVERLAYS if o != "heterogeneous"])
def test_aibrix_contract_on_envoy_gateway(name: str) -> None:
    objects = build(name)
    settings = gateway_settings(objects)
    assert settings.contract == "aibrix"
    assert not find(objects, "InferencePool")
    route = one(objects, "HTTPRoute", "brickyard-openai", "brickyard-system")
    assert {m["path"]["value"] for r in route["spec"]["rules"] for m in r["matches"]} == set(OPENAI_PATHS)

    extension = one(objects, "EnvoyExtensionPolicy", "brickyard-ext-proc", "brickyard-system")
    assert extension["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "brickyard-openai"}
    ]
    (ext_proc,) = extension["spec"]["extProc"]
    assert ext_proc["backendRefs"] == [{"name": "brickyard-gateway", "port": settings.grpc_port}]
    # Buffered request bodies; response phase only when the gateway asks for it (mode override).
    assert ext_proc["processingMode"] == {"request": {"body": "Buffered"}, "allowModeOverride": True}
    assert DECISION_NAMESPACE in ext_proc["metadata"]["writableNamespaces"]
    assert ext_proc.get("failOpen") is False

    patch = one(objects, "EnvoyPatchPolicy", "brickyard-original-dst", "brickyard-system")
    gateway = one(objects, "Gateway", patch["spec"]["targetRef"]["name"], "brickyard-system")
    route_configs = {
        f"brickyard-system/{gateway['metadata']['name']}/{lis['name']}"
        for lis in gateway["spec"]["listeners"]
    }
    clusters = {
        p["operation"]["value"]["name"]: p["operation"]["value"]
        for p in patch["spec"]["jsonPatches"]
        if p["type"].endswith("Cluster")
    }
    (cluster,) = clusters.values()
    assert (cluster["type"], cluster["lb_policy"], cluster["connect_timeout"]) == (
        "ORIGINAL_DST",
        "CLUSTER_PROVIDED",
        "6s",
    )
    assert cluster["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": "target-pod"}
    routes = [p for p in patch["spec"]["jsonPatches"] if p["type"].endswith("RouteConfiguration")]
    assert routes
    # The name Envoy Gateway gives the policy's filter: envoyextensionpolicy/<namespace>/<name>/extproc/<i>.
    filter_name = "envoy.filters.http.ext_proc/envoyextensionpolicy/{}/{}/extproc/0".format(
        extension["metadata"]["namespace"], extension["metadata"]["name"]
    )
    for p in routes:
        assert p["name"] in route_configs
        assert (p["operation"]["op"], p["operation"]["path"]) == ("add", "/virtual_hosts/0/routes/0")
        value = p["operation"]["value"]
        assert value["route"]["cluster"] in clusters
        assert value["route"]["timeout"] == "0s", "no fixed timeout: it cuts long generations"
        assert filter_name in value["typed_per_filter_config"], (
            "the ext_proc filter must run on the patched route"
        )
        metadata_keys = set(re.findall(rf"%DYNAMIC_METADATA\({DECISION_NAMESPACE}:(\w+)\)%", str(value)))
        assert metadata_keys <= DECISION_KEYS and "pod" in metadata_keys
    matches = [p["operation"]["value"]["match"] for p in routes]
    assert {"name": "routing-strategy", "present_match": True} in [
        h for m in matches for h in m.get("headers", [])
    ]
    regexes = [re.compile(m["safe_regex"]["regex"]) for m in matches if "safe_regex" in m]
    for path in OPENAI_PATHS:
        assert any(r.fullmatch(path) for r in regexes), f"{path} does not reach the ORIGINAL_DST cluster"


def test_inference_extension_contract() -> None:
    objects = build("heterogeneous")
    settings = gateway_settings(objects)
    assert settings.contract == "epp"
    # The AIBrix contract's ext_proc filter and ORIGINAL_DST cluster and routes are gone.
    assert not find(objects, "EnvoyExtensionPolicy")
    assert not [
        ident(p)
        for p in find(objects, "EnvoyPatchPolicy")
        if any(
            patch["type"].endswith((".Cluster", ".RouteConfiguration")) for patch in p["spec"]["jsonPatches"]
        )
    ]
    (pool,) = find(objects, "InferencePool")
    ns, spec = pool["metadata"]["namespace"], pool["spec"]
    # The gateway sees exactly the pool's pods.
    assert settings.discovery.namespace == ns
    assert set(settings.discovery.label_selector.split(",")) == {
        f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items()
    }
    picker = one(objects, "Service", spec["endpointPickerRef"]["name"], ns)
    assert picker["spec"]["selector"] == gateway_deployment(objects)["spec"]["selector"]["matchLabels"]
    grpc = service_port(picker, spec["endpointPickerRef"]["port"]["number"])
    assert grpc is not None and grpc["targetPort"] == "grpc" and grpc["appProtocol"] == "kubernetes.io/h2c"
    assert settings.grpc_port == spec["endpointPickerRef"]["port"]["number"]
    assert service_port(picker, settings.health_port) is not None
    assert spec["endpointPickerRef"]["failureMode"] == "FailClose"
    pods = selected_workloads(objects, spec["selector"]["matchLabels"], ns)
    assert {int(template_labels(w)[PORT_LABEL]) for w in pods} == {p["number"] for p in spec["targetPorts"]}
    routes = [
        r
        for r in find(objects, "HTTPRoute", namespace=ns)
        for rule in r["spec"]["rules"]
        for b in rule.get("backendRefs", [])
        if (b.get("kind"), b["name"]) == ("InferencePool", pool["metadata"]["name"])
    ]
    assert routes, "no HTTPRoute sends traffic to the pool"


# --- each overlay's promises -----------------------------------------------------------------------------


def test_dev_runs_emulated_engines_without_gpus() -> None:
    objects = build("dev")
    assert not [ident(w) for w in find(objects, "Deployment") if gpu_requests(w)]
    assert {ident(w): w["spec"].get("replicas", 1) for w in find(objects, "Deployment")} == {
        ident(w): 1 for w in find(objects, "Deployment")
    }
    assert not gateway_settings(objects).tenancy.enabled
    for workload in engine_workloads(objects):
        engine = container(workload, "engine")
        assert engine["command"][:2] == ["brickyard", "emulator"]
        assert "--profile=llama-3.1-8b_l4" in engine["command"]
        assert "--enable-lora" in engine["command"], "the sample ModelAdapter needs LoRA support"
    assert not [
        c["image"]
        for w in find(objects, "Deployment")
        for c in pod_spec(w)["containers"]
        if "vllm" in c["image"]
    ]


def test_prod_is_highly_available_with_tenancy() -> None:
    objects = build("prod")
    gateway = gateway_deployment(objects)
    assert gateway["spec"]["replicas"] == 2
    terms = pod_spec(gateway)["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"], template_labels(gateway))
        for t in terms
    )
    pdbs = [
        p
        for p in find(objects, "PodDisruptionBudget")
        if selects(p["spec"]["selector"]["matchLabels"], template_labels(gateway))
    ]
    assert [p["spec"].get("minAvailable") for p in pdbs] == [1]
    for engine in engine_workloads(objects):
        assert engine["spec"]["replicas"] >= 2
        assert [
            p["spec"]["minAvailable"]
            for p in find(objects, "PodDisruptionBudget")
            if selects(p["spec"]["selector"]["matchLabels"], template_labels(engine))
        ] == [1]
    settings = gateway_settings(objects)
    assert settings.tenancy.enabled and settings.tenancy.require_api_key
    images = {c["image"] for w in workloads(objects) for c in pod_spec(w)["containers"]}
    assert not [i for i in images if i.endswith(":latest") or ":" not in i.rsplit("/", 1)[-1]], images
    proxy = one(objects, "EnvoyProxy", "brickyard-proxy", "brickyard-system")
    kube = proxy["spec"]["provider"]["kubernetes"]
    assert kube["envoyDeployment"]["replicas"] == 2 and kube["envoyPDB"]["minAvailable"] == 1
    redis = one(objects, "Deployment", "brickyard-redis", "brickyard-system")
    assert any("persistentVolumeClaim" in v for v in pod_spec(redis)["volumes"]), (
        "users and keys must survive restarts"
    )


def test_heterogeneous_has_two_gpu_pools_and_gpu_type_routing() -> None:
    objects = build("heterogeneous")
    engines = engine_workloads(objects)
    types = [template_labels(w).get(GPU_LABEL) for w in engines]
    assert len(types) == 2 and len(set(types)) == 2 and None not in types, types
    for workload, gpu in zip(engines, types, strict=True):
        assert pod_spec(workload)["nodeSelector"] == {GPU_LABEL: gpu}
        assert gpu_requests(workload) == ["engine"]
    settings = gateway_settings(objects)
    gpu_type = settings.routing.gpu_type
    assert gpu_type.label == GPU_LABEL
    assert set(gpu_type.profiles) == set(types)
    models = {template_labels(w)[MODEL_LABEL] for w in engines}
    assert {
        settings.models[m].routing_strategy if m in settings.models else settings.default_strategy
        for m in models
    } == {"gpu-type"}
    (pool,) = find(objects, "InferencePool")
    assert (
        len(
            selected_workloads(
                objects, pool["spec"]["selector"]["matchLabels"], pool["metadata"]["namespace"]
            )
        )
        == 2
    )


# --- our CRDs, and custom resources against them ------------------------------------------------------------


def schema_nodes(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path or ".", schema
    for key, child in schema.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from schema_nodes(schema[key], f"{path}[{key}]")


@pytest.mark.parametrize("key", sorted(our_crds()), ids=lambda k: k[1])
def test_crd_is_structural_and_its_rules_compile(key: tuple[str, str]) -> None:
    crd = our_crds()[key]
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator.check_schema(schema)
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["subresources"] == {"status": {}}, "status subresource, no scale subresource"
    for path, node in schema_nodes(schema):
        # Structural: every node has a type (the API server refuses the CRD otherwise).
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if "default" in node:
            assert not list(jsonschema.Draft4Validator(node).iter_errors(node["default"])), (
                f"{path}: bad default"
            )
        for rule in node.get("x-kubernetes-validations", []):
            cel_program(rule["rule"])
            assert rule["message"]
            # The API server bounds a rule's cost: a list a rule iterates needs maxItems.
            for field in re.findall(r"self\.(\w+)\.(?:all|exists|exists_one|map|filter)\(", rule["rule"]):
                assert "maxItems" in node["properties"][field], f"{path}.{field}: iterated without maxItems"
            if "fieldPath" in rule:
                assert rule["fieldPath"].lstrip(".") in node["properties"], f"{path}: bad fieldPath"
    for column in version["additionalPrinterColumns"]:
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = schema
        for part in parts:
            node = node["properties"][part]
        assert node["type"] == column["type"] or column["type"] == "date", column


def sample(kind: str) -> dict[str, Any]:
    path = {"ModelAdapter": "modeladapter.yaml", "PodAutoscaler": "podautoscaler.yaml"}[kind]
    return yaml.safe_load((DEPLOY / "samples" / path).read_text())


DELETE = object()


def mutated(obj: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    for dotted, value in changes.items():
        *parents, leaf = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        node = obj
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return obj


@pytest.mark.parametrize("kind", ["ModelAdapter", "PodAutoscaler"])
def test_samples_validate(kind: str) -> None:
    assert crd_errors(sample(kind)) == []


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        ("ModelAdapter", {"spec.artifactURL": "s3://bucket/adapters/sql"}),
        ("ModelAdapter", {"spec.artifactURL": "gcs://bucket/adapters/sql"}),
        ("ModelAdapter", {"spec.artifactURL": "hf://org/repo@main"}),
        ("ModelAdapter", {"spec.artifactURL": "https://example.com/adapter.tar.gz"}),
        ("ModelAdapter", {"spec.artifactURL": "/models/adapters/sql"}),
        ("ModelAdapter", {"spec.replicas": DELETE, "spec.schedulerName": DELETE, "spec.baseModel": DELETE}),
        ("ModelAdapter", {"spec.podSelector": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}}),
        (
            "ModelAdapter",
            {"spec.credentialsSecretRef": {"name": "s3"}, "spec.additionalConfig": {"rank": "8"}},
        ),
        (
            "ModelAdapter",
            {
                "status": {
                    "phase": "Running",
                    "instances": ["engine-0"],
                    "readyReplicas": 1,
                    "desiredReplicas": 1,
                    "failedAttempts": 0,
                    "nextRetryTime": "2025-01-01T00:00:05.000000Z",
                    "observedGeneration": 3,
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "lastTransitionTime": "2025-01-01T00:00:00Z",
                            "reason": "AllReplicasReady",
                            "message": "loaded on 1 of 1 pods",
                        }
                    ],
                }
            },
        ),
        ("PodAutoscaler", {"spec.minReplicas": 0}),
        (
            "PodAutoscaler",
            {"spec.scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "x"}},
        ),
        ("PodAutoscaler", {"spec.minReplicas": DELETE, "spec.panicWindowSeconds": DELETE}),
        (
            "PodAutoscaler",
            {
                "spec.scalingStrategy": "HPA",
                "spec.metricsSources": [
                    {"metricSourceType": "resource", "targetMetric": "cpu", "targetValue": "80"}
                ],
            },
        ),
        ("PodAutoscaler", {"spec.scalingStrategy": "HPA", "spec.metricsSources": DELETE}),
        (
            "PodAutoscaler",
            {
                "spec.metricsSources": [
                    {
                        "metricSourceType": "domain",
                        "endpoint": "metrics.llm.svc:8080",
                        "targetMetric": "queue_depth",
                        "targetValue": "10",
                    }
                ]
            },
        ),
        (
            "PodAutoscaler",
            {
                "spec.scalingStrategy": "APA",
                "spec.metricsSources": [
                    {
                        "metricSourceType": "pod",
                        "protocolType": "http",
                        "port": "8000",
                        "path": "/metrics",
                        "targetMetric": "vllm:gpu_cache_usage_perc",
                        "targetValue": "0.5",
                    }
                ],
                "spec.upTolerance": 0.2,
            },
        ),
    ],
)
def test_valid_variants_are_accepted(kind: str, changes: Mapping[str, Any]) -> None:
    assert crd_errors(mutated(sample(kind), changes)) == []


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("ModelAdapter", {"spec.artifactURL": DELETE}, "'artifactURL' is a required property"),
        ("ModelAdapter", {"spec.podSelector": DELETE}, "'podSelector' is a required property"),
        ("ModelAdapter", {"spec.artifactURL": "ftp://host/adapter.tar"}, "does not match"),
        ("ModelAdapter", {"spec.artifactURL": "adapters/sql"}, "does not match"),
        ("ModelAdapter", {"spec.schedulerName": "spread"}, "'spread' is not one of"),
        ("ModelAdapter", {"spec.podSelector": {}}, "podSelector must not be empty"),
        ("ModelAdapter", {"spec.podSelector": {"matchLabels": {}}}, "podSelector must not be empty"),
        ("ModelAdapter", {"spec.replicas": 0}, "less than the minimum"),
        ("ModelAdapter", {"spec.credentialsSecretRef": {}}, "'name' is a required property"),
        (
            "ModelAdapter",
            {"spec.podSelector.matchExpressions": [{"key": "a", "operator": "Near"}]},
            "'Near' is not one of",
        ),
        ("ModelAdapter", {"spec.additionalConfig": {"rank": 8}}, "is not of type 'string'"),
        ("ModelAdapter", {"spec.baseModels": "llama"}, "spec.baseModels: unknown field"),
        ("ModelAdapter", {"status": {"phase": "Ready"}}, "'Ready' is not one of"),
        ("PodAutoscaler", {"spec.minReplicas": 5}, "minReplicas must not exceed maxReplicas"),
        ("PodAutoscaler", {"spec.maxReplicas": 0}, "less than the minimum"),
        ("PodAutoscaler", {"spec.maxReplicas": DELETE}, "'maxReplicas' is a required property"),
        ("PodAutoscaler", {"spec.scaleTargetRef": DELETE}, "'scaleTargetRef' is a required property"),
        ("PodAutoscaler", {"spec.scaleTargetRef.kind": DELETE}, "'kind' is a required property"),
        # Only the kinds the controllers' ClusterRole may scale.
        ("PodAutoscaler", {"spec.scaleTargetRef.kind": "InferenceSet"}, "'InferenceSet' is not one of"),
        (
            "PodAutoscaler",
            {"spec.scaleTargetRef.apiVersion": "example.dev/v1"},
            "'example.dev/v1' is not one of",
        ),
        ("PodAutoscaler", {"spec.scalingStrategy": "XPA"}, "'XPA' is not one of"),
        ("PodAutoscaler", {"spec.scalingStrategy": "HPA"}, "redis sources need KPA or APA"),
        (
            "PodAutoscaler",
            {
                "spec.scalingStrategy": "HPA",
                "spec.minReplicas": 0,
                "spec.metricsSources": [
                    {"metricSourceType": "resource", "targetMetric": "cpu", "targetValue": "80"}
                ],
            },
            "HPA cannot scale to zero",
        ),
        (
            "PodAutoscaler",
            {"spec.panicWindowSeconds": 300},
            "panicWindowSeconds must not exceed stableWindowSeconds",
        ),
        ("PodAutoscaler", {"spec.panicThreshold": 1.0}, "less than or equal to the minimum"),
        ("PodAutoscaler", {"spec.upTolerance": 1.5}, "greater than"),
        ("PodAutoscaler", {"spec.scaleDownCooldownSeconds": -1}, "less than the minimum"),
        ("PodAutoscaler", {"spec.metricsSources": []}, "metricsSources"),
        (
            "PodAutoscaler",
            {"spec.metricsSources.0.metricSourceType": "prometheus"},
            "'prometheus' is not one of",
        ),
        ("PodAutoscaler", {"spec.metricsSources": DELETE}, "KPA and APA need metricsSources"),
        (
            "PodAutoscaler",
            {
                "spec.metricsSources.0.metricSourceType": "resource",
                "spec.metricsSources.0.targetMetric": "cpu",
            },
            "resource and custom metrics need scalingStrategy HPA",
        ),
        ("PodAutoscaler", {"spec.metricsSources.0.targetValue": "lots"}, "does not match"),
        ("PodAutoscaler", {"spec.metricsSources.0.targetValue": "800m"}, "does not match"),
        ("PodAutoscaler", {"spec.metricsSources.0.targetValue": 4}, "is not of type 'string'"),
        ("PodAutoscaler", {"spec.metricsSources.0.metricSourceType": "pod"}, "pod sources need the port"),
        ("PodAutoscaler", {"spec.metricsSources.0.metricSourceType": "external"}, "need an endpoint"),
        ("PodAutoscaler", {"spec.metricsSources.0.metricSourceType": "domain"}, "need an endpoint"),
        (
            "PodAutoscaler",
            {
                "spec.scalingStrategy": "HPA",
                "spec.metricsSources.0.metricSourceType": "resource",
                "spec.metricsSources.0.targetMetric": "gpu",
            },
            "resource sources scale on cpu or memory",
        ),
        ("PodAutoscaler", {"spec.maxReplica": 4}, "spec.maxReplica: unknown field"),
    ],
)
def test_broken_custom_resources_are_rejected(kind: str, changes: Mapping[str, Any], message: str) -> None:
    errors = crd_errors(mutated(sample(kind), changes))
    assert any(message in e for e in errors), errors


AIBRIX_PORTED = """
apiVersion: brickyard.dev/v1alpha1   # was autoscaling.aibrix.ai/v1alpha1
kind: PodAutoscaler
metadata: {name: llama2-7b, namespace: default}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: llama2-7b}
  minReplicas: 1
  maxReplicas: 8
  metricsSources:
  - metricSourceType: pod
    protocolType: http
    path: /metrics
    port: "8000"
    targetMetric: gpu_cache_usage_perc
    targetValue: "50"
  scalingStrategy: KPA
---
apiVersion: brickyard.dev/v1alpha1   # was model.aibrix.ai/v1alpha1
kind: ModelAdapter
metadata: {name: text2sql-lora, namespace: default}
spec:
  baseModel: llama2-7b
  podSelector:
    matchLabels: {model.aibrix.ai/name: llama2-7b, adapter.model.aibrix.ai/enabled: "true"}
  artifactURL: huggingface://yard1/llama-2-7b-sql-lora-test
  replicas: 1
"""


def test_aibrix_yaml_ports_by_changing_api_version() -> None:
    for obj in yaml.safe_load_all(AIBRIX_PORTED):
        assert crd_errors(obj) == [], obj["kind"]
