"""``Manager``: the informers the controllers share, and the order things start in.

Controllers ask the manager for informers, so two controllers watching Pods share one watch and one
cache. ``run`` starts every informer, waits until each has listed (a controller reconciling on a partial
cache would act on a world it has not seen), then runs the controllers.
"""

from __future__ import annotations

import asyncio
import logging

from brickyard_core.kube.client import KubeClient, Resource
from brickyard_core.kube.informer import Informer
from controllers.runtime.controller import Controller

log = logging.getLogger(__name__)


class Manager:
    def __init__(
        self, client: KubeClient, *, namespace: str | None = None, watch_timeout_seconds: int = 300
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.watch_timeout_seconds = watch_timeout_seconds
        self._informers: dict[tuple[Resource, str | None], Informer] = {}
        self.controllers: list[Controller] = []
        self.ready = asyncio.Event()

    def informer(self, resource: Resource, label_selector: str | None = None) -> Informer:
        """The one informer of ``resource`` (with this selector) in the manager's namespace."""
        key = (resource, label_selector)
        if key not in self._informers:
            self._informers[key] = Informer(
                self.client,
                resource,
                namespace=self.namespace if resource.namespaced else None,
                label_selector=label_selector,
                watch_timeout_seconds=self.watch_timeout_seconds,
            )
        return self._informers[key]

    def add(self, controller: Controller) -> None:
        self.controllers.append(controller)

    async def run(self, *, sync_timeout: float | None = None) -> None:
        informers = list(self._informers.values())
        tasks = [asyncio.create_task(i.run(), name=f"informer-{i.resource.plural}") for i in informers]
        try:
            async with asyncio.timeout(sync_timeout):
                await asyncio.gather(*(i.synced.wait() for i in informers))
            tasks += [asyncio.create_task(c.run(), name=f"controller-{c.name}") for c in self.controllers]
            self.ready.set()
            log.info("controllers running", extra={"controllers": [c.name for c in self.controllers]})
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
