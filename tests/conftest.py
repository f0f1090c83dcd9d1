"""Shared fixtures: real processes (Redis, emulated engines, gateway, Envoy) on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from brickyard.stack import Engine, GatewayPorts, Stack

MODEL = "test-model"
COLD_MODEL = "cold-model"  # known to discovery, no ready pod


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="session")
def redis_port(stack: Stack) -> int:
    return stack.start_redis()


@pytest.fixture(scope="session")
def engines(stack: Stack) -> list[Engine]:
    # The default engine profile (Llama-3.1-8B on H100): a decode step takes ~7 ms, so streams last long
    # enough to watch them in flight.
    return [stack.start_engine(f"engine-{i}", MODEL, None, "--enable-lora") for i in range(3)]


@pytest.fixture(scope="session")
def endpoints_file(stack: Stack, engines: list[Engine]) -> Path:
    path = stack.write_endpoints(engines, MODEL)
    data = yaml.safe_load(path.read_text())
    data["pods"].append({"name": "cold-0", "address": "127.0.0.1:9", "model": COLD_MODEL, "ready": False})
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Deployment:
    """Envoy + gateway for one contract, in front of the shared engines."""

    contract: str
    base_url: str
    gateway: GatewayPorts
    engines: list[Engine]

    def inflight(self) -> dict[str, float]:
        """The gateway's in-flight count per pod, from its /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.gateway.metrics}/metrics").text
        return {
            sample.labels["pod"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "brickyard_pod_inflight_requests"
            for sample in family.samples
        }

    def wait_inflight(
        self, check: Callable[[dict[str, float]], bool], timeout: float = 5.0
    ) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            counts = self.inflight()
            if check(counts) or time.monotonic() > deadline:
                return counts
            time.sleep(0.02)


@pytest.fixture(scope="session", params=["aibrix", "epp"])
def deployment(
    request: pytest.FixtureRequest, stack: Stack, redis_port: int, engines: list[Engine], endpoints_file: Path
) -> Deployment:
    contract = request.param
    gateway = stack.start_gateway(contract, endpoints_file, name=f"gateway-{contract}")
    port, _ = stack.start_envoy(contract, gateway.grpc, engines, name=f"envoy-{contract}")
    return Deployment(contract, f"http://127.0.0.1:{port}", gateway, engines)
