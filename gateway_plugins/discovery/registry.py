"""The gateway's view of engine pods, fed by one discovery source.

Sources (a static file, the Kubernetes API) report ``PodInfo``; the registry
keeps one long-lived ``PodState`` per pod, so in-flight counts survive
re-lists, and precomputes the ready pods of each model so the per-request
lookup is a dict access.

LoRA adapters are routable model names too: the pod-metrics store reports the
adapters each pod's latest record lists (those registered with its engine), and
the ready pods of an adapter are the ready pods that list it. An adapter no pod
lists is unknown (404); one listed only by pods that are not ready is known but
unserved (503). A pod keeps its adapters while its record is stale (the engine
did not forget them because a record was late); they go when a record says
otherwise, when the pod leaves discovery, or when it comes back at a new
address (a new engine). A base model's name always means the base model.

With Kubernetes discovery, the ModelAdapter controller's ``status.instances``
narrow an adapter further (``set_adapter_instances``): its ready pods are then
the ready pods that list it *and* that the controller placed it on. An adapter
without a ModelAdapter is not narrowed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import orjson

from gateway_plugins.routing.types import PodState

log = logging.getLogger(__name__)

PodKey = tuple[str, str]  # (namespace, name)
#: Pod annotation with a model's gateway options: ``{"defaultProfile": "default", "profiles": {"default":
#: {"routingStrategy": "prefix-cache"}, "low-latency": {...}}}``; the ``config-profile`` header picks one.
CONFIG_ANNOTATION = "model.aibrix.ai/config"


@dataclass(frozen=True, slots=True)
class ModelProfiles:
    """A model's routing strategy per config profile, from its pods' ``model.aibrix.ai/config``."""

    default: str
    strategies: Mapping[str, str]

    @classmethod
    def parse(cls, text: str) -> ModelProfiles:
        """Raises ``ValueError`` on anything but the documented shape."""
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        profiles = raw.get("profiles") if isinstance(raw, dict) else None
        if not isinstance(profiles, dict):
            raise ValueError("expected an object with a 'profiles' object")
        default = raw.get("defaultProfile") or "default"
        if not isinstance(default, str):
            raise ValueError("'defaultProfile' must be a string")
        strategies = {}
        for name, profile in profiles.items():
            strategy = profile.get("routingStrategy") if isinstance(profile, dict) else None
            if strategy is not None and not isinstance(strategy, str):
                raise ValueError(f"profile {name!r}: 'routingStrategy' must be a string")
            if strategy:
                strategies[name] = strategy
        return cls(default, strategies)


@dataclass(frozen=True, slots=True)
class PodInfo:
    """One pod as a discovery source reports it."""

    name: str
    address: str
    model: str
    namespace: str = "default"
    ready: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


class PodRegistry:
    def __init__(self) -> None:
        self._infos: dict[PodKey, PodInfo] = {}
        self._states: dict[PodKey, PodState] = {}
        #: Ready pods of each base model and, for adapters, of each adapter: the request path's one lookup.
        self._ready: dict[str, tuple[PodState, ...]] = {}
        self._models: set[str] = set()  # base models of the pods discovery reports, ready or not
        self._pod_adapters: dict[PodKey, tuple[str, ...]] = {}  # adapters each pod's record lists
        self._adapter_pods: dict[str, set[PodKey]] = {}  # ... and the reverse
        self._instances: dict[str, frozenset[PodKey]] = {}  # adapters narrowed to their ModelAdapter's pods
        self._profiles: dict[str, ModelProfiles] = {}
        self._bad_annotations: set[tuple[PodKey, str]] = set()
        self._unavailable: set[PodKey] = set()  # ready per discovery, but its engine is known to be down
        self._listeners: list[Callable[[], None]] = []

    # -- updates from discovery ----------------------------------------------------

    def replace_all(self, pods: Iterable[PodInfo]) -> None:
        """The source's complete current set (a re-list or a reloaded file)."""
        infos = {pod.key: pod for pod in pods}
        for key in self._infos.keys() - infos.keys():
            self._states.pop(key, None)
            self._drop_adapters(key)
        self._infos = {}
        for pod in infos.values():
            self._store(pod)
        self._rebuild()

    def upsert(self, pod: PodInfo) -> None:
        self._store(pod)
        self._rebuild()

    def remove(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if self._infos.pop(key, None) is not None:
            self._states.pop(key, None)
            self._drop_adapters(key)
            self._rebuild()

    def set_available(self, namespace: str, name: str, available: bool) -> None:
        """Take a pod out of routing (its engine stopped answering) or put it back; discovery is unchanged."""
        key = (namespace, name)
        if available == (key not in self._unavailable):
            return
        if available:
            self._unavailable.discard(key)
        else:
            self._unavailable.add(key)
        self._rebuild()

    def set_adapters(self, namespace: str, name: str, adapters: tuple[str, ...]) -> None:
        """The LoRA adapters a pod's latest record lists; only the adapters that changed are re-indexed."""
        key = (namespace, name)
        before = self._pod_adapters.get(key, ())
        if adapters == before or key not in self._infos:
            return
        after = set(adapters)
        if after:
            self._pod_adapters[key] = adapters
        else:
            del self._pod_adapters[key]
        added, gone = after.difference(before), set(before).difference(after)
        for adapter in added:
            self._adapter_pods.setdefault(adapter, set()).add(key)
        for adapter in gone:
            self._unlist(adapter, key)
        for adapter in added | gone:
            self._index_adapter(adapter)
        for listener in self._listeners:
            listener()

    def set_adapter_instances(self, adapter: str, pods: Iterable[PodKey] | None) -> None:
        """Route ``adapter`` only to ``pods`` (its ModelAdapter's ``status.instances``); None lifts that."""
        before = self._instances.get(adapter)
        after = frozenset(pods) if pods is not None else None
        if after == before:
            return
        if after is None:
            del self._instances[adapter]
        else:
            self._instances[adapter] = after
        self._index_adapter(adapter)
        for listener in self._listeners:
            listener()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # -- reads on the request path ---------------------------------------------------

    def ready_pods(self, model: str) -> Sequence[PodState]:
        return self._ready.get(model, ())

    def profile_strategy(self, model: str, profile: str | None) -> str | None:
        """The strategy the model's config annotation gives ``profile`` (or its default profile)."""
        profiles = self._profiles.get(model)
        if profiles is None:
            return None
        strategies = profiles.strategies
        return strategies.get(profile or profiles.default) or strategies.get(profiles.default)

    def is_available(self, namespace: str, name: str) -> bool:
        return (namespace, name) not in self._unavailable

    def knows_model(self, model: str) -> bool:
        """A base model of a discovered pod, or an adapter one lists, ready or not."""
        return model in self._models or model in self._adapter_pods

    def serving_models(self) -> list[str]:
        """Models and adapters with at least one ready pod, sorted."""
        return sorted(model for model, pods in self._ready.items() if pods)

    def states(self) -> list[PodState]:
        return list(self._states.values())

    def infos(self) -> list[PodInfo]:
        """Every pod discovery reports, ready or not, as it reports it (annotations included)."""
        return list(self._infos.values())

    def state(self, namespace: str, name: str) -> PodState | None:
        return self._states.get((namespace, name))

    # -- internals -------------------------------------------------------------------

    def _store(self, pod: PodInfo) -> None:
        state = self._states.get(pod.key)
        if state is None or state.address != pod.address or state.model != pod.model:
            state = PodState(pod.name, pod.address, pod.model, pod.namespace, dict(pod.labels))
            self._states[pod.key] = state
            self._drop_adapters(pod.key)
        else:
            state.labels = dict(pod.labels)
        self._infos[pod.key] = pod

    def _parse_profiles(self) -> dict[str, ModelProfiles]:
        """Each model's profiles from the first of its pods (by name) that carries the annotation."""
        profiles: dict[str, ModelProfiles] = {}
        for key in sorted(self._infos):
            info = self._infos[key]
            text = info.annotations.get(CONFIG_ANNOTATION)
            if text is None or info.model in profiles:
                continue
            try:
                profiles[info.model] = ModelProfiles.parse(text)
            except ValueError as exc:
                if (key, text) not in self._bad_annotations:  # once per pod and text, not per rebuild
                    self._bad_annotations.add((key, text))
                    log.warning("pod %s/%s: ignoring annotation %s: %s", *key, CONFIG_ANNOTATION, exc)
        return profiles

    def _routable(self, key: PodKey) -> bool:
        return self._infos[key].ready and key not in self._unavailable

    def _rebuild(self) -> None:
        ready: dict[str, list[PodState]] = {}
        for key, info in self._infos.items():
            if self._routable(key):
                ready.setdefault(info.model, []).append(self._states[key])
        self._ready = {model: _by_name(pods) for model, pods in ready.items()}
        self._models = {info.model for info in self._infos.values()}
        for adapter in self._adapter_pods:
            self._index_adapter(adapter)
        self._profiles = self._parse_profiles()
        for listener in self._listeners:
            listener()

    def _index_adapter(self, adapter: str) -> None:
        """Recompute the ready pods of one adapter (a base model of the same name keeps its own)."""
        if adapter in self._models:
            return
        keys = self._adapter_pods.get(adapter)
        if keys is None:
            self._ready.pop(adapter, None)
            return
        instances = self._instances.get(adapter)
        if instances is not None:
            keys = keys & instances
        self._ready[adapter] = _by_name(self._states[key] for key in keys if self._routable(key))

    def _unlist(self, adapter: str, key: PodKey) -> None:
        keys = self._adapter_pods[adapter]
        keys.discard(key)
        if not keys:
            del self._adapter_pods[adapter]

    def _drop_adapters(self, key: PodKey) -> None:
        """Forget a pod's adapters (re-indexed by the caller's rebuild): it left, or is a new engine."""
        for adapter in self._pod_adapters.pop(key, ()):
            self._unlist(adapter, key)


def _by_name(pods: Iterable[PodState]) -> tuple[PodState, ...]:
    return tuple(sorted(pods, key=lambda p: p.name))
