"""One gateway process: discovery -> registry -> router -> ext_proc service, plus health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time

from aiohttp import web
from prometheus_client import CollectorRegistry

from brickyard_core.credentials import read_secret, redis_client
from gateway_plugins.admin import admin_app
from gateway_plugins.config import GatewaySettings, TenancySettings
from gateway_plugins.discovery.kubernetes import KubernetesDiscovery, ModelAdapterDiscovery
from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.discovery.static import StaticDiscovery
from gateway_plugins.extproc.service import PROCESS_METHOD, ExtProcService
from gateway_plugins.extproc.stream import ExtProcStream
from gateway_plugins.health import HealthServer
from gateway_plugins.kv_events.feed import KvEventFeed
from gateway_plugins.metrics import PodCollector, RequestMetrics, metrics_app
from gateway_plugins.pod_metrics_store import PodMetricsStore
from gateway_plugins.routing.kv_index import KvBlockIndex
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import build_strategies
from gateway_plugins.tenancy.gate import Tenancy
from gateway_plugins.tenancy.limits import RateLimiter
from gateway_plugins.tenancy.users import UserDirectory, UserStore
from gateway_plugins.tokenization import ModelTokenizer
from gateway_plugins.transport.server import GrpcServer

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.pods = PodRegistry()
        events = settings.kv_events
        self.kv_index = (
            KvBlockIndex(
                time.monotonic,
                resync_seconds=events.resync_seconds,
                speculative_seconds=events.speculative_seconds,
            )
            if events.enabled
            else None
        )
        self.kv_feed = KvEventFeed(self.pods, self.kv_index, events) if self.kv_index is not None else None
        self.router = Router(
            self.pods,
            build_strategies(settings.routing, kv_index=self.kv_index),
            default_strategy=settings.default_strategy,
            model_strategies={
                m: s.routing_strategy for m, s in settings.models.items() if s.routing_strategy
            },
        )
        self.metrics = CollectorRegistry()
        self.tenancy = (
            _tenancy(settings.tenancy, settings.redis_url, self.metrics) if settings.tenancy.enabled else None
        )
        self.service = ExtProcService(
            settings,
            self.pods,
            self.router,
            RequestMetrics(self.metrics),
            self.tenancy,
            engine_api_key=read_secret(settings.engine_credentials.api_key_file, "BRICKYARD_ENGINE_API_KEY"),
        )
        self.grpc = GrpcServer(
            {PROCESS_METHOD: functools.partial(ExtProcStream, self.service)},
            # A BUFFERED body arrives as one message: leave room to answer 413 ourselves.
            max_message_bytes=max(64 << 20, 2 * settings.max_body_bytes),
        )
        self.health = HealthServer()
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics_store: PodMetricsStore | None = None
        self.grpc_port = self.health_port = self.metrics_port = self.admin_port = 0

    async def start(self) -> None:
        s = self.settings
        await self._load_tokenizers()
        discovery = s.discovery
        if discovery.source == "static":
            if not discovery.endpoints_file:
                raise ValueError("discovery.endpoints_file is required with the static source")
            static = StaticDiscovery(discovery.endpoints_file, self.pods, discovery.reload_seconds)
            static.load()
            self._tasks.append(asyncio.create_task(static.run(), name="static-discovery"))
        else:
            kube = KubernetesDiscovery(
                self.pods,
                namespace=discovery.namespace,
                label_selector=discovery.label_selector,
                watch_timeout_seconds=discovery.watch_timeout_seconds,
            )
            self._tasks.append(asyncio.create_task(kube.run(), name="kubernetes-discovery"))
            if discovery.model_adapters:
                adapters = ModelAdapterDiscovery(
                    self.pods,
                    namespace=discovery.namespace,
                    watch_timeout_seconds=discovery.watch_timeout_seconds,
                )
                self._tasks.append(asyncio.create_task(adapters.run(), name="model-adapter-discovery"))
            # Not serving before the first list: routing on an empty view would 404 every model.
            await kube.synced.wait()
        if s.redis_url:
            self.metrics_store = PodMetricsStore(
                self.pods,
                s.redis_url,
                stale_seconds=s.metrics_stale_seconds,
                share_interval=s.inflight_share_seconds,
            )
            self._tasks.append(asyncio.create_task(self.metrics_store.run(), name="pod-metrics"))
        if self.kv_feed is not None:
            self._tasks.append(asyncio.create_task(self.kv_feed.run(), name="kv-events"))
        if self.tenancy is not None:
            self._tasks.append(asyncio.create_task(self.tenancy.users.run(), name="users"))
            token = read_secret(s.tenancy.admin_token_file, "BRICKYARD_ADMIN_TOKEN")
            if token:
                store = UserStore(s.redis_url or "")
                self.admin_port = await self._serve_http(admin_app(store, token), s.tenancy.admin_port)
        self.metrics.register(
            PodCollector(self.pods, self.router, self.metrics_store, self.tenancy, self.kv_feed)
        )
        self.grpc_port = await self.grpc.start(s.listen_host, s.grpc_port)
        self.health_port = await self.health.start(s.listen_host, s.health_port)
        self.metrics_port = await self._serve_http(metrics_app(self.metrics), s.metrics_port)
        log.info(
            "gateway ready",
            extra={
                "contract": s.contract,
                "grpc_port": self.grpc_port,
                "health_port": self.health_port,
                "metrics_port": self.metrics_port,
                "admin_port": self.admin_port or None,
                "default_strategy": s.default_strategy,
                "tenancy": s.tenancy.enabled,
            },
        )

    async def _load_tokenizers(self) -> None:
        """Each configured model's own tokenizer (files or a download: in a thread), before serving: a
        source that cannot be loaded stops start-up, naming it."""
        sources = {model: m.tokenizer for model, m in self.settings.models.items() if m.tokenizer}
        for model, source in sources.items():
            self.router.tokenizers[model] = await asyncio.to_thread(ModelTokenizer.load, source)
        log.info(
            "tokenizers loaded: prompts of these models are tokenized as their engines tokenize them; those "
            "of any other model are routed on lengths estimated from their text",
            extra={"exact_models": sorted(sources)},
        )

    async def _serve_http(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.listen_host, port)
        await site.start()
        self._runners.append(runner)
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Drain: readiness off, GOAWAY to Envoy, wait for open streams, then close."""
        await self.health.set_ready(False)
        await self.grpc.drain(self.settings.drain_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.tenancy is not None:
            await self.tenancy.flush()  # the last responses' token charges
        await self.health.stop()
        for runner in self._runners:
            await runner.cleanup()


def _tenancy(settings: TenancySettings, redis_url: str | None, registry: CollectorRegistry) -> Tenancy:
    if not redis_url:
        raise ValueError("tenancy needs redis_url: users and limits live in Redis")
    timeout = settings.redis_timeout_seconds
    limiter = RateLimiter(
        redis_client(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout),
        fail_open=settings.failure_policy == "open",
        timeout=timeout,
    )
    users = UserDirectory(redis_url, resync_seconds=settings.users_resync_seconds)
    return Tenancy(settings, users, limiter, registry)


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    gateway = Gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining", extra={"open_streams": gateway.grpc.open_streams})
    await gateway.stop()
    log.info("stopped")
