"""Build typed configuration dataclasses from YAML data, strictly.

Every component keeps its settings in one dataclass tree with documented
defaults; this loader turns YAML mappings into that tree and rejects unknown
keys and wrong types with the path of the offending setting.

Settings come in layers, so that a deployment states each value once: several
files (a directory stands for its YAML files in name order), then dotted
overrides. A later layer overrides an earlier one key by key: mappings merge
recursively, lists and scalars are replaced whole. An error names the file that
set the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

T = TypeVar("T")

#: What a directory given as configuration stands for: its files with these suffixes.
YAML_SUFFIXES = frozenset({".yaml", ".yml"})


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""

    def __init__(self, message: str, setting: str = "") -> None:
        super().__init__(message)
        #: Dotted path of the offending setting; empty when the problem is not one setting's.
        self.setting = setting


class Layer(NamedTuple):
    """One mapping of settings and where it came from: a file, named in its errors; None for overrides."""

    source: str | None
    data: Mapping[str, Any]


def load(
    cls: type[T],
    paths: str | Path | Sequence[str | Path] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from the YAML files ``paths`` (a file, a directory, or several in order) and then the
    dotted ``overrides`` (``"a.b": value``), each layer over the ones before it."""
    if isinstance(paths, str | Path):
        paths = [paths]
    layers = [Layer(str(file), read_file(file)) for file in config_files(paths or ())]
    if overrides:
        layers.append(Layer(None, _nest(overrides)))
    return from_layers(cls, layers)


def config_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files ``paths`` name, in order. A directory stands for its ``*.yaml`` and ``*.yml`` files in name
    order (not its hidden ones, as a shell's ``*.yaml``), so that layers are named ``00-base.yaml``,
    ``50-prod.yaml``: a Kubernetes ConfigMap mounted as a directory, one file per key, reads as such."""
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        try:
            found = sorted(
                (p for p in path.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file() and p.name[0] != "."),
                key=lambda p: p.name,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
        if not found:  # a mount that came up empty, rather than settings that are all defaults
            raise ConfigError(f"{path}: no *.yaml or *.yml file in the directory")
        files += found
    return files


def read_file(path: str | Path) -> dict[str, Any]:
    """One settings file's mapping; an empty file is an empty mapping."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def from_layers(cls: type[T], layers: Iterable[Layer]) -> T:
    """Merge ``layers`` in order and build ``cls``; an error names the layer that set the offending key."""
    merged: dict[str, Any] = {}
    origins: dict[str, str | None] = {}
    for layer in layers:
        _merge(merged, layer.data, layer.source, origins)
    try:
        return from_mapping(cls, merged)
    except ConfigError as exc:
        source = _origin(exc.setting, origins)
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}", exc.setting) from None


def _merge(
    into: dict[str, Any],
    layer: Mapping[str, Any],
    source: str | None,
    origins: dict[str, str | None],
    path: str = "",
) -> None:
    """Lay ``layer`` over ``into``, recording in ``origins`` which source last set each key path."""
    for key, value in layer.items():
        setting = _child(path, key)
        origins[setting] = source
        if isinstance(value, Mapping):
            node = into.get(key)
            if not isinstance(node, dict):
                node = into[key] = {}
            _merge(node, value, source, origins, setting)
        else:
            into[key] = value


def _origin(setting: str, origins: Mapping[str, str | None]) -> str | None:
    """The source of ``setting``, or of the nearest mapping above it that a source wrote."""
    above = [key for key in origins if setting == key or setting.startswith((f"{key}.", f"{key}["))]
    return origins[max(above, key=len)] if above else None


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` as ``{"a": {"b": 1}}``, a layer like a file's."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _child(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _invalid(setting: str, problem: str) -> ConfigError:
    return ConfigError(f"{setting}: {problem}", setting)


def from_mapping(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build ``cls`` from one mapping (``path``: where it sits in the whole tree, for error messages)."""
    if not isinstance(data, Mapping):
        raise _invalid(path or "configuration", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    spelled: dict[str, object] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        setting = _child(path, key)
        if name not in names:
            raise _invalid(setting, f"unknown setting (known: {', '.join(sorted(names))})")
        if name in spelled:  # `a-b` and `a_b`: which one wins would depend on the order of the keys
            raise _invalid(setting, f"given twice, also as {spelled[name]}")
        spelled[name] = key
        kwargs[name] = _convert(hints[name], value, setting)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise _invalid(_child(path, f.name), "required setting missing")
    return cls(**kwargs)


def _convert(kind: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors), path)
    if origin is typing.Literal:
        if value not in args:
            raise _invalid(path, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, path)  # type: ignore[arg-type]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _invalid(path, "expected a mapping")
        return {str(k): _convert(args[1], v, _child(path, k)) for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _invalid(path, "expected a list")
        items = [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            raise _invalid(path, f"{value!r} is not one of {[e.value for e in kind]}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _invalid(path, f"expected {kind.__name__}, got {value!r}")
        return value
    if kind is Any:
        return value
    raise _invalid(path, f"unsupported setting type {kind}")
