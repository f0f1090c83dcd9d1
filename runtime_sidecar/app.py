"""The runtime sidecar process: metrics publisher, adapter API and its own HTTP endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from brickyard_core.credentials import SIDECAR_TOKEN_ENV, bearer_matches, read_secret, redis_client
from brickyard_core.typed_config import ConfigError
from runtime_sidecar.adapters import AdapterError, AdapterManager
from runtime_sidecar.config import SidecarSettings
from runtime_sidecar.publisher import MetricsPublisher

log = logging.getLogger(__name__)

#: PodMetrics fields re-exported as gauges on the sidecar's /metrics.
_GAUGES = {
    "waiting": "Requests waiting in the engine.",
    "running": "Requests in the engine's running batch.",
    "kv_usage": "Fraction of KV-cache blocks in use.",
    "prefix_hit_rate": "Prefix-cache hit rate over the window.",
    "prompt_tps": "Prompt tokens per second over the window.",
    "generation_tps": "Generated tokens per second over the window.",
    "ttft_mean": "Mean time to first token over the window, seconds.",
    "tpot_mean": "Mean inter-token latency over the window, seconds.",
    "queue_mean": "Mean queue time over the window, seconds.",
}


class RecordCollector(Collector):
    """The latest pod-metrics record, in Prometheus naming."""

    def __init__(self, publisher: MetricsPublisher) -> None:
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        record = self.publisher.latest
        if record is None:
            return
        labels = ["namespace", "pod", "engine"]
        values = [self.publisher.settings.namespace, self.publisher.settings.pod, record.engine_type]
        healthy = GaugeMetricFamily(
            "brickyard_engine_healthy", "1 when the engine answered its last scrape.", labels=labels
        )
        healthy.add_metric(values, float(record.healthy))
        yield healthy
        for field, help_ in _GAUGES.items():
            family = GaugeMetricFamily(f"brickyard_engine_{field}", help_, labels=labels)
            family.add_metric(values, float(getattr(record, field)))
            yield family


def api_token(settings: SidecarSettings) -> str | None:
    """The adapter API's bearer token; ``ConfigError`` when the API would listen beyond loopback without one
    (anyone who reaches it could make the engine load any adapter)."""
    token = read_secret(settings.api_token_file, SIDECAR_TOKEN_ENV)
    if token is None and not _is_loopback(settings.listen_host):
        raise ConfigError(
            f"listen_host {settings.listen_host} is not a loopback address: set the adapter API's token "
            f"(api_token_file or ${SIDECAR_TOKEN_ENV}), or listen on 127.0.0.1"
        )
    return token


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Sidecar:
    def __init__(self, settings: SidecarSettings, token: str | None = None) -> None:
        self.settings = settings
        self.token = token
        self.session: aiohttp.ClientSession | None = None
        self.redis = redis_client(settings.redis_url) if settings.redis_url else None
        self.publisher: MetricsPublisher | None = None
        self.adapters: AdapterManager | None = None
        self.registry = CollectorRegistry()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[web.Application]:
        """Start the publisher; yield the HTTP app; stop everything on exit."""
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600, sock_connect=5))
        self.publisher = MetricsPublisher(self.settings, self.session, self.redis)
        self.registry.register(RecordCollector(self.publisher))
        publisher = self.publisher
        self.adapters = AdapterManager(
            self.settings,
            self.session,
            lambda: publisher.latest.max_loras if publisher.latest else 0,
            publisher.set_adapters,
        )
        tasks = [
            asyncio.create_task(publisher.run(), name="metrics-publisher"),
            asyncio.create_task(self.adapters.watch(), name="adapter-watch"),
        ]
        try:
            yield self.app()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.session.close()
            if self.redis is not None:
                await self.redis.aclose()

    def app(self) -> web.Application:
        """The adapter API (token-checked when a token is set), health, and metrics unless those have a
        port of their own."""
        app = web.Application(middlewares=[self._authenticate] if self.token else [])
        self._add_health(app)
        if self.settings.metrics_port is None:
            app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/lora_adapter/load", self.load)
        app.router.add_post("/v1/lora_adapter/unload", self.unload)
        return app

    def metrics_app(self) -> web.Application:
        """What ``metrics_port`` serves: health and metrics, nothing that changes the engine."""
        app = web.Application()
        self._add_health(app)
        app.router.add_get("/metrics", self.metrics)
        return app

    def _add_health(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ready", self.ready)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every ``/v1/`` call carries the token (the app has this middleware only when one is set)."""
        if request.path.startswith("/v1/") and not bearer_matches(
            request.headers.get("Authorization"), self.token or ""
        ):
            response = _error(AdapterError(401, "unauthorized", "send the sidecar's token as a bearer token"))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await handler(request)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ready(self, _: web.Request) -> web.Response:
        record = self.publisher.latest if self.publisher else None
        if record is None or not record.healthy:
            return web.Response(status=503, text="engine not ready")
        return web.Response(text="ok")

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def models(self, _: web.Request) -> web.Response:
        return await self._call(self.adapters.models())  # type: ignore[union-attr]

    async def load(self, request: web.Request) -> web.Response:
        body = await _json(request)
        credentials = body.get("credentials")
        if credentials is not None and not isinstance(credentials, dict):
            return _error(AdapterError(400, "invalid_request", "credentials must be an object"))
        return await self._call(
            self.adapters.load(  # type: ignore[union-attr]
                _string(body, "lora_name"),
                artifact_url=_string(body, "artifact_url") or None,
                lora_path=_string(body, "lora_path") or None,
                credentials=credentials,
            )
        )

    async def unload(self, request: web.Request) -> web.Response:
        body = await _json(request)
        return await self._call(
            self.adapters.unload(  # type: ignore[union-attr]
                _string(body, "lora_name"), cleanup_local=bool(body.get("cleanup_local", False))
            )
        )

    @staticmethod
    async def _call(operation: object) -> web.Response:
        try:
            result = await operation  # type: ignore[misc]
        except AdapterError as exc:
            return _error(exc)
        return web.Response(body=orjson.dumps(result), content_type="application/json")


async def _json(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            body=_error_body(400, "invalid_request", "the body must be a JSON object"),
            content_type="application/json",
        )
    return body


def _string(body: dict, key: str) -> str:
    value = body.get(key)
    return value if isinstance(value, str) else ""


def _error_body(status: int, code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": code, "code": status}})


def _error(exc: AdapterError) -> web.Response:
    return web.Response(
        status=exc.status, body=_error_body(exc.status, exc.code, str(exc)), content_type="application/json"
    )


async def serve(settings: SidecarSettings) -> None:
    """Run until cancelled (SIGTERM/SIGINT through the CLI); ``ConfigError`` before anything starts when
    the adapter API would be open to the network."""
    sidecar = Sidecar(settings, api_token(settings))
    async with sidecar.running() as app:
        sites = [(app, settings.port)]
        if settings.metrics_port is not None:
            sites.append((sidecar.metrics_app(), settings.metrics_port))
        runners = []
        try:
            for site_app, port in sites:
                runner = web.AppRunner(site_app, access_log=None)
                runners.append(runner)
                await runner.setup()
                await web.TCPSite(runner, settings.listen_host, port).start()
            log.info(
                "sidecar ready",
                extra={"engine": settings.engine_url, "pod": settings.pod, "port": settings.port},
            )
            await asyncio.Event().wait()
        finally:
            for runner in runners:
                await runner.cleanup()
