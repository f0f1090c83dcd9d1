"""The ModelAdapter controller: place a LoRA adapter on engine pods, load it through their sidecars.

A reconcile (level-triggered: whatever woke it, it reads the world and converges):

1. Deleted (``deletionTimestamp``): cancel its loads, unload from every pod that holds it or may (a load
   was in flight there: the sidecar finishes what it started), then drop the finalizer.
2. Add the finalizer; check the spec (``podSelector`` and ``artifactURL`` required, a known
   ``schedulerName``, ``replicas`` >= 0), else phase Failed.
3. Candidates: Ready, non-terminating pods of the namespace matching ``podSelector``, with an IP. Their
   LoRA state comes from their pod-metrics records in Redis (``max_loras``, ``adapters``; the engine's
   ``/v1/models`` when a pod has none).
4. Instances: candidates in ``status.instances`` or whose record lists the adapter, kept if their
   engine's ``/v1/models`` lists it. Pods that died, became unready or left the selector drop out (the
   adapter is unloaded from the ones still serving, a load in flight there is cancelled); instances
   beyond ``replicas`` are unloaded.
5. Missing instances (``replicas``, unset: every candidate) are placed on candidates with a free LoRA
   slot, ordered by the scheduler (``least-adapters``: fewest adapters first; ``bin-pack``: fullest
   first; ``random``), and loaded through each pod's sidecar (``POST /v1/lora_adapter/load``), skipped
   where ``/v1/models`` already lists it and verified there afterwards. A load may take minutes
   (downloads), so each runs as a task of the controller's, one per adapter and pod: the reconcile
   returns at once with the phase Loading, and the load's end queues the adapter again for the reconcile
   that records it. A pod whose sidecar answers 409 (full) hands its turn to the next one.
6. A try (the loads started until none is in flight) with a failed load is counted in
   ``status.failedAttempts`` with ``status.nextRetryTime`` (``retry_base`` doubling, capped); after
   ``max_attempts`` the phase is Failed until the spec changes (which also cancels the loads in flight).
7. Status (phase, instances, readyReplicas, desiredReplicas, conditions Initialized / Scheduled / Ready,
   observedGeneration) is written through the status subresource only when it changed; a 409 is
   answered by re-reading the object and writing again.

Loads in flight live in memory only: a restarted controller finds the adapter Loading, reads the engines'
``/v1/models`` and loads again where it is missing (a sidecar serializes loads of one name, so a second
load of it waits for the first and finds it there).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from brickyard_core.kube.client import MODEL_ADAPTERS, PODS, SECRETS, KubeClient, Obj
from brickyard_core.kube.objects import micro_time, object_key, parse_time, pod_ready, selector_matches
from brickyard_core.podmetrics import PodMetrics, pod_key, read_records
from controllers.config import ControllerSettings
from controllers.runtime.conditions import find_condition, set_condition, write_status
from controllers.runtime.controller import Controller, Result, generation_changed
from controllers.runtime.events import EventRecorder
from controllers.runtime.manager import Manager

log = logging.getLogger(__name__)

FINALIZER = "brickyard.dev/model-adapter"
SIDECAR_PORT_KEY = "brickyard.dev/sidecar-port"
ENGINE_PORT_LABEL = "model.aibrix.ai/port"
DEFAULT_ENGINE_PORT = 8000
SCHEDULERS = ("least-adapters", "bin-pack", "random")


@dataclass(frozen=True)
class Candidate:
    """A pod the adapter may run on, with its LoRA state."""

    name: str
    ip: str
    engine_port: int
    sidecar_port: int
    adapters: tuple[str, ...] = ()  # registered with its engine
    max_loras: int = 0  # 0: unknown (no record, or LoRA slots not reported)

    @property
    def engine_url(self) -> str:
        return f"http://{self.ip}:{self.engine_port}"

    @property
    def sidecar_url(self) -> str:
        return f"http://{self.ip}:{self.sidecar_port}"

    @property
    def has_free_slot(self) -> bool:
        return self.max_loras <= 0 or len(self.adapters) < self.max_loras


class LoadError(Exception):
    def __init__(self, pod: str, message: str, *, capacity: bool = False) -> None:
        super().__init__(f"{pod}: {message}")
        self.capacity = capacity


@dataclass
class _Try:
    """The loads of one placement try of an adapter (one spec generation), until a reconcile records it.

    A load's outcome: True loaded now, False found loaded, or the ``LoadError``. The try ends once every
    load of it has ended and been taken in and no pod that refused for lack of a slot can hand its turn
    on; it failed if a load failed.
    """

    generation: int
    #: By pod: in flight, or ended and not yet taken in by a reconcile.
    loads: dict[str, asyncio.Task[bool | LoadError]] = field(default_factory=dict)
    #: Pods whose sidecar answered 409 (no free slot) in this try: not asked again in it.
    full: set[str] = field(default_factory=set)
    failures: list[LoadError] = field(default_factory=list)

    @property
    def in_flight(self) -> set[str]:
        return {pod for pod, task in self.loads.items() if not task.done()}

    def cancel(self) -> None:
        for task in self.loads.values():
            task.cancel()


def _port(value: Any, default: int) -> int:
    text = str(value) if value is not None else ""
    return int(text) if text.isdigit() else default


def _validate(spec: Mapping[str, Any]) -> list[str]:
    problems = []
    selector = spec.get("podSelector")
    if not isinstance(selector, dict):
        problems.append("spec.podSelector is required")
    if not isinstance(spec.get("artifactURL"), str) or not spec.get("artifactURL"):
        problems.append("spec.artifactURL is required")
    if spec.get("schedulerName", "least-adapters") not in SCHEDULERS:
        problems.append(f"spec.schedulerName must be one of {', '.join(SCHEDULERS)}")
    replicas = spec.get("replicas")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0):
        problems.append("spec.replicas must be an integer >= 0")
    return problems


class ModelAdapterController:
    def __init__(
        self,
        manager: Manager,
        settings: ControllerSettings,
        session: aiohttp.ClientSession,
        redis: aioredis.Redis | None,
        recorder: EventRecorder,
        *,
        sidecar_token: str | None = None,
    ) -> None:
        self.client: KubeClient = manager.client
        self.settings = settings.model_adapter
        self.session = session
        #: Sent with every call to a sidecar's adapter API.
        self.sidecar_headers = {"Authorization": f"Bearer {sidecar_token}"} if sidecar_token else {}
        self.redis = redis
        self.recorder = recorder
        #: Per key, the object as the last status write left it and the resourceVersions that write
        #: replaced, until the cache moves on.
        self._written: dict[str, tuple[frozenset[str], Obj]] = {}
        #: Per key, the placement try under way.
        self._tries: dict[str, _Try] = {}
        self.adapters = manager.informer(MODEL_ADAPTERS)
        self.pods = manager.informer(PODS)
        self.controller = Controller(
            "model-adapter",
            self.reconcile,
            self.adapters,
            primary_predicate=generation_changed,
            workers=settings.workers,
            resync_seconds=settings.resync_seconds,
            backoff_base=settings.backoff_base_seconds,
            backoff_max=settings.backoff_max_seconds,
        )
        self.controller.watch(self.pods, self._adapters_of_pod, self._pod_changed)
        manager.add(self.controller)

    # -- watches ----------------------------------------------------------------------------------------

    def _adapters_of_pod(self, pod: Obj) -> Iterable[str]:
        """ModelAdapters a pod change may concern: those selecting it, and those placed on it."""
        meta = pod.get("metadata") or {}
        namespace, name, labels = meta.get("namespace"), meta.get("name"), meta.get("labels") or {}
        for adapter in self.adapters.list(namespace):
            spec, status = adapter.get("spec") or {}, adapter.get("status") or {}
            if name in (status.get("instances") or []) or selector_matches(spec.get("podSelector"), labels):
                yield object_key(adapter)

    @staticmethod
    def _pod_changed(old: Obj | None, new: Obj | None) -> bool:
        if old is None or new is None:
            return True

        def view(pod: Obj) -> tuple[Any, ...]:
            meta = pod.get("metadata") or {}
            return (
                meta.get("labels"),
                meta.get("annotations", {}).get(SIDECAR_PORT_KEY),
                pod_ready(pod),
                (pod.get("status") or {}).get("podIP"),
            )

        return view(old) != view(new)

    # -- loads in flight ----------------------------------------------------------------------------------

    def loading(self, key: str) -> set[str]:
        """Pods with a load of the ModelAdapter ``key`` in flight."""
        tried = self._tries.get(key)
        return tried.in_flight if tried is not None else set()

    async def aclose(self) -> None:
        """Cancel every load in flight (the controllers are stopping)."""
        tasks = [task for tried in self._tries.values() for task in tried.loads.values()]
        self._tries.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, key: str) -> None:
        """Let the adapter's try go: its loads are cancelled, whatever they came to is not recorded."""
        tried = self._tries.pop(key, None)
        if tried is not None:
            tried.cancel()

    # -- reconcile --------------------------------------------------------------------------------------

    async def reconcile(self, key: str) -> Result:
        obj = self.adapters.get(key)
        if obj is None:
            self._written.pop(key, None)
            self._drop(key)
            return Result()
        obj = self._with_own_write(key, obj)
        meta = obj["metadata"]
        read_version = meta.get("resourceVersion", "")
        if meta.get("deletionTimestamp"):
            await self._finalize(key, obj)
            return Result()
        if FINALIZER not in (meta.get("finalizers") or []):
            obj = await self.client.patch(
                MODEL_ADAPTERS,
                meta["namespace"],
                meta["name"],
                {
                    "metadata": {
                        "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                        "resourceVersion": meta["resourceVersion"],
                    }
                },
            )
        spec = obj.get("spec") or {}
        generation = obj["metadata"].get("generation")
        problems = _validate(spec)
        if problems:
            self._drop(key)
            message = "; ".join(problems)
            status = self._status(obj, phase="Failed", instances=[], desired=0)
            status["conditions"] = set_condition(
                status["conditions"], "Initialized", False, "InvalidSpec", message
            )
            if await self._write_status(obj, status, read_version):
                await self.recorder.warning(obj, "InvalidSpec", message)
            return Result()

        old = obj.get("status") or {}
        same_generation = old.get("observedGeneration") == generation
        attempts = int(old.get("failedAttempts") or 0) if same_generation else 0
        next_retry = parse_time(old.get("nextRetryTime")) if same_generation else None
        tried = self._tries.get(key)
        if tried is not None and tried.generation != generation:
            self._drop(key)  # the spec changed: a try of the new one starts over
            tried = None
        if tried is not None:
            await self._collect(obj, tried)

        name = obj["metadata"]["name"]
        candidates = await self._candidates(obj)
        desired = spec["replicas"] if spec.get("replicas") is not None else len(candidates)
        previous = list(old.get("instances") or [])
        instances = await self._current_instances(name, candidates, previous)
        await self._unload_departed(obj, previous, candidates)
        if tried is not None:
            for pod in tried.in_flight - {c.name for c in candidates}:
                tried.loads.pop(pod).cancel()  # the pod left
        if len(instances) > desired:
            for extra in instances[desired:]:
                await self._unload(obj, extra)
            instances = instances[:desired]

        requeue: float | None = None
        now = time.time()
        # Loads not taken in: in flight, or ended during the reads above (the next reconcile records them).
        loading = set(tried.loads) if tried is not None else set()
        taken = {c.name for c in instances} | loading
        skip = taken | (tried.full if tried is not None else set())
        askable = [c for c in candidates if c.name not in skip and c.has_free_slot]
        need = desired - len(instances) - len(loading)
        if need > 0 and askable and attempts < self.settings.max_attempts and not (tried and tried.failures):
            if tried is None and next_retry is not None and now < next_retry:
                requeue = next_retry - now
            else:
                tried = self._tries.setdefault(key, _Try(generation))
                await self._start_loads(key, obj, tried, self._order(spec, askable)[:need])
                next_retry = None  # this is the try it waited for
                loading = set(tried.loads)

        error: str | None = None  # the try that ended here failed
        if tried is not None and not loading:  # every load taken in, no turn to hand on: the try is over
            del self._tries[key]
            if tried.failures:
                attempts += 1
                error = "; ".join(str(f) for f in tried.failures)
                next_retry = await self._failed(obj, attempts, error)
                if next_retry is not None:
                    requeue = next_retry - time.time()
        if len(instances) >= desired:
            attempts, next_retry = 0, None
        if loading:
            # The loads' ends queue the adapter; this visit is the backstop, when they must have ended.
            requeue = self.settings.load_timeout_seconds

        serving = {c.name for c in instances}
        taken = serving | loading
        status = self._conditions_and_phase(
            obj,
            candidates=candidates,
            instances=instances,
            # A load that ended on a pod that already lists the adapter is not awaited any more (the next
            # reconcile only records it): the phase says Bound or Running, not Loading.
            loading=loading - serving,
            desired=desired,
            attempts=attempts,
            next_retry=next_retry,
            error=error,
            free_slots=any(c.name not in taken and c.has_free_slot for c in candidates),
        )
        await self._write_status(obj, status, read_version)
        return Result(requeue_after=requeue)

    async def _failed(self, obj: Obj, attempts: int, error: str) -> float | None:
        """Record the failed try ``attempts``; when the next try is due (None: not until the spec changes)."""
        if attempts >= self.settings.max_attempts:
            await self.recorder.warning(
                obj, "RetriesExhausted", f"{attempts} tries failed, giving up until the spec changes: {error}"
            )
            return None
        delay = min(self.settings.retry_base_seconds * 2 ** (attempts - 1), self.settings.retry_max_seconds)
        await self.recorder.warning(
            obj,
            "LoadFailed",
            f"try {attempts} of {self.settings.max_attempts} failed, next in {delay:g} s: {error}",
        )
        return time.time() + delay

    # -- world ------------------------------------------------------------------------------------------

    async def _candidates(self, obj: Obj) -> list[Candidate]:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        pods = [
            pod
            for pod in self.pods.list(meta["namespace"])
            if pod_ready(pod) and selector_matches(spec.get("podSelector"), pod["metadata"].get("labels"))
        ]
        records = await self._records(meta["namespace"], [p["metadata"]["name"] for p in pods])
        candidates = []
        for pod in pods:
            candidate = self._reachable(pod)
            record = records.get(candidate.name)
            if record is not None:
                candidate = dataclasses.replace(
                    candidate, adapters=record.adapters, max_loras=record.max_loras
                )
            candidates.append(candidate)
        # No record (no Redis, a sidecar not publishing): ask the engine what it holds.
        unknown = [c for c in candidates if c.name not in records]
        listed = await asyncio.gather(*(self._engine_adapters(c) for c in unknown))
        found = {c.name: names or () for c, names in zip(unknown, listed, strict=True)}
        candidates = [
            dataclasses.replace(c, adapters=found[c.name]) if c.name in found else c for c in candidates
        ]
        return sorted(candidates, key=lambda c: c.name)

    async def _records(self, namespace: str, names: list[str]) -> dict[str, PodMetrics]:
        """The pods' healthy records, by pod name; none without Redis, or when it fails."""
        if self.redis is None:
            return {}
        try:
            found = await read_records(self.redis, [pod_key(namespace, name) for name in names])
        except (RedisError, OSError) as exc:
            log.warning("cannot read pod-metrics records, placing without them: %s", exc)
            return {}
        return {pod: record for _, pod, record in found if record.healthy}

    async def _engine_adapters(self, pod: Candidate) -> tuple[str, ...] | None:
        """Adapters the engine lists on ``/v1/models`` (cards with a parent); None if it did not answer."""
        try:
            async with self.session.get(
                f"{pod.engine_url}/v1/models",
                timeout=aiohttp.ClientTimeout(total=self.settings.http_timeout_seconds),
            ) as response:
                if response.status != 200:
                    return None
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return tuple(card.get("id", "") for card in body.get("data") or [] if card.get("parent"))

    async def _current_instances(
        self, adapter: str, candidates: list[Candidate], previous: list[str]
    ) -> list[Candidate]:
        """Candidates that serve the adapter now (their engine lists it): the previous instances first."""
        known = [c for c in candidates if c.name in previous or adapter in c.adapters]
        listed = await asyncio.gather(*(self._engine_adapters(c) for c in known))
        serving = [
            c for c, names in zip(known, listed, strict=True) if names is not None and adapter in names
        ]
        return sorted(serving, key=lambda c: (c.name not in previous, c.name))

    def _order(self, spec: Mapping[str, Any], pods: list[Candidate]) -> list[Candidate]:
        scheduler = spec.get("schedulerName") or "least-adapters"
        if scheduler == "random":
            shuffled = list(pods)
            random.shuffle(shuffled)
            return shuffled
        if scheduler == "bin-pack":
            return sorted(pods, key=lambda c: (-len(c.adapters), c.name))
        return sorted(pods, key=lambda c: (len(c.adapters), c.name))

    # -- loading and unloading --------------------------------------------------------------------------

    async def _start_loads(self, key: str, obj: Obj, tried: _Try, pods: list[Candidate]) -> None:
        """Start a load on each of ``pods``; each one's end queues the adapter again."""
        try:
            credentials = await self._credentials(obj)
        except LoadError as exc:
            tried.failures.append(exc)
            return

        def ended(task: asyncio.Task[bool | LoadError]) -> None:
            if not task.cancelled():
                self.controller.queue.add(key)

        for pod in pods:
            task = asyncio.create_task(
                self._load_outcome(obj, pod, credentials), name=f"load-{key}-{pod.name}"
            )
            task.add_done_callback(ended)
            tried.loads[pod.name] = task

    async def _collect(self, obj: Obj, tried: _Try) -> None:
        """Take in the try's loads that ended: record the successes, remember what failed and which pods
        were full."""
        name = obj["metadata"]["name"]
        for pod, task in list(tried.loads.items()):
            if not task.done():
                continue
            del tried.loads[pod]
            if task.cancelled():
                continue
            outcome = task.result()  # a failure other than a LoadError is the reconcile's (backoff)
            if isinstance(outcome, LoadError):
                if outcome.capacity:
                    tried.full.add(pod)
                else:
                    tried.failures.append(outcome)
            elif outcome:  # not just found there
                await self.recorder.normal(obj, "Loaded", f"adapter {name} loaded on pod {pod}")

    async def _load_outcome(
        self, obj: Obj, pod: Candidate, credentials: dict[str, str] | None
    ) -> bool | LoadError:
        """A load task: ``_load``'s answer, or the ``LoadError`` it raised (for a later reconcile)."""
        try:
            return await self._load(obj, pod, credentials)
        except LoadError as exc:
            return exc

    async def _load(self, obj: Obj, pod: Candidate, credentials: dict[str, str] | None) -> bool:
        """Make the pod's engine serve the adapter: True if loaded now, False if it already did."""
        name, spec = obj["metadata"]["name"], obj.get("spec") or {}
        listed = await self._engine_adapters(pod)
        if listed is not None and name in listed:
            return False
        body: Obj = {"lora_name": name, "artifact_url": spec["artifactURL"]}
        if credentials:
            body["credentials"] = credentials
        if spec.get("additionalConfig"):
            body["additional_config"] = spec["additionalConfig"]
        try:
            async with self.session.post(
                f"{pod.sidecar_url}/v1/lora_adapter/load",
                json=body,
                headers=self.sidecar_headers,
                timeout=aiohttp.ClientTimeout(total=self.settings.load_timeout_seconds),
            ) as response:
                if response.status != 200:
                    text = await response.text()
                    with contextlib.suppress(ValueError, AttributeError):
                        text = (await response.json(content_type=None))["error"]["message"]
                    raise LoadError(
                        pod.name,
                        f"sidecar answered {response.status}: {text}",
                        capacity=response.status == 409,
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoadError(pod.name, f"sidecar unreachable: {exc!r}") from exc
        listed = await self._engine_adapters(pod)
        if listed is None or name not in listed:
            raise LoadError(pod.name, "loaded, but the engine's /v1/models does not list it")
        return True

    async def _unload(self, obj: Obj, pod: Candidate) -> None:
        """Unload through the pod's sidecar; raises ``LoadError`` when the sidecar fails."""
        name = obj["metadata"]["name"]
        try:
            async with self.session.post(
                f"{pod.sidecar_url}/v1/lora_adapter/unload",
                json={"lora_name": name},
                headers=self.sidecar_headers,
                timeout=aiohttp.ClientTimeout(total=self.settings.http_timeout_seconds),
            ) as response:
                if response.status != 200:
                    raise LoadError(
                        pod.name, f"unload: sidecar answered {response.status}: {await response.text()}"
                    )
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LoadError(pod.name, f"unload: sidecar unreachable: {exc!r}") from exc
        if isinstance(answer, dict) and answer.get("status") == "not_loaded":
            return  # it was not there (a record a little behind)
        await self.recorder.normal(obj, "Unloaded", f"adapter {name} unloaded from pod {pod.name}")

    async def _unload_departed(self, obj: Obj, previous: list[str], candidates: list[Candidate]) -> None:
        """Best effort: unload from former instances that left the selector but still serve."""
        names = {c.name for c in candidates}
        for pod_name in previous:
            if pod_name in names:
                continue
            pod = self.pods.get(f"{obj['metadata']['namespace']}/{pod_name}")
            if pod is None or not pod_ready(pod):
                continue  # gone or not serving: nothing to free
            try:
                await self._unload(obj, self._reachable(pod))
            except LoadError as exc:
                log.info("could not unload from a departed pod: %s", exc)

    def _reachable(self, pod: Obj) -> Candidate:
        meta = pod["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        return Candidate(
            name=meta["name"],
            ip=(pod.get("status") or {}).get("podIP", ""),
            engine_port=_port(labels.get(ENGINE_PORT_LABEL), DEFAULT_ENGINE_PORT),
            sidecar_port=_port(
                annotations.get(SIDECAR_PORT_KEY, labels.get(SIDECAR_PORT_KEY)), self.settings.sidecar_port
            ),
        )

    async def _finalize(self, key: str, obj: Obj) -> None:
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or []
        if FINALIZER not in finalizers:
            self._drop(key)
            return
        holders = set((obj.get("status") or {}).get("instances") or [])
        tried = self._tries.get(key)
        if tried is not None:
            # Cancelled, but the sidecar finishes what it started: unloading there waits for it (the sidecar
            # serializes one name's calls). Kept until the finalizer is through, should an unload fail.
            tried.cancel()
            holders.update(tried.loads)
        candidates = (
            await self._candidates(obj)
            if isinstance((obj.get("spec") or {}).get("podSelector"), dict)
            else []
        )
        holders.update(c.name for c in candidates if meta["name"] in c.adapters)
        for pod_name in sorted(holders):
            pod = self.pods.get(f"{meta['namespace']}/{pod_name}")
            if pod is None or not pod_ready(pod):
                continue  # the pod is gone or not serving: so is the adapter on it
            await self._unload(obj, self._reachable(pod))  # a failure re-queues with backoff
        self._tries.pop(key, None)
        await self.client.patch(
            MODEL_ADAPTERS,
            meta["namespace"],
            meta["name"],
            {
                "metadata": {
                    "finalizers": [f for f in finalizers if f != FINALIZER],
                    "resourceVersion": meta["resourceVersion"],
                }
            },
        )

    async def _credentials(self, obj: Obj) -> dict[str, str] | None:
        ref = (obj.get("spec") or {}).get("credentialsSecretRef")
        name = ref.get("name") if isinstance(ref, dict) else ref
        if not name:
            return None
        secret = await self.client.get(SECRETS, obj["metadata"]["namespace"], name)
        if secret is None:
            raise LoadError("credentialsSecretRef", f"secret {name!r} not found")
        return {
            k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()
        }

    # -- status -----------------------------------------------------------------------------------------

    @staticmethod
    def _status(obj: Obj, *, phase: str, instances: list[str], desired: int) -> Obj:
        old = obj.get("status") or {}
        return {
            **old,
            "phase": phase,
            "instances": instances,
            "readyReplicas": len(instances),
            "desiredReplicas": desired,
            "conditions": list(old.get("conditions") or []),
            "observedGeneration": obj["metadata"].get("generation"),
        }

    def _conditions_and_phase(
        self,
        obj: Obj,
        *,
        candidates: list[Candidate],
        instances: list[Candidate],
        loading: set[str],
        desired: int,
        attempts: int,
        next_retry: float | None,
        error: str | None,
        free_slots: bool,
    ) -> Obj:
        names = sorted(c.name for c in instances)
        exhausted = attempts >= self.settings.max_attempts and len(names) < desired
        if exhausted:
            phase = "Failed"
        elif desired > 0 and len(names) >= desired:
            phase = "Running"
        elif loading:
            phase = "Loading"
        elif names:
            phase = "Bound"
        elif free_slots and desired > 0:
            phase = "Scheduled"
        else:
            phase = "Pending"
        status = self._status(obj, phase=phase, instances=names, desired=desired)
        conds = set_condition(status["conditions"], "Initialized", True, "SpecAccepted", "spec is valid")
        if not candidates:
            conds = set_condition(
                conds, "Scheduled", False, "NoCandidatePods", "no Ready pod matches podSelector"
            )
        elif len(names) + len(loading) < desired and not free_slots:
            conds = set_condition(
                conds,
                "Scheduled",
                False,
                "NoFreeSlots",
                "no other matching pod has a free LoRA slot",
            )
        else:
            conds = set_condition(conds, "Scheduled", True, "Scheduled", f"{len(candidates)} candidate pods")
        failed_before = find_condition(conds, "Ready")
        if desired > 0 and len(names) >= desired:
            conds = set_condition(
                conds, "Ready", True, "AllReplicasReady", f"loaded on {len(names)} of {desired} pods"
            )
        elif error is not None:
            if exhausted:
                conds = set_condition(
                    conds, "Ready", False, "RetriesExhausted", f"{attempts} tries failed: {error}"
                )
            else:
                conds = set_condition(
                    conds,
                    "Ready",
                    False,
                    "LoadFailed",
                    f"try {attempts} of {self.settings.max_attempts}: {error}",
                )
        elif loading:
            conds = set_condition(
                conds,
                "Ready",
                False,
                "Loading",
                f"loading on {', '.join(sorted(loading))}; loaded on {len(names)} of {desired} pods",
            )
        elif attempts and failed_before and failed_before.get("reason") in ("LoadFailed", "RetriesExhausted"):
            pass  # waiting for the next try (or for a spec change): the last failure still stands
        else:
            conds = set_condition(
                conds, "Ready", False, "NotAllReplicasReady", f"loaded on {len(names)} of {desired} pods"
            )
        status["conditions"] = conds
        status["failedAttempts"] = attempts
        if next_retry is not None and not exhausted and len(names) < desired:
            status["nextRetryTime"] = micro_time(next_retry)
        else:
            status.pop("nextRetryTime", None)
        return status

    async def _write_status(self, obj: Obj, status: Obj, read_version: str) -> bool:
        """Write the status; remember it until the cache moves past the versions it replaced (the one
        written over, and the one this reconcile read, older when it added the finalizer first)."""
        written = await write_status(self.client, MODEL_ADAPTERS, obj, status)
        if written is not None:
            replaced = frozenset({written.replaced_version, read_version})
            self._written[object_key(written.obj)] = (replaced, written.obj)
        return written is not None

    def _with_own_write(self, key: str, obj: Obj) -> Obj:
        """The cached object, or the one this controller's last status write made of it if the watch has
        not brought that write back yet: a reconcile right after a write (a load's end comes soon after
        the write that said Loading) must neither act on the status before it (try a failed load again,
        record its events twice) nor write over a resourceVersion already gone (a 409). Any other version
        of the object is the truth."""
        memo = self._written.get(key)
        if memo is None:
            return obj
        replaced, written = memo
        if obj["metadata"].get("resourceVersion") not in replaced:
            del self._written[key]  # the cache has our write, or something newer
            return obj
        return written
