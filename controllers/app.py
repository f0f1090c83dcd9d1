"""One controllers process: the API client, shared informers, the enabled controllers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from brickyard_core.credentials import SIDECAR_TOKEN_ENV, read_secret, redis_client
from brickyard_core.kube.client import KubeClient, api_client_from_environment
from controllers.config import ControllerSettings
from controllers.model_adapter import ModelAdapterController
from controllers.model_routes import ModelRouteController
from controllers.pod_autoscaler import PodAutoscalerController
from controllers.runtime.events import EventRecorder
from controllers.runtime.manager import Manager

log = logging.getLogger(__name__)

COMPONENT = "brickyard-controllers"


class ControllerApp:
    """Build with settings (and, in tests, an ``ApiClient``); ``async with app.running():`` runs it."""

    def __init__(self, settings: ControllerSettings, api_client: Any = None) -> None:
        self.settings = settings
        self.api_client = api_client
        self.manager: Manager | None = None
        self.model_adapters: ModelAdapterController | None = None
        self.pod_autoscalers: PodAutoscalerController | None = None
        self.model_routes: ModelRouteController | None = None
        self.recorder: EventRecorder | None = None

    @contextlib.asynccontextmanager
    async def running(self, *, sync_timeout: float | None = 30.0) -> AsyncIterator[ControllerApp]:
        """Start everything, wait until every informer has listed; stop it all on exit."""
        s = self.settings
        api_client = self.api_client or await asyncio.to_thread(api_client_from_environment)
        client = KubeClient(api_client, timeout_seconds=s.api_timeout_seconds)
        self.manager = manager = Manager(
            client, namespace=s.namespace, watch_timeout_seconds=s.watch_timeout_seconds
        )
        self.recorder = EventRecorder(client, COMPONENT)
        session = aiohttp.ClientSession()
        redis = redis_client(s.redis_url, socket_timeout=2, socket_connect_timeout=2) if s.redis_url else None
        if "model-adapter" in s.controllers:
            token = read_secret(s.model_adapter.sidecar_token_file, SIDECAR_TOKEN_ENV)
            self.model_adapters = ModelAdapterController(
                manager, s, session, redis, self.recorder, sidecar_token=token
            )
        if "pod-autoscaler" in s.controllers:
            self.pod_autoscalers = PodAutoscalerController(manager, s, session, redis, self.recorder)
        if "model-routes" in s.controllers:
            self.model_routes = ModelRouteController(manager, s, self.recorder)
        task = asyncio.create_task(manager.run(sync_timeout=sync_timeout), name="controller-manager")
        try:
            ready = asyncio.create_task(manager.ready.wait())
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                await task  # raises what stopped the manager (informers not synced in time)
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.model_adapters is not None:
                await self.model_adapters.aclose()
            await session.close()
            if redis is not None:
                await redis.aclose()


async def serve(settings: ControllerSettings) -> None:
    """Run until cancelled (SIGTERM/SIGINT through the CLI)."""
    async with ControllerApp(settings).running(sync_timeout=None):
        log.info(
            "controllers ready", extra={"controllers": settings.controllers, "namespace": settings.namespace}
        )
        await asyncio.Event().wait()
