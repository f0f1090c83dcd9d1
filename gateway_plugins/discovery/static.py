"""Pod discovery from a YAML endpoints file, for standalone use (no Kubernetes).

    pods:
      - name: engine-0
        address: 127.0.0.1:8001
        model: llama-3-8b
        labels: {gpu: h100}     # optional
        annotations:            # optional, e.g. the model's routing profiles
          model.aibrix.ai/config: '{"profiles": {"default": {"routingStrategy": "prefix-cache"}}}'
        namespace: default      # optional

The file is re-read when it changes, so a script can add or drain engines
without restarting the gateway; a broken edit is logged and the last good set kept.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from brickyard_core import typed_config
from gateway_plugins.discovery.registry import PodInfo, PodRegistry

log = logging.getLogger(__name__)


@dataclass
class StaticPod:
    name: str
    address: str
    model: str
    namespace: str = "default"
    ready: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class EndpointsFile:
    pods: list[StaticPod] = field(default_factory=list)


def load_endpoints(path: str | Path) -> list[PodInfo]:
    """Parse and check an endpoints file; raises ``typed_config.ConfigError``."""
    spec = typed_config.load(EndpointsFile, path)
    pods = []
    for pod in spec.pods:
        host, sep, port = pod.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise typed_config.ConfigError(
                f"{path}: pod {pod.name}: address must be ip:port, got {pod.address!r}"
            )
        pods.append(
            PodInfo(pod.name, pod.address, pod.model, pod.namespace, pod.ready, pod.labels, pod.annotations)
        )
    names = [p.key for p in pods]
    if len(set(names)) != len(names):
        raise typed_config.ConfigError(f"{path}: pod names must be unique")
    return pods


class StaticDiscovery:
    def __init__(self, path: str | Path, registry: PodRegistry, reload_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.registry = registry
        self.reload_seconds = reload_seconds
        self._mtime = 0.0

    def load(self) -> None:
        """Initial load: errors propagate, the gateway must not start on a broken file."""
        self._mtime = self.path.stat().st_mtime
        self.registry.replace_all(load_endpoints(self.path))

    async def run(self) -> None:
        """Watch the file for changes until cancelled."""
        while True:
            await asyncio.sleep(self.reload_seconds)
            try:
                mtime = self.path.stat().st_mtime
                if mtime == self._mtime:
                    continue
                self._mtime = mtime
                pods = load_endpoints(self.path)
            except (OSError, typed_config.ConfigError) as exc:
                log.error("keeping the previous endpoints: %s", exc)
                continue
            self.registry.replace_all(pods)
            log.info("reloaded %d endpoints from %s", len(pods), self.path)
