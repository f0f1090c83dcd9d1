"""The gateway's view of engine pods, fed by one discovery source.

Sources (a static file, the Kubernetes API) report ``PodInfo``; the registry
keeps one long-lived ``PodState`` per pod, so in-flight counts survive
re-lists, and precomputes the ready pods of each model so the per-request
lookup is a dict access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gateway_plugins.routing.types import PodState

PodKey = tuple[str, str]  # (namespace, name)


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
        self._ready: dict[str, tuple[PodState, ...]] = {}
        self._unavailable: set[PodKey] = set()  # ready per discovery, but its engine is known to be down
        self._listeners: list[Callable[[], None]] = []

    # -- updates from discovery ----------------------------------------------------

    def replace_all(self, pods: Iterable[PodInfo]) -> None:
        """The source's complete current set (a re-list or a reloaded file)."""
        infos = {pod.key: pod for pod in pods}
        for key in self._infos.keys() - infos.keys():
            self._states.pop(key, None)
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

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    # -- reads on the request path ---------------------------------------------------

    def ready_pods(self, model: str) -> Sequence[PodState]:
        return self._ready.get(model, ())

    def is_available(self, namespace: str, name: str) -> bool:
        return (namespace, name) not in self._unavailable

    def knows_model(self, model: str) -> bool:
        return any(info.model == model for info in self._infos.values())

    def serving_models(self) -> list[str]:
        """Models with at least one ready pod, sorted."""
        return sorted(model for model, pods in self._ready.items() if pods)

    def states(self) -> list[PodState]:
        return list(self._states.values())

    def state(self, namespace: str, name: str) -> PodState | None:
        return self._states.get((namespace, name))

    # -- internals -------------------------------------------------------------------

    def _store(self, pod: PodInfo) -> None:
        state = self._states.get(pod.key)
        if state is None or state.address != pod.address or state.model != pod.model:
            state = PodState(pod.name, pod.address, pod.model, pod.namespace, dict(pod.labels))
            self._states[pod.key] = state
        else:
            state.labels = dict(pod.labels)
        self._infos[pod.key] = pod

    def _rebuild(self) -> None:
        ready: dict[str, list[PodState]] = {}
        for key, info in self._infos.items():
            if info.ready and key not in self._unavailable:
                ready.setdefault(info.model, []).append(self._states[key])
        self._ready = {model: tuple(sorted(pods, key=lambda p: p.name)) for model, pods in ready.items()}
        for listener in self._listeners:
            listener()
