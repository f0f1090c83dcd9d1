"""The strategy registry: the built-in strategies (``@strategy``) and third-party ones (entry points).

A strategy has one name, the one clients send in ``routing-strategy``, and may have aliases: other
names of the same instance, so an alias shares its strategy's state, counters and metric label.

A strategy is built by a factory from a ``StrategyContext``: the routing settings, its own free-form
settings (``routing.plugins.<name>``, for third-party strategies), the clock that expires its state and
the random source it draws from, both injected so the fleet simulator runs it in virtual time and
reproducibly. A strategy class is its own factory through its ``from_settings`` classmethod.

Third-party packages register strategies as entry points in the group ``brickyard.strategies``: the
entry point's name is the strategy's name, its object a class with ``from_settings`` (or a function of
the context). They are loaded once per process. One that cannot be loaded or built is logged and
skipped: the gateway serves without it (a request naming it gets the usual 400). One that claims a name
already taken (a built-in's, an alias, a built-in preset, another plugin's) stops the gateway at
start-up: which strategy the name meant would depend on what happens to be installed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar, Protocol, TypeVar

from gateway_plugins.config import RoutingSettings
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.strategies.base import Strategy, StrategyContext
from gateway_plugins.routing.strategies.combined import parse_weighted

log = logging.getLogger(__name__)

#: The entry-point group third-party strategies register in.
GROUP = "brickyard.strategies"
#: Presets every gateway has; ``routing.presets`` adds others (or redefines these).
BUILTIN_PRESETS = {
    # The Gateway API Inference Extension's default scoring: queue 2, KV cache 2, prefix 3.
    "inference-extension": "least-queue:2,least-kv-cache:2,prefix-cache:3",
}

#: Builds a strategy: a strategy class's ``from_settings``, or an entry point's function.
Factory = Callable[[StrategyContext], Strategy]


class Buildable(Protocol):
    """What ``@strategy`` registers: a strategy class that builds itself from a context."""

    name: ClassVar[str]

    @classmethod
    def from_settings(cls, context: StrategyContext) -> Strategy: ...


B = TypeVar("B", bound=Buildable)


@dataclass(frozen=True, slots=True)
class Registration:
    """A name (and aliases) and how to build the strategy it means; ``origin`` names it in messages."""

    name: str
    factory: Factory
    aliases: tuple[str, ...] = ()
    origin: str = "built-in"


_BUILTINS: dict[str, Registration] = {}


def strategy(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[B]], type[B]]:
    """Register a built-in strategy class under ``name`` and ``aliases``; it is built by ``from_settings``."""

    def register(cls: type[B]) -> type[B]:
        taken = {name, *aliases} & {n for r in _BUILTINS.values() for n in (r.name, *r.aliases)}
        if taken:
            raise ValueError(f"{cls.__qualname__}: strategy name {', '.join(sorted(taken))} is taken")
        cls.name = name
        _BUILTINS[name] = Registration(name, cls.from_settings, aliases)
        return cls

    return register


def builtin_aliases() -> dict[str, str]:
    """Each built-in alias, and the name of the strategy it means."""
    return {alias: r.name for r in _BUILTINS.values() for alias in r.aliases}


@functools.cache
def installed_plugins() -> tuple[Registration, ...]:
    """The strategies of installed packages (entry-point group ``brickyard.strategies``), loaded once.

    An entry point that cannot be loaded, whose object is no factory, or whose name could not be sent
    in a header, is logged and skipped.
    """
    found = []
    for entry in importlib.metadata.entry_points(group=GROUP):
        dist = f" of {entry.dist.name} {entry.dist.version}" if entry.dist is not None else ""
        origin = f"strategy plugin '{entry.name} = {entry.value}'{dist}"
        if any(c in entry.name for c in ",:"):
            log.error("%s: a strategy's name cannot contain ',' or ':'; skipped", origin)
            continue
        try:
            target = entry.load()
        except Exception:
            log.exception("%s cannot be loaded; skipped", origin)
            continue
        factory = getattr(target, "from_settings", target)
        if not callable(factory):
            log.error("%s is neither a class with from_settings nor a function; skipped", origin)
            continue
        found.append(Registration(entry.name, factory, origin=origin))
    return tuple(found)


def build_strategies(
    settings: RoutingSettings | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    plugins: Iterable[Registration] | None = None,
    kv_index: KvBlockIndex | None = None,
) -> dict[str, Strategy]:
    """Fresh instances of every strategy, alias and preset, keyed by the name a client may send.

    ``rng``: the random source of every strategy (default: a new, unseeded one). ``plugins``: the
    third-party strategies (default: ``installed_plugins()``). ``kv_index``: the engines' prefix caches
    from their KV events, for the prefix-aware strategies (None: they match approximately).
    ``ValueError`` for what cannot work: a bad preset, a plugin taking a name already registered.
    """
    settings = settings or RoutingSettings()
    context = StrategyContext(settings, clock, rng or random.Random(), MappingProxyType({}), kv_index)
    strategies: dict[str, Strategy] = {}
    for registration in _BUILTINS.values():
        _add(strategies, registration, registration.factory(context))
    built_plugins = set()
    for registration in installed_plugins() if plugins is None else plugins:
        if registration.name in strategies or registration.name in BUILTIN_PRESETS:
            raise ValueError(
                f"{registration.origin} takes the name '{registration.name}', which is already registered: "
                "refused; uninstall the package or rename its entry point"
            )
        options = MappingProxyType(settings.plugins.get(registration.name, {}))
        built = _build_plugin(registration, replace(context, options=options))
        if built is not None:
            _add(strategies, registration, built)
            built_plugins.add(registration.name)
    for name in settings.plugins.keys() - built_plugins:
        log.warning("routing.plugins.%s: no strategy plugin of that name is installed; ignored", name)
    for name, spec in {**BUILTIN_PRESETS, **settings.presets}.items():
        try:
            preset = parse_weighted(spec, strategies)
        except ValueError as exc:
            raise ValueError(f"routing preset {name!r}: {exc}") from None
        preset.name = name  # type: ignore[misc]
        strategies[name] = preset
    return strategies


def _build_plugin(registration: Registration, context: StrategyContext) -> Strategy | None:
    """The plugin's strategy, or None (logged) when it cannot be built or what it builds is no strategy."""
    try:
        built = registration.factory(context)
    except Exception:
        log.exception("%s failed to build; skipped", registration.origin)
        return None
    missing = [a for a in ("score", "on_routed", "on_finished") if not callable(getattr(built, a, None))]
    if not hasattr(built, "uses_metrics"):
        missing.append("uses_metrics")
    name = getattr(built, "name", None)
    if missing:
        log.error("%s built no strategy (it lacks %s); skipped", registration.origin, ", ".join(missing))
    elif name != registration.name:
        log.error(
            "%s built a strategy named %r, not its entry point's name; skipped", registration.origin, name
        )
    else:
        return built
    return None


def _add(strategies: dict[str, Strategy], registration: Registration, built: Strategy) -> None:
    for name in (registration.name, *registration.aliases):
        strategies[name] = built
