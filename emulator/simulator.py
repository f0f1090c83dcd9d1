"""Fleet simulator: N engine models, one workload and the gateway's own router, in virtual time.

No sockets and no clock: a discrete-event loop over arrivals and engine steps.
Each arrival is routed by the very ``Router`` and strategy objects the gateway
uses, reading ``PodState`` exactly as in production: in-flight counts taken at
selection and released when the request finishes, and pod-metrics records
that reach the router ``metrics_delay`` after each scrape (the sidecar's scrape
interval plus the Redis hop), built by the same ``MetricsWindow`` the sidecar uses.

An optional ``Autoscaler`` makes the fleet elastic: every ``interval`` virtual
seconds it sees the ready engines' load (``FleetMetrics``) and returns the
number of engines it wants. New engines become routable ``FleetSpec.cold_start``
seconds later (pod start and model load); engines taken away leave routing at
once and drain: they finish what they hold, then stop. ``FleetResult.timeline``
records the provisioned engines over time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from brickyard_core.podmetrics import EngineSample, MetricsWindow, PodMetrics
from emulator.engine import EngineCore, EngineStats, Request, RequestResult
from emulator.kv_events import encode_batch
from emulator.profile import load_profile
from emulator.results import RequestOutcome, summarize
from emulator.tokens import EmulatorTokenizer
from emulator.workloads import WorkloadRequest
from gateway_plugins.config import RoutingSettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.kv_events import decode_payload
from gateway_plugins.request_parsing import parse_body
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.router import Decision, Router
from gateway_plugins.routing.strategies import Strategy, build_strategies
from gateway_plugins.routing.types import Endpoint, PodState

Clock = Callable[[], float]
#: Builds the router's strategies on the simulator's clock and random source.
StrategiesFactory = Callable[[Clock, random.Random, KvBlockIndex | None], Mapping[str, Strategy]]


@dataclass
class FleetSpec:
    engines: int = 16
    profile: str = "llama-3.1-8b_h100"
    #: A heterogeneous fleet: engine count per profile name (engines numbered in this order); replaces
    #: ``engines`` x ``profile``. Each engine's pod carries its profile's GPU in its label and its records.
    fleet: dict[str, int] | None = None
    model: str = "llama-3.1-8b-instruct"
    strategy: str = "least-request"
    #: Seconds between metric scrapes of each engine (the sidecar's interval); 0 disables metrics.
    metrics_interval: float = 0.05
    #: Seconds from a scrape until the router sees it (publish to Redis, gateway poll).
    metrics_delay: float = 0.05
    #: Trailing window of the rates and means in each record.
    metrics_window: float = 2.0
    max_loras: int | None = None
    seed: int = 0  # seeds the run's random source: tie-breaks, the random strategies' draws
    #: Strategy knobs and presets, as in the gateway's configuration.
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    #: The engines publish their KV-cache events and the prefix-aware strategies match on them (the
    #: gateway's exact index, ``kv_events.enabled``): each step's batch, encoded as vLLM encodes it and
    #: decoded as the gateway decodes it, reaches the index ``kv_events_delay`` seconds after the step.
    kv_events: bool = False
    kv_events_delay: float = 0.001
    #: With an autoscaler: seconds from an engine's creation until it is routable (scheduling, image pull,
    #: model load); it is provisioned (costs GPU time) from its creation.
    cold_start: float = 60.0

    def engine_profiles(self) -> list[str]:
        """The profile of each engine, in engine order."""
        fleet = self.fleet if self.fleet is not None else {self.profile: self.engines}
        return [name for name, count in fleet.items() for _ in range(count)]


@dataclass(frozen=True, slots=True)
class FleetMetrics:
    """What an autoscaler sees at one evaluation: the engine counts, and the load on the ready engines
    (sums over them, read from the engine models at ``now``)."""

    now: float
    ready: int  # routable engines
    starting: int  # created, not routable yet (cold start)
    draining: int  # out of routing, finishing their requests
    waiting: int  # requests queued in the ready engines
    running: int  # requests in the ready engines' batches
    kv_usage: float  # sum of the ready engines' KV-cache usage fractions
    seats: int  # sum of the ready engines' max_num_seqs

    @property
    def replicas(self) -> int:
        """The replica count a Deployment would report: starting and ready engines."""
        return self.ready + self.starting


class Autoscaler(Protocol):
    """Decides the fleet's size; called every ``interval`` virtual seconds, from one ``interval`` after the
    first arrival on, while the run has work."""

    interval: float

    def desired(self, metrics: FleetMetrics) -> int:
        """The number of engines (starting and ready) wanted from now on."""
        ...


@dataclass(frozen=True, slots=True)
class FleetPoint:
    """The fleet from ``time`` on (elastic runs): engines per phase and the autoscaler's last wish."""

    time: float
    starting: int
    ready: int
    draining: int
    desired: int

    @property
    def provisioned(self) -> int:
        return self.starting + self.ready + self.draining


@dataclass
class FleetResult:
    outcomes: list[RequestOutcome]
    #: Virtual seconds from the first arrival to the last finish.
    duration: float
    engine_stats: list[EngineStats]
    rejected: int
    wall_seconds: float
    routed: dict[str, int] = field(default_factory=dict)
    #: Elastic runs only: a point at the start, at every autoscaler evaluation and at every phase change.
    timeline: list[FleetPoint] = field(default_factory=list)
    #: Requests whose prefix-aware decision predicted their cached tokens, by the index it used (``exact``
    #: or ``approximate``): (predictions equal to what the engine reported, predictions made).
    predictions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def engine_seconds(self, end: float, start: float = 0.0) -> float:
        """Provisioned engine-seconds over ``[start, end]`` (cold-starting and draining engines count); a
        static fleet holds all its engines throughout."""
        if not self.timeline:
            return len(self.engine_stats) * (end - start)
        total = 0.0
        for point, after in zip(self.timeline, [*self.timeline[1:], None], strict=True):
            until = min(end, after.time if after is not None else end)
            total += point.provisioned * max(0.0, until - max(start, point.time))
        return total

    def summary(self) -> dict[str, float]:
        hits = sum(s.prefix_cache_hits for s in self.engine_stats)
        queries = sum(s.prefix_cache_queries for s in self.engine_stats)
        return {
            **summarize(self.outcomes, duration=self.duration, prefix_hits=hits, prefix_queries=queries),
            "rejected": self.rejected,
            "preemptions": sum(s.num_preemptions for s in self.engine_stats),
            "wall_seconds": self.wall_seconds,
        }


@dataclass(frozen=True, slots=True)
class _KvBatch:
    """One engine's KV events of a step, as published (vLLM's msgpack payload)."""

    pod: tuple[str, str]
    seq: int
    payload: bytes


class _Engine:
    """One simulated engine pod: its model, its pod state, its metrics window, what it is doing.

    An engine is idle, running one committed step (``busy_until``: its end), or in a *planned* run of
    identical decode-only steps from ``run_start`` that is committed only when it ends or when a new request
    interrupts it (``EngineCore.decode_run_end``): an engine nobody sends work to costs an event per finish,
    not per step. ``version`` invalidates heap entries a change of plan made stale.
    """

    __slots__ = (
        "busy_until",
        "core",
        "info",
        "kv_seq",
        "phase",
        "pod",
        "ready_at",
        "run_start",
        "version",
        "window",
    )

    def __init__(self, core: EngineCore, pod: PodState, window: MetricsWindow) -> None:
        self.core = core
        self.pod = pod
        self.window = window
        self.busy_until: float | None = None
        self.run_start: float | None = None
        self.version = 0
        self.kv_seq = 0  # sequence number of its next KV-event batch
        #: Elastic fleets: "starting" until ``ready_at``, "ready", "draining", "stopped".
        self.phase = _READY
        self.ready_at = 0.0
        self.info: PodInfo | None = None  # what discovery reports once it is ready (elastic fleets)


_STARTING, _READY, _DRAINING, _STOPPED = "starting", "ready", "draining", "stopped"


class FleetSimulator:
    def __init__(
        self,
        spec: FleetSpec,
        *,
        strategies: Mapping[str, Strategy] | StrategiesFactory | None = None,
        autoscaler: Autoscaler | None = None,
    ) -> None:
        """``strategies``: the router's strategies, or a factory of them given the virtual clock, the
        run's random source and the exact prefix index (None without ``spec.kv_events``) (default:
        ``build_strategies(spec.routing)`` on the three; strategies given as a mapping keep the random
        source they were built with, and have no exact index). ``autoscaler``: makes
        the fleet elastic (module docstring); ``spec`` then gives its initial size, and its engines share
        one profile."""
        self.spec = spec
        names = spec.engine_profiles()
        if autoscaler is not None and len(set(names)) > 1:
            raise ValueError("an autoscaled fleet has one profile")
        loaded = {name: load_profile(name) for name in set(names)}
        profiles = [loaded[name] for name in names]
        label = spec.routing.gpu_type.label
        registry = PodRegistry()
        registry.replace_all(
            PodInfo(f"engine-{i}", f"10.0.{i // 256}.{i % 256}:8000", spec.model, labels={label: profile.gpu})
            for i, profile in enumerate(profiles)
        )
        #: Virtual time of the event being processed: the clock of strategies that expire state.
        self.now = 0.0
        #: The one random source of the strategies and the router's tie-breaks: a seed gives one run.
        self.rng = random.Random(spec.seed)
        #: The engines' prefix caches as their KV events tell them (``FleetSpec.kv_events``).
        self.kv_index = KvBlockIndex(self.clock) if spec.kv_events else None
        if strategies is None:
            strategies = build_strategies(
                spec.routing, clock=self.clock, rng=self.rng, kv_index=self.kv_index
            )
        elif callable(strategies):
            strategies = strategies(self.clock, self.rng, self.kv_index)
        self.router = Router(
            registry,
            strategies,
            default_strategy=spec.strategy,
            rng=self.rng,
            tokenizers={spec.model: EmulatorTokenizer()},
        )
        pods = {pod.name: pod for pod in registry.ready_pods(spec.model)}
        self.engines = [
            _Engine(
                EngineCore(profile, max_loras=spec.max_loras),
                pods[f"engine-{i}"],
                MetricsWindow(spec.metrics_window, gpu_type=profile.gpu),
            )
            for i, profile in enumerate(profiles)
        ]
        self._by_pod = {id(engine.pod): engine for engine in self.engines}
        if spec.kv_events:
            for engine in self.engines:
                engine.core.enable_kv_events()
        #: Engine events in time order: (time, tie-break, engine, its version), or (time, tie-break, None,
        #: result) for a finish committed ahead of the time it happens.
        self._events: list[tuple[float, int, _Engine | None, Any]] = []
        self._tie = itertools.count()
        self._decisions: dict[str, Decision] = {}
        self._outcomes: list[RequestOutcome] = []
        self._predictions: dict[str, list[int]] = {}
        #: Scraped records on their way to the router: (time they become visible, one record per engine).
        self._published: deque[tuple[float, list[PodMetrics]]] = deque()
        self._next_scrape = math.inf
        #: LoRA adapters registered on every engine (``_register_adapter``).
        self._adapters: tuple[str, ...] = ()
        #: The engines that are scraped: the ready ones.
        self._active = list(self.engines)
        self.autoscaler = autoscaler
        self._profile = profiles[0] if profiles else load_profile(spec.profile)
        self._starting: deque[_Engine] = deque()  # cold-starting engines, in the order they become ready
        self._timeline: list[FleetPoint] = []
        self._desired = len(self.engines)
        self._next_tick = math.inf
        #: The next autoscaler evaluation or end of a cold start; infinite without an autoscaler.
        self._next_control = math.inf
        self._input_done = False

    def clock(self) -> float:
        """Virtual time, for strategies that expire state."""
        return self.now

    def run(self, requests: Iterable[WorkloadRequest]) -> FleetResult:
        started = time.perf_counter()
        spec = self.spec
        rejected, first_arrival = 0, None
        routed: dict[str, int] = {}
        for number, request in enumerate(requests):
            now = request.arrival
            if first_arrival is None:
                first_arrival = now
                if self.autoscaler is not None:
                    self._record(self.now)
                    self._next_tick = self._next_control = now + self.autoscaler.interval
            if self._next_scrape == math.inf and spec.metrics_interval > 0:
                self._next_scrape = now  # scrapes pause while the fleet is idle
            self._run_until(now)
            self.now = now
            if not self.router.registry.knows_model(request.model):
                self._register_adapter(request.model)
            try:  # the request as a client sends it, read as the gateway reads it
                routing = parse_body(Endpoint.COMPLETIONS, request.body(), session_id=request.session or None)
                decision = self.router.route(routing)
            except GatewayError:
                rejected += 1
                continue
            rid = f"req-{number}"
            self._decisions[rid] = decision
            routed[decision.pod.name] = routed.get(decision.pod.name, 0) + 1
            engine = self._by_pod[id(decision.pod)]
            lora = request.model if request.model != spec.model else None
            if engine.run_start is not None:
                self._interrupt(engine, now)
            engine.core.add_request(Request(rid, request.prompt_ids, request.max_tokens, lora, now), now)
            if engine.busy_until is None:
                self._plan(engine, now)
        self._input_done = True
        self._run_until(math.inf)
        outcomes = self._outcomes
        end = max((o.arrival + o.e2e for o in outcomes), default=0.0)
        return FleetResult(
            outcomes=outcomes,
            duration=end - (first_arrival or 0.0),
            engine_stats=[engine.core.stats() for engine in self.engines],
            rejected=rejected,
            wall_seconds=time.perf_counter() - started,
            routed=routed,
            timeline=self._timeline,
            predictions={index: (hit, made) for index, (hit, made) in self._predictions.items()},
        )

    def _register_adapter(self, adapter: str) -> None:
        """Assumption: every adapter of the workload is registered on every engine, as if each sidecar had
        loaded them all; each one is registered when its first request arrives, so that a workload need not
        be known in advance. Which adapters are in a GPU slot is up to the engine model (``max_loras``)."""
        self._adapters += (adapter,)
        for engine in self.engines:
            if engine.phase == _READY:
                self.router.registry.set_adapters(engine.pod.namespace, engine.pod.name, self._adapters)

    # -- events ---------------------------------------------------------------------------------

    def _run_until(self, t: float) -> None:
        """Process every engine event, scrape and metrics delivery up to time ``t``, in time order."""
        events, published = self._events, self._published
        while True:
            event = events[0][0] if events else math.inf
            visible = published[0][0] if published else math.inf
            now = min(event, visible, self._next_scrape, self._next_control)
            if now > t or now == math.inf:
                return
            self.now = now
            if now == event:
                _, _, engine, payload = heapq.heappop(events)
                if engine is None:
                    if isinstance(payload, _KvBatch):
                        self._deliver(payload)
                    else:
                        self._finished(payload)
                elif payload == engine.version:
                    self._on_engine_event(engine, now)
            elif now == visible:
                for pod, record in published.popleft()[1]:
                    pod.apply_metrics(record)
            elif now == self._next_scrape:
                self._scrape(now)
            else:
                self._control(now)

    def _plan(self, engine: _Engine, now: float) -> None:
        """Decide what an engine with work does from ``now``: a planned decode run, or one committed step."""
        engine.version += 1
        core = engine.core
        run_end = core.decode_run_end(now)
        if run_end is not None:
            engine.run_start, engine.busy_until, end = now, None, run_end
        else:
            out = core.step(now)
            if not out.num_steps:  # nothing schedulable: wait for the next arrival
                engine.busy_until = None
                return
            engine.busy_until = end = out.end
            self._finish_all(out.finished, now)
            self._publish(engine, end)
        heapq.heappush(self._events, (end, next(self._tie), engine, engine.version))

    def _on_engine_event(self, engine: _Engine, now: float) -> None:
        if engine.run_start is not None:  # a planned run reached its end uninterrupted
            out = engine.core.run_decodes(engine.run_start)
            engine.run_start = None
            self._finish_all(out.finished, now)
            self._publish(engine, now)
        engine.busy_until = None
        if engine.core.has_unfinished_requests:
            self._plan(engine, now)

    def _interrupt(self, engine: _Engine, now: float) -> None:
        """A request arrives during a planned run: commit the steps that started before it."""
        out = engine.core.advance(engine.run_start, now)  # type: ignore[arg-type]
        engine.run_start = None
        self._finish_all(out.finished, now)
        self._publish(engine, now)
        engine.version += 1
        engine.busy_until = out.end
        heapq.heappush(self._events, (out.end, next(self._tie), engine, engine.version))

    def _publish(self, engine: _Engine, at: float) -> None:
        """The engine's KV events since its last batch, on their way to the index (when it has one)."""
        if self.kv_index is None:
            return
        events = engine.core.take_kv_events()
        if events:
            batch = _KvBatch((engine.pod.namespace, engine.pod.name), engine.kv_seq, encode_batch(events, at))
            engine.kv_seq += 1
            heapq.heappush(self._events, (at + self.spec.kv_events_delay, next(self._tie), None, batch))

    def _deliver(self, batch: _KvBatch) -> None:
        assert self.kv_index is not None
        self.kv_index.apply(batch.pod, batch.seq, decode_payload(batch.payload)[1])

    def _finish_all(self, results: list[RequestResult], now: float) -> None:
        """Release finishes as they happen: at ``now``, or later for a step committed ahead of its end."""
        for result in results:
            if result.finished <= now:
                self._finished(result)
            else:
                heapq.heappush(self._events, (result.finished, next(self._tie), None, result))

    def _finished(self, result: RequestResult) -> None:
        decision = self._decisions.pop(result.request_id)
        self.router.release(decision)
        if decision.pod.inflight == 0 and self.autoscaler is not None:
            engine = self._by_pod[id(decision.pod)]
            if engine.phase == _DRAINING:
                self._stop(engine, self.now)
        predicted = decision.request.predicted
        if predicted is not None:
            tally = self._predictions.setdefault(predicted.index, [0, 0])
            tally[0] += predicted.cached_tokens == result.cached_prompt_tokens
            tally[1] += 1
        first_token = result.first_token if result.first_token is not None else result.finished
        self._outcomes.append(
            RequestOutcome(
                result.arrival,
                first_token - result.arrival,
                result.e2e,
                result.output_tokens,
                result.prompt_tokens,
                decision.pod.name,
                result.cached_prompt_tokens,
            )
        )

    def _scrape(self, now: float) -> None:
        records = [(engine.pod, engine.window.update(_sample(engine.core, now))) for engine in self._active]
        self._published.append((now + self.spec.metrics_delay, records))
        self._next_scrape = now + self.spec.metrics_interval if self._events else math.inf

    # -- elasticity ---------------------------------------------------------------------------

    def _control(self, now: float) -> None:
        """Ends of cold starts, then an autoscaler evaluation, as due at ``now``."""
        while self._starting and self._starting[0].ready_at <= now:
            self._make_ready(self._starting.popleft(), now)
        if self._next_tick <= now:
            autoscaler = self.autoscaler
            assert autoscaler is not None  # ticks are only scheduled with one
            self._evaluate(autoscaler, now)
            more = not self._input_done or self._events or self._starting
            self._next_tick = now + autoscaler.interval if more else math.inf
        self._next_control = min(self._next_tick, self._starting[0].ready_at if self._starting else math.inf)

    def _evaluate(self, autoscaler: Autoscaler, now: float) -> None:
        ready = [engine for engine in self.engines if engine.phase == _READY]
        waiting = running = seats = 0
        kv_usage = 0.0
        for engine in ready:
            scheduler = engine.core.scheduler
            waiting += len(scheduler.waiting)
            running += scheduler.num_running
            seats += scheduler.max_num_seqs
            kv_usage += engine.core.kv.usage
        draining = sum(engine.phase == _DRAINING for engine in self.engines)
        metrics = FleetMetrics(
            now, len(ready), len(self._starting), draining, waiting, running, kv_usage, seats
        )
        self._desired = desired = max(0, int(autoscaler.desired(metrics)))
        current = metrics.replicas
        for _ in range(desired - current):
            self._create(now)
        if desired < current:
            self._shrink(current - desired, ready, now)
        self._record(now)

    def _create(self, now: float) -> None:
        """A new engine, routable after the cold start."""
        spec, profile, number = self.spec, self._profile, len(self.engines)
        name = f"engine-{number}"
        info = PodInfo(
            name,
            f"10.0.{number // 256}.{number % 256}:8000",
            spec.model,
            labels={spec.routing.gpu_type.label: profile.gpu},
        )
        pod = PodState(info.name, info.address, info.model, info.namespace, dict(info.labels))
        engine = _Engine(
            EngineCore(profile, max_loras=spec.max_loras),
            pod,
            MetricsWindow(spec.metrics_window, gpu_type=profile.gpu),
        )
        if spec.kv_events:
            engine.core.enable_kv_events()
        engine.phase, engine.ready_at, engine.info = _STARTING, now + spec.cold_start, info
        self.engines.append(engine)
        if spec.cold_start <= 0:
            self._make_ready(engine, now)
        else:
            self._starting.append(engine)

    def _make_ready(self, engine: _Engine, now: float) -> None:
        registry, info = self.router.registry, engine.info
        assert info is not None
        registry.upsert(info)
        pod = registry.state(info.namespace, info.name)
        assert pod is not None
        engine.pod = pod
        if self._adapters:
            registry.set_adapters(info.namespace, info.name, self._adapters)
        self._by_pod[id(engine.pod)] = engine
        engine.phase = _READY
        self._active.append(engine)
        self._record(now)

    def _shrink(self, count: int, ready: list[_Engine], now: float) -> None:
        """Remove ``count`` engines: cold-starting ones first (newest first), then the ready engines with
        the fewest requests in flight (newest first on ties), which drain."""
        while count and self._starting:
            engine = self._starting.pop()
            engine.phase = _STOPPED
            count -= 1
        order = sorted(range(len(ready)), key=lambda i: (ready[i].pod.inflight, -i))
        for i in order[:count]:
            engine = ready[i]
            self.router.registry.remove(engine.pod.namespace, engine.pod.name)
            engine.phase = _DRAINING
            self._active.remove(engine)
            if engine.pod.inflight == 0:
                self._stop(engine, now)

    def _stop(self, engine: _Engine, now: float) -> None:
        engine.phase = _STOPPED
        self._record(now)

    def _record(self, now: float) -> None:
        phases = [engine.phase for engine in self.engines]
        point = FleetPoint(
            now, phases.count(_STARTING), phases.count(_READY), phases.count(_DRAINING), self._desired
        )
        timeline = self._timeline
        if timeline and timeline[-1].time == now:
            timeline[-1] = point
        else:
            timeline.append(point)


def _sample(core: EngineCore, now: float) -> EngineSample:
    stats = core.stats()
    histograms = stats.histograms
    ttft, itl, queue = (
        histograms["time_to_first_token"],
        histograms["inter_token_latency"],
        histograms["request_queue_time"],
    )
    return EngineSample(
        timestamp=now,
        waiting=stats.num_waiting,
        running=stats.num_running,
        kv_usage=stats.kv_cache_usage,
        prefix_queries=stats.prefix_cache_queries,
        prefix_hits=stats.prefix_cache_hits,
        prompt_tokens=stats.prompt_tokens,
        generation_tokens=stats.generation_tokens,
        ttft_sum=ttft.sum,
        ttft_count=ttft.count,
        itl_sum=itl.sum,
        itl_count=itl.count,
        queue_sum=queue.sum,
        queue_count=queue.count,
        running_adapters=tuple(stats.running_lora_adapters),
        waiting_adapters=tuple(stats.waiting_lora_adapters),
        max_loras=stats.max_loras,
        block_size=stats.block_size,
        num_blocks=stats.num_blocks,
    )
