"""Custom resources against their CRD's structural schema, admitted as the Kubernetes API server admits them.

One implementation for the API stand-in (every write of a custom resource, tests/support/kube_api.py) and
for tests/deploy (our CRDs, their samples, the built overlays), so both hold objects to the same rules.
The steps are the API server's, in its order:

1. pruning: fields the schema does not declare are dropped, except under
   ``x-kubernetes-preserve-unknown-fields`` (``apiVersion``, ``kind`` and ``metadata`` of the object and of
   ``x-kubernetes-embedded-resource`` fields are the server's own business);
2. defaulting, top down: ``default:`` fills absent fields and non-nullable nulls; other non-nullable
   nulls are dropped;
3. the OpenAPI v3 schema, which is JSON Schema draft 4 (required, type, enum, minimum/maximum and their
   exclusive forms, pattern, lengths, item counts) plus ``nullable``, ``x-kubernetes-int-or-string``,
   ``format: date-time`` and the uniqueness of ``x-kubernetes-list-type`` set and map lists;
4. once the object has the right shape, the ``x-kubernetes-validations`` CEL rules (cel-python), with
   ``oldSelf`` on updates wherever the old object has the value (transition rules), ``number`` fields as
   doubles like Kubernetes' CEL;
5. on updates, ratcheting (Kubernetes 1.30 on): an error about a value the update leaves as it was is
   dropped, so an object stored under looser rules can still be written (its status, say). Type errors,
   list uniqueness and transition rules do not ratchet; values inside atomic lists cannot be told apart.

Every refusal is a ``FieldError`` that reads like the server's ``field.Error``
(``spec.podSelector: Required value: ...``), with JSON Schema's wording as the detail.

Not modelled: CEL cost budgets, the Kubernetes CEL library beyond cel-python's standard functions,
``messageExpression`` and ``reason``, formats other than date-time.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import celpy
import jsonschema
import yaml
from celpy import celtypes
from jsonschema.exceptions import ValidationError

__all__ = [
    "DEPLOY_CRDS",
    "THIRD_PARTY_CRDS",
    "Admission",
    "FieldError",
    "SchemaError",
    "StructuralSchema",
    "cel_program",
    "known_crds",
    "load_crds",
]

Obj = dict[str, Any]
Schema = Mapping[str, Any]
Parts = tuple[str | int, ...]

#: Our CRDs, as deployed.
DEPLOY_CRDS = Path(__file__).resolve().parents[2] / "deploy" / "base" / "crds"
#: Third-party CRDs whose objects our controllers write, as far as they write them (see each file).
THIRD_PARTY_CRDS = Path(__file__).with_name("crds")

# field.ErrorType strings, as they appear in the server's messages.
REQUIRED = "Required value"
INVALID = "Invalid value"
UNSUPPORTED = "Unsupported value"
TOO_MANY = "Too many"
TOO_LONG = "Too long"
DUPLICATE = "Duplicate value"

_NO_VALUE = object()
#: Kept on the object and on embedded resources whatever the schema says: the server's own fields.
_SERVER_FIELDS = frozenset({"apiVersion", "kind", "metadata"})
_TRANSITION = re.compile(r"\boldSelf\b")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True)
class FieldError:
    """Why one field is refused; ``str()`` is ``<field>: <body>``, the server's ``field.Error`` text."""

    type: str
    field: str
    detail: str = ""
    value: Any = _NO_VALUE
    #: The value whose staying unchanged excuses the error on an update (ratcheting); None: nothing does.
    ratchets_on: Parts | None = field(default=None, compare=False, repr=False)

    @property
    def body(self) -> str:
        """``field.Error.ErrorBody()``: the type, the bad value when there is one, the detail."""
        body = self.type if self.value is _NO_VALUE else f"{self.type}: {_go_value(self.value)}"
        return f"{body}: {self.detail}" if self.detail else body

    def __str__(self) -> str:
        return f"{self.field}: {self.body}" if self.field else self.body


class SchemaError(ValueError):
    """A schema the API server would not take (a rule that does not compile); fields are schema paths."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(", ".join(map(str, errors)))
        self.errors = errors


class Admission(NamedTuple):
    """What admission did to an object: the fields it pruned, and why it refuses the object (if it does)."""

    pruned: list[str]
    errors: list[FieldError]


def _go_value(value: Any) -> str:
    """A bad value as Go's ``%#v`` prints the scalars (strings quoted); containers as JSON."""
    return json.dumps(value, separators=(",", ":"))


def _json_type(value: Any) -> str:
    """The JSON type name the server reports for a value of the wrong type (and for CEL failures)."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "null" if value is None else "string"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _field(parts: Parts) -> str:
    """``spec.metricsSources[0].port``: a field path as the server writes it."""
    path = ""
    for part in parts:
        path = _join(path, part)
    return path


# --- pruning and defaulting ------------------------------------------------------------------------------


def _child_schema(schema: Schema, key: str) -> Schema | None:
    """The schema of property ``key`` of an object described by ``schema``; None if it declares none."""
    properties = schema.get("properties") or {}
    if key in properties:
        return properties[key]
    additional = schema.get("additionalProperties")
    return additional if isinstance(additional, dict) else None


def _prune(schema: Schema, value: Any, path: str, embedded: bool) -> Iterator[str]:
    """Drop, in place, what ``schema`` does not declare; yield the dropped fields' paths."""
    if isinstance(value, dict):
        preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
        for key in list(value):
            if embedded and key in _SERVER_FIELDS:
                continue
            child = _child_schema(schema, key)
            if child is not None:
                embeds = child.get("x-kubernetes-embedded-resource", False)
                yield from _prune(child, value[key], _join(path, key), embeds)
            elif not preserve:
                del value[key]
                yield _join(path, key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        for i, item in enumerate(value):
            yield from _prune(items, item, _join(path, i), items.get("x-kubernetes-embedded-resource", False))


def _default(schema: Schema, value: Any) -> None:
    """Apply ``default:`` values in place, top down (a defaulted object gets its own defaults too)."""
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key in value and value[key] is None and not prop.get("nullable"):
                del value[key]  # a non-nullable null is pruned, then defaulted like an absent field
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
        for key, item in value.items():
            child = _child_schema(schema, key)
            if child is not None:
                _default(child, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


# --- the OpenAPI schema -----------------------------------------------------------------------------------

_DRAFT4 = jsonschema.Draft4Validator.VALIDATORS


def _type(validator: Any, types: Any, instance: Any, schema: Schema) -> Iterator[ValidationError]:
    if instance is None and schema.get("nullable"):
        return
    yield from _DRAFT4["type"](validator, types, instance, schema)


def _required(
    validator: Any, required: list[str], instance: Any, schema: Schema
) -> Iterator[ValidationError]:
    """Draft 4's ``required``, with the error on the missing field (the server's path) not its parent."""
    if isinstance(instance, dict):
        for name in required:
            if name not in instance:
                yield ValidationError(f"{name!r} is a required property", path=(name,))


def _int_or_string(validator: Any, enabled: bool, instance: Any, schema: Schema) -> Iterator[ValidationError]:
    if (
        enabled
        and not isinstance(instance, str)
        and (isinstance(instance, bool) or not isinstance(instance, int))
    ):
        yield ValidationError(f"{instance!r} is not of type 'integer' or 'string'")


def _list_type(validator: Any, list_type: str, instance: Any, schema: Schema) -> Iterator[ValidationError]:
    """Sets hold distinct items; maps distinct ``x-kubernetes-list-map-keys``."""
    if not isinstance(instance, list) or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys") or ()
    seen: list[Any] = []
    for i, item in enumerate(instance):
        identity = {k: item.get(k) for k in keys} if list_type == "map" and isinstance(item, dict) else item
        if identity in seen:
            yield ValidationError(f"{identity!r} is listed twice", path=(i,), instance=identity)
        seen.append(identity)


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("date-time")(lambda value: not isinstance(value, str) or bool(_DATE_TIME.match(value)))
_Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {
        "type": _type,
        "required": _required,
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-list-type": _list_type,
    },
)


def _field_error(error: ValidationError) -> FieldError:
    parts = tuple(error.absolute_path)
    at = _field(parts)
    match error.validator:
        case "required":  # ratchets on the object that lacks the field
            return FieldError(REQUIRED, at, error.message, ratchets_on=parts[:-1])
        case "enum":
            return FieldError(UNSUPPORTED, at, error.message, error.instance, parts)
        case "type" | "x-kubernetes-int-or-string":
            return FieldError(INVALID, at, error.message, _json_type(error.instance))
        case "maxItems":
            return FieldError(TOO_MANY, at, error.message, len(error.instance), parts)
        case "maxLength":
            return FieldError(TOO_LONG, at, error.message, ratchets_on=parts)
        case "x-kubernetes-list-type":
            return FieldError(DUPLICATE, at, error.message, error.instance)
    return FieldError(INVALID, at, error.message, error.instance, parts)


# --- CEL ------------------------------------------------------------------------------------------------

_CEL = celpy.Environment()


@functools.cache
def cel_program(rule: str) -> celpy.Runner:
    """The compiled rule (cached: a CRD's rules run on every write); ``celpy.CELParseError`` if invalid."""
    return _CEL.program(_CEL.compile(rule))


def _to_cel(schema: Schema, value: Any) -> Any:
    """``value`` as Kubernetes hands it to CEL: typed by its schema, so ``number`` fields are doubles."""
    if schema.get("type") == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(value)
    if isinstance(value, dict) and schema.get("type") == "object":
        return celtypes.MapType(
            {celtypes.StringType(k): _to_cel(_child_schema(schema, k) or {}, v) for k, v in value.items()}
        )
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return celtypes.ListType([_to_cel(schema["items"], item) for item in value])
    return celpy.json_to_cel(value)


def _rule_failure(rule: Mapping[str, Any], activation: dict[str, Any]) -> str | None:
    """Why the rule does not hold (its message), or None when it holds."""
    message = rule.get("message") or f"failed rule: {rule['rule']}"
    try:
        result = cel_program(rule["rule"]).evaluate(activation)
    except celpy.CELEvalError as err:
        return f"{message} (rule evaluation error: {err.args[0]})"
    return None if isinstance(result, celtypes.BoolType) and bool(result) else message


_ABSENT = object()


def _old_item(schema: Schema, old: Any, item: Any) -> Any:
    """The old list element ``item`` correlates with: same map keys in a ``map`` list, else none."""
    if (
        schema.get("x-kubernetes-list-type") != "map"
        or not isinstance(old, list)
        or not isinstance(item, dict)
    ):
        return _ABSENT
    keys = schema.get("x-kubernetes-list-map-keys") or ()
    return next(
        (o for o in old if isinstance(o, dict) and all(o.get(k) == item.get(k) for k in keys)),
        _ABSENT,
    )


def _rule_errors(schema: Schema, value: Any, old: Any, parts: Parts) -> Iterator[FieldError]:
    for rule in schema.get("x-kubernetes-validations") or ():
        transition = bool(_TRANSITION.search(rule["rule"]))
        if transition and old is _ABSENT:
            continue  # transition rules only run on updates that keep the value
        activation = {"self": _to_cel(schema, value)}
        if transition:
            activation["oldSelf"] = _to_cel(schema, old)
        failure = _rule_failure(rule, activation)
        if failure is not None:
            at = (
                _join(_field(parts), rule["fieldPath"].lstrip("."))
                if rule.get("fieldPath")
                else _field(parts)
            )
            yield FieldError(INVALID, at, failure, _json_type(value), None if transition else parts)
    if isinstance(value, dict):
        for key, item in value.items():
            child = _child_schema(schema, key)
            if child is not None:
                before = old.get(key, _ABSENT) if isinstance(old, dict) else _ABSENT
                yield from _rule_errors(child, item, before, (*parts, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _rule_errors(schema["items"], item, _old_item(schema, old, item), (*parts, i))


def _unchanged(schema: Schema, new: Any, old: Any, parts: Parts | None) -> bool:
    """Whether the value at ``parts`` is the same in the old object (only correlatable values are:
    through properties, map keys and the elements of ``map`` lists)."""
    if parts is None:
        return False
    for part in parts:
        if isinstance(part, int):
            old, new = _old_item(schema, old, new[part]), new[part]
            schema = schema.get("items") or {}
        else:
            old = old.get(part, _ABSENT) if isinstance(old, dict) else _ABSENT
            new = new.get(part, _ABSENT) if isinstance(new, dict) else _ABSENT
            schema = _child_schema(schema, part) or {}
        if old is _ABSENT:
            return False
    return new == old


def _uncompilable(schema: Schema, path: str = "") -> Iterator[FieldError]:
    """Rules that do not compile, at their place in the schema (``properties[spec]...``)."""
    for i, rule in enumerate(schema.get("x-kubernetes-validations") or ()):
        try:
            cel_program(rule["rule"])
        except celpy.CELParseError as err:
            at = _join(_join(path, "x-kubernetes-validations") + f"[{i}]", "rule")
            yield FieldError(INVALID, at, f"compilation failed: {err}", rule["rule"])
    for key, child in (schema.get("properties") or {}).items():
        yield from _uncompilable(child, f"{_join(path, 'properties')}[{key}]")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _uncompilable(schema[key], _join(path, key))


# --- the schema of one version ----------------------------------------------------------------------------


class StructuralSchema:
    """One CRD version's ``openAPIV3Schema``, its rules compiled; admits objects as the API server does."""

    def __init__(self, schema: Schema) -> None:
        errors = list(_uncompilable(schema))
        if errors:
            raise SchemaError(errors)
        self.schema = schema
        self._validator = _Validator(schema, format_checker=_FORMATS)

    def admit(self, obj: Obj, old: Obj | None = None) -> Admission:
        """Prune and default ``obj`` in place, then validate it (``old``: the stored object, on updates)."""
        pruned = list(_prune(self.schema, obj, "", embedded=True))
        _default(self.schema, obj)
        errors = self._ratchet(obj, old, (_field_error(e) for e in self._validator.iter_errors(obj)))
        if not errors:  # the server evaluates the rules on objects of the right shape
            before = _ABSENT if old is None else old
            errors = self._ratchet(obj, old, _rule_errors(self.schema, obj, before, ()))
        return Admission(pruned, errors)

    def _ratchet(self, obj: Obj, old: Obj | None, errors: Iterator[FieldError]) -> list[FieldError]:
        """The errors an update does not excuse by leaving their value as it was."""
        if old is None:
            return list(errors)
        return [e for e in errors if not _unchanged(self.schema, obj, old, e.ratchets_on)]


def load_crds(directory: Path) -> list[Obj]:
    """The CRD manifests in ``directory``, by file name."""
    return [yaml.safe_load(path.read_text()) for path in sorted(directory.glob("*.yaml"))]


def known_crds() -> dict[str, Obj]:
    """Ours and the third-party CRDs, by name (``modeladapters.brickyard.dev``): what tests register."""
    return {crd["metadata"]["name"]: crd for d in (DEPLOY_CRDS, THIRD_PARTY_CRDS) for crd in load_crds(d)}
