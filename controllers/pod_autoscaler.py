"""The PodAutoscaler controller: KPA / APA on LLM metrics through the scale subresource, or a native HPA.

KPA and APA (``scalingStrategy``), one sample every ``sample_seconds``:

1. The target's scale subresource (``scaleTargetRef``: a Deployment or any kind with one; its plural
   from a small table, else the API server's discovery) gives the replica count and the pod selector.
2. The metric of the first ``metricsSources`` entry, as a fleet-wide total (the algorithms' input):
   ``redis``: the named field of each Ready pod's pod-metrics record (``waiting``, ``running``,
   ``kv_usage``, ``prompt_tps``, ``generation_tps``, ``throughput`` = both, ...); ``pod``: the named
   series scraped from each Ready pod's Prometheus endpoint (``port``, ``path``); ``external`` /
   ``domain``: one Prometheus endpoint (``endpoint``, ``path``) for the whole fleet. Pods that did not
   report count as the mean of those that did; no report at all is no sample (replicas stay).
3. ``controllers.autoscaling.algorithms.kpa`` / ``apa`` decide from the in-memory sample window and a
   ``ScalerState`` persisted in the ``brickyard.dev/scaler-state`` annotation (panic mode and the last
   scale times survive a restart; the window restarts empty, which holds the replicas until it fills).
4. A decision that changes the count is written to the scale subresource and recorded as an Event.
5. Status: desiredScale, actualScale, lastScaleTime, conditions AbleToScale / ScalingActive /
   ScalingLimited, observedGeneration; written only when it changed.

HPA: the controller keeps an ``autoscaling/v2`` HorizontalPodAutoscaler of the same name (owned by the
PodAutoscaler, so it goes with it) and mirrors its status; Kubernetes' own HPA controller scales.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from brickyard_core.kube.client import HPAS, POD_AUTOSCALERS, PODS, ApiError, KubeClient, Obj
from brickyard_core.kube.objects import now_rfc3339, owner_reference, pod_ready
from brickyard_core.podmetrics import pod_key, read_records
from controllers.autoscaling.algorithms import Decision, MetricWindow, ScalerState, ScalingPolicy, apa, kpa
from controllers.config import ControllerSettings
from controllers.runtime.conditions import find_condition, set_condition, write_status
from controllers.runtime.controller import Controller, Result, generation_changed
from controllers.runtime.events import EventRecorder
from controllers.runtime.manager import Manager

log = logging.getLogger(__name__)

STATE_ANNOTATION = "brickyard.dev/scaler-state"
MANAGED_BY = {"app.kubernetes.io/managed-by": "brickyard-controllers"}
STRATEGIES = ("HPA", "KPA", "APA")
SAMPLED_SOURCES = ("redis", "pod", "external", "domain")

#: Pod-metrics record fields by the names a ``targetMetric`` may use.
RECORD_METRICS: dict[str, tuple[str, ...]] = {
    "waiting": ("waiting",),
    "queue_length": ("waiting",),
    "num_requests_waiting": ("waiting",),
    "vllm:num_requests_waiting": ("waiting",),
    "running": ("running",),
    "num_requests_running": ("running",),
    "vllm:num_requests_running": ("running",),
    "kv_usage": ("kv_usage",),
    "kv_cache_usage_perc": ("kv_usage",),
    "gpu_cache_usage_perc": ("kv_usage",),
    "vllm:kv_cache_usage_perc": ("kv_usage",),
    "vllm:gpu_cache_usage_perc": ("kv_usage",),
    "prompt_tps": ("prompt_tps",),
    "generation_tps": ("generation_tps",),
    "throughput": ("prompt_tps", "generation_tps"),
    "token_throughput": ("prompt_tps", "generation_tps"),
    "ttft_mean": ("ttft_mean",),
    "tpot_mean": ("tpot_mean",),
    "queue_mean": ("queue_mean",),
}

#: Spec tunables: (spec field, ScalingPolicy field).
_TUNABLES = (
    ("stableWindowSeconds", "stable_window_seconds"),
    ("panicWindowSeconds", "panic_window_seconds"),
    ("panicThreshold", "panic_threshold"),
    ("maxScaleUpRate", "max_scale_up_rate"),
    ("maxScaleDownRate", "max_scale_down_rate"),
    ("upTolerance", "up_tolerance"),
    ("downTolerance", "down_tolerance"),
    ("scaleUpCooldownSeconds", "scale_up_cooldown_seconds"),
    ("scaleDownCooldownSeconds", "scale_down_cooldown_seconds"),
)


class MetricError(Exception):
    """No usable sample: the reason goes into the ScalingActive condition."""


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite")
    return number


def policy_of(spec: Mapping[str, Any]) -> ScalingPolicy:
    """The ``ScalingPolicy`` of a PodAutoscaler spec; ``ValueError`` names what is wrong."""
    sources = spec.get("metricsSources") or []
    target = _number(sources[0].get("targetValue"), "metricsSources[0].targetValue") if sources else 1.0
    kwargs: dict[str, Any] = {
        "min_replicas": int(spec.get("minReplicas", 1)),
        "max_replicas": int(spec["maxReplicas"]),
        "target_value": target,
    }
    for field_name, policy_name in _TUNABLES:
        if spec.get(field_name) is not None:
            kwargs[policy_name] = _number(spec[field_name], field_name)
    return ScalingPolicy(**kwargs)


def validate(spec: Mapping[str, Any]) -> list[str]:
    problems = []
    ref = spec.get("scaleTargetRef")
    if not isinstance(ref, dict) or not all(ref.get(k) for k in ("apiVersion", "kind", "name")):
        problems.append("spec.scaleTargetRef needs apiVersion, kind and name")
    if not isinstance(spec.get("maxReplicas"), int):
        problems.append("spec.maxReplicas is required")
    strategy = spec.get("scalingStrategy", "KPA")
    if strategy not in STRATEGIES:
        problems.append(f"spec.scalingStrategy must be one of {', '.join(STRATEGIES)}")
    sources = spec.get("metricsSources") or []
    if strategy != "HPA":
        if not sources:
            problems.append("spec.metricsSources needs an entry with KPA and APA")
        elif sources[0].get("metricSourceType", "redis") not in SAMPLED_SOURCES:
            problems.append(
                f"metricsSources[0].metricSourceType must be one of {', '.join(SAMPLED_SOURCES)} with "
                f"{strategy} (resource and custom metrics need scalingStrategy HPA)"
            )
        elif not sources[0].get("targetMetric"):
            problems.append("metricsSources[0].targetMetric is required")
    if not problems:
        try:
            policy_of(spec)
        except (ValueError, TypeError) as exc:
            problems.append(str(exc))
    return problems


@dataclass
class _Scaler:
    """The in-memory half of an autoscaler: its sample window (for one generation of its spec)."""

    generation: int
    window: MetricWindow
    last_sample: float = 0.0
    #: The decisions' memory; read from the annotation when the controller (re)starts, then kept here
    #: (the annotation, written on change, may lag in the cache).
    state: ScalerState | None = None


class PodAutoscalerController:
    def __init__(
        self,
        manager: Manager,
        settings: ControllerSettings,
        session: aiohttp.ClientSession,
        redis: aioredis.Redis | None,
        recorder: EventRecorder,
    ) -> None:
        self.client: KubeClient = manager.client
        self.settings = settings.pod_autoscaler
        self.session = session
        self.redis = redis
        self.recorder = recorder
        self.autoscalers = manager.informer(POD_AUTOSCALERS)
        self.controller = Controller(
            "pod-autoscaler",
            self.reconcile,
            self.autoscalers,
            primary_predicate=generation_changed,
            workers=settings.workers,
            resync_seconds=settings.resync_seconds,
            backoff_base=settings.backoff_base_seconds,
            backoff_max=settings.backoff_max_seconds,
        )
        self._scalers: dict[str, _Scaler] = {}  # by object uid
        manager.add(self.controller)

    async def reconcile(self, key: str) -> Result:
        obj = self.autoscalers.get(key)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self._forget(key)
            return Result()  # the HPA it may own goes with it (owner reference)
        spec = obj.get("spec") or {}
        problems = validate(spec)
        if problems:
            message = "; ".join(problems)
            status = self._status(obj)
            status["conditions"] = set_condition(
                status["conditions"], "ScalingActive", False, "InvalidSpec", message
            )
            if await write_status(self.client, POD_AUTOSCALERS, obj, status) is not None:
                await self.recorder.warning(obj, "InvalidSpec", message)
            return Result()
        if spec.get("scalingStrategy", "KPA") == "HPA":
            await self._reconcile_hpa(obj)
            return Result()
        await self._delete_owned_hpa(obj)
        return await self._reconcile_scaler(obj)

    def _forget(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        for uid in [uid for uid, _ in self._scalers.items() if uid.startswith(f"{namespace}/{name}/")]:
            del self._scalers[uid]

    # -- KPA / APA ----------------------------------------------------------------------------------------

    async def _reconcile_scaler(self, obj: Obj) -> Result:
        meta, spec = obj["metadata"], obj["spec"]
        sample_every = self.settings.sample_seconds
        scaler = self._scaler(obj, spec)
        now = time.time()
        if now - scaler.last_sample < sample_every * 0.9:
            return Result(requeue_after=scaler.last_sample + sample_every - now)  # woken early
        scaler.last_sample = now
        status = self._status(obj)
        conds = status["conditions"]

        ref = spec["scaleTargetRef"]
        try:
            target = await self.client.resource_for(ref["apiVersion"], ref["kind"])
            scale = await self.client.call("GET", target.path(meta["namespace"], ref["name"], "scale"))
        except ApiError as exc:
            status["conditions"] = set_condition(conds, "AbleToScale", False, "FailedGetScale", exc.message)
            if await write_status(self.client, POD_AUTOSCALERS, obj, status) is not None:
                await self.recorder.warning(obj, "FailedGetScale", exc.message)
            return Result(requeue_after=sample_every)
        current = int((scale.get("spec") or {}).get("replicas") or 0)
        status["actualScale"] = current

        source = spec["metricsSources"][0]
        try:
            value = await self._sample(meta["namespace"], source, (scale.get("status") or {}).get("selector"))
        except MetricError as exc:
            before = conds
            status["conditions"] = set_condition(conds, "ScalingActive", False, "FailedGetMetrics", str(exc))
            if (find_condition(before, "ScalingActive") or {}).get("status") != "False":
                await self.recorder.warning(obj, "FailedGetMetrics", str(exc))
            status["conditions"] = set_condition(
                status["conditions"], "AbleToScale", True, "ReadyForNewScale", "the scale subresource answers"
            )
            await write_status(self.client, POD_AUTOSCALERS, obj, status)
            return Result(requeue_after=sample_every)
        scaler.window.add(now, value)

        policy = policy_of(spec)
        if scaler.state is None:
            scaler.state = _state_of(obj)
        state = scaler.state
        state_before = state.to_dict()
        algorithm = apa if spec.get("scalingStrategy") == "APA" else kpa
        decision: Decision = algorithm(policy, scaler.window, current, now, state)
        conds = set_condition(
            conds,
            "ScalingActive",
            True,
            "ValidMetricFound",
            f"{source.get('metricSourceType', 'redis')} metric {source['targetMetric']}",
        )
        if decision.desired != current:
            try:
                await self.client.patch(
                    target,
                    meta["namespace"],
                    ref["name"],
                    {"spec": {"replicas": decision.desired}},
                    subresource="scale",
                )
            except ApiError as exc:
                scaler.state = ScalerState.from_dict(state_before)  # the decision did not happen
                status["conditions"] = set_condition(
                    conds, "AbleToScale", False, "FailedUpdateScale", exc.message
                )
                await self.recorder.warning(
                    obj, "FailedRescale", f"New size {decision.desired}: {exc.message}"
                )
                await write_status(self.client, POD_AUTOSCALERS, obj, status)
                return Result(requeue_after=sample_every)
            await self.recorder.normal(
                obj,
                "SuccessfulRescale",
                f"New size: {decision.desired} (was {current}); {spec.get('scalingStrategy', 'KPA')}: "
                f"{decision.reason}",
            )
            status["lastScaleTime"] = now_rfc3339()
            status["actualScale"] = decision.desired
            conds = set_condition(
                conds, "AbleToScale", True, "SucceededRescale", f"scaled to {decision.desired}"
            )
        else:
            conds = set_condition(
                conds, "AbleToScale", True, "ReadyForNewScale", "the scale subresource answers"
            )
        unbounded = "clamped to" in decision.reason  # the algorithms say when [min, max] cut the desire
        if unbounded and decision.desired >= policy.max_replicas:
            conds = set_condition(
                conds, "ScalingLimited", True, "TooManyReplicas", "the desire is above maxReplicas"
            )
        elif unbounded and decision.desired <= policy.min_replicas:
            conds = set_condition(
                conds, "ScalingLimited", True, "TooFewReplicas", "the desire is below minReplicas"
            )
        else:
            conds = set_condition(conds, "ScalingLimited", False, "DesiredWithinRange", "within [min, max]")
        status["conditions"] = conds
        status["desiredScale"] = decision.desired

        if state.to_dict() != state_before:
            obj = await self.client.patch(
                POD_AUTOSCALERS,
                meta["namespace"],
                meta["name"],
                {
                    "metadata": {
                        "annotations": {STATE_ANNOTATION: json.dumps(state.to_dict(), sort_keys=True)}
                    }
                },
            )
        await write_status(self.client, POD_AUTOSCALERS, obj, status)
        return Result(requeue_after=sample_every)

    def _scaler(self, obj: Obj, spec: Mapping[str, Any]) -> _Scaler:
        meta = obj["metadata"]
        uid = f"{meta['namespace']}/{meta['name']}/{meta.get('uid', '')}"
        generation = int(meta.get("generation") or 0)
        scaler = self._scalers.get(uid)
        if scaler is None or scaler.generation != generation:  # a new spec: a new window, the same state
            window = MetricWindow(policy_of(spec).stable_window_seconds)
            state = scaler.state if scaler is not None else None
            scaler = self._scalers[uid] = _Scaler(generation, window, state=state)
        return scaler

    def _status(self, obj: Obj) -> Obj:
        old = obj.get("status") or {}
        return {
            **old,
            "conditions": list(old.get("conditions") or []),
            "observedGeneration": obj["metadata"].get("generation"),
        }

    # -- metrics ------------------------------------------------------------------------------------------

    async def _sample(self, namespace: str, source: Mapping[str, Any], selector: str | None) -> float:
        """The fleet-wide total of the source's metric now."""
        kind = source.get("metricSourceType", "redis")
        metric = str(source["targetMetric"])
        if kind in ("external", "domain"):
            endpoint = str(source.get("endpoint") or "")
            if not endpoint:
                raise MetricError(f"{kind} source without an endpoint")
            url = endpoint if "://" in endpoint else f"http://{endpoint}"
            value = await self._scrape(url + str(source.get("path") or "/metrics"), metric)
            if value is None:
                raise MetricError(f"{url} does not expose {metric}")
            return value
        if not selector:
            raise MetricError("the target's scale subresource reports no pod selector")
        pods = [p for p in await self.client.list(PODS, namespace, label_selector=selector) if pod_ready(p)]
        if not pods:
            raise MetricError("the target has no Ready pod")
        if kind == "redis":
            values = await self._records(namespace, pods, metric)
        else:
            port, path = source.get("port"), str(source.get("path") or "/metrics")
            if not str(port or "").isdigit():
                raise MetricError("pod source without a port")
            values = list(
                await asyncio.gather(
                    *(self._scrape(f"http://{p['status']['podIP']}:{port}{path}", metric) for p in pods)
                )
            )
        reported = [v for v in values if v is not None]
        if not reported:
            raise MetricError(f"no Ready pod of the target reported {metric} ({kind})")
        return sum(reported) + (len(values) - len(reported)) * (sum(reported) / len(reported))

    async def _records(self, namespace: str, pods: list[Obj], metric: str) -> list[float | None]:
        """Each pod's ``metric`` from its fresh, healthy record; None for a pod without one."""
        fields = RECORD_METRICS.get(metric, (metric,))
        if self.redis is None:
            raise MetricError("redis metric source but no redis_url configured")
        names = [p["metadata"]["name"] for p in pods]
        try:
            found = await read_records(
                self.redis,
                [pod_key(namespace, name) for name in names],
                max_age=self.settings.metrics_stale_seconds,
            )
        except (RedisError, OSError) as exc:
            raise MetricError(f"Redis: {exc}") from exc
        records = {pod: record for _, pod, record in found if record.healthy}
        try:
            return [
                float(sum(getattr(records[name], f) for f in fields)) if name in records else None
                for name in names
            ]
        except (AttributeError, TypeError):
            raise MetricError(f"pod-metrics records have no field {metric!r}") from None

    async def _scrape(self, url: str, metric: str) -> float | None:
        """The sum of the series named ``metric`` on a Prometheus text endpoint; None if unavailable."""
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.metrics_timeout_seconds)
            async with self.session.get(url, timeout=timeout) as response:
                if response.status != 200:
                    return None
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        total, found = 0.0, False
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == metric or (family.name == metric and sample.name == f"{metric}_total"):
                        total += sample.value
                        found = True
        except ValueError:
            return None
        return total if found else None

    # -- HPA --------------------------------------------------------------------------------------------

    def _hpa_manifest(self, obj: Obj) -> Obj:
        meta, spec = obj["metadata"], obj["spec"]
        ref = spec["scaleTargetRef"]
        metrics = []
        for source in spec.get("metricsSources") or []:
            name, target = str(source.get("targetMetric") or "cpu"), source.get("targetValue")
            if source.get("metricSourceType") == "resource" or name in ("cpu", "memory"):
                metrics.append(
                    {
                        "type": "Resource",
                        "resource": {
                            "name": name,
                            "target": {"type": "Utilization", "averageUtilization": round(float(target))},
                        },
                    }
                )
            else:
                metrics.append(
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": name},
                            "target": {"type": "AverageValue", "averageValue": str(target)},
                        },
                    }
                )
        hpa_spec: Obj = {
            "scaleTargetRef": {"apiVersion": ref["apiVersion"], "kind": ref["kind"], "name": ref["name"]},
            "minReplicas": max(1, int(spec.get("minReplicas", 1))),
            "maxReplicas": int(spec["maxReplicas"]),
        }
        if metrics:
            hpa_spec["metrics"] = metrics
        return {
            "apiVersion": HPAS.api_version,
            "kind": HPAS.kind,
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "labels": dict(MANAGED_BY),
                "ownerReferences": [owner_reference(obj, POD_AUTOSCALERS)],
            },
            "spec": hpa_spec,
        }

    async def _reconcile_hpa(self, obj: Obj) -> None:
        meta = obj["metadata"]
        want = self._hpa_manifest(obj)
        have = await self.client.get(HPAS, meta["namespace"], meta["name"])
        status = self._status(obj)
        if have is None:
            have = await self.client.create(HPAS, meta["namespace"], want)
            await self.recorder.normal(obj, "HPACreated", f"HorizontalPodAutoscaler {meta['name']} created")
        elif not _owned_by(have, obj):
            message = f"a HorizontalPodAutoscaler {meta['name']} exists that this PodAutoscaler does not own"
            status["conditions"] = set_condition(
                status["conditions"], "AbleToScale", False, "HPAConflict", message
            )
            if await write_status(self.client, POD_AUTOSCALERS, obj, status) is not None:
                await self.recorder.warning(obj, "HPAConflict", message)
            return
        elif not (
            _contains(have.get("spec"), want["spec"])
            and _contains(have["metadata"].get("labels"), MANAGED_BY)
            and have["metadata"].get("ownerReferences") == want["metadata"]["ownerReferences"]
        ):
            updated = {**have, "spec": {**(have.get("spec") or {}), **want["spec"]}}
            updated["metadata"] = {
                **have["metadata"],
                "labels": {**(have["metadata"].get("labels") or {}), **MANAGED_BY},
                "ownerReferences": want["metadata"]["ownerReferences"],
            }
            have = await self.client.replace(HPAS, updated)
            await self.recorder.normal(obj, "HPAUpdated", f"HorizontalPodAutoscaler {meta['name']} updated")
        hpa_status = have.get("status") or {}
        status["desiredScale"] = hpa_status.get("desiredReplicas", 0)
        status["actualScale"] = hpa_status.get("currentReplicas", 0)
        if hpa_status.get("lastScaleTime"):
            status["lastScaleTime"] = hpa_status["lastScaleTime"]
        mirrored = {c.get("type"): c for c in hpa_status.get("conditions") or []}
        conds = status["conditions"]
        for type_ in ("AbleToScale", "ScalingActive", "ScalingLimited"):
            if type_ in mirrored:
                c = mirrored[type_]
                conds = set_condition(
                    conds, type_, c.get("status") == "True", c.get("reason") or "HPA", c.get("message") or ""
                )
        if "AbleToScale" not in mirrored:
            conds = set_condition(
                conds, "AbleToScale", True, "DelegatedToHPA", f"HorizontalPodAutoscaler {meta['name']} scales"
            )
        status["conditions"] = conds
        await write_status(self.client, POD_AUTOSCALERS, obj, status)

    async def _delete_owned_hpa(self, obj: Obj) -> None:
        """After a spec change (possibly off HPA), delete the HPA this PodAutoscaler owns, if any."""
        meta = obj["metadata"]
        if (obj.get("status") or {}).get("observedGeneration") == meta.get("generation"):
            return  # this spec was reconciled already
        have = await self.client.get(HPAS, meta["namespace"], meta["name"])
        if have is not None and _owned_by(have, obj):
            await self.client.delete(HPAS, meta["namespace"], meta["name"])
            await self.recorder.normal(obj, "HPADeleted", f"HorizontalPodAutoscaler {meta['name']} deleted")


def _owned_by(child: Obj, owner: Obj) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in child["metadata"].get("ownerReferences") or [])


def _state_of(obj: Obj) -> ScalerState:
    text = (obj["metadata"].get("annotations") or {}).get(STATE_ANNOTATION)
    if text:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return ScalerState.from_dict(json.loads(text))
    return ScalerState()


def _contains(have: Any, want: Any) -> bool:
    """Whether ``have`` holds everything ``want`` says (server-side defaults in ``have`` are fine)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_contains(have.get(k), v) for k, v in want.items())
    return have == want
