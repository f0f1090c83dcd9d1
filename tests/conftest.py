"""Shared fixtures: real processes (Redis, emulated engines, gateway, Envoy) on loopback.

Each test module gets a stack of its own, stopped when the module ends: processes of earlier modules
never compete for the machine's two cores with later ones (the real-vLLM package's engines least of all).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from brickyard.stack import Engine, GatewayPorts, Stack
from brickyard_core.credentials import REDIS_PASSWORD_ENV, SIDECAR_TOKEN_ENV

MODEL = "test-model"
COLD_MODEL = "cold-model"  # known to discovery, no ready pod


@pytest.fixture(scope="session", autouse=True)
def credentials() -> Iterator[None]:
    """A Redis password and a sidecar token for the session, in this process's environment as in a
    deployment's: every stack starts Redis and the sidecars with them, and the components the tests run
    in-process (stores, controllers) find them there."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(REDIS_PASSWORD_ENV, secrets.token_urlsafe(24))
        env.setenv(SIDECAR_TOKEN_ENV, secrets.token_urlsafe(24))
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Sidecars may load adapters in place from anywhere under pytest's temporary directory (``tmp_path``).
    with Stack(tmp_path_factory.mktemp("stack"), adapter_roots=[tmp_path_factory.getbasetemp()]) as running:
        yield running


@pytest.fixture(scope="module")
def redis_port(stack: Stack) -> int:
    return stack.start_redis()


def sidecar_auth() -> dict[str, str]:
    """What a caller of the stack's sidecars sends with every adapter API call."""
    return {"Authorization": f"Bearer {os.environ[SIDECAR_TOKEN_ENV]}"}


def redis_at(port: int) -> redis.Redis:
    """A (blocking) client of a stack's Redis, for test code that reads it directly."""
    return redis.Redis(port=port, password=os.environ[REDIS_PASSWORD_ENV])


@pytest.fixture(scope="module")
def engines(stack: Stack) -> list[Engine]:
    # The default engine profile (Llama-3.1-8B on H100): a decode step takes ~7 ms, so streams last long
    # enough to watch them in flight.
    return [stack.start_engine(f"engine-{i}", MODEL, None, "--enable-lora") for i in range(3)]


@pytest.fixture(scope="module")
def endpoints_file(stack: Stack, engines: list[Engine]) -> Path:
    path = stack.write_endpoints(engines, MODEL, stack.workdir / "endpoints.yaml")
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


@pytest.fixture(scope="module", params=["aibrix", "epp"])
def deployment(
    request: pytest.FixtureRequest, stack: Stack, redis_port: int, engines: list[Engine], endpoints_file: Path
) -> Deployment:
    contract = request.param
    gateway = stack.start_gateway(contract, endpoints_file, name=f"gateway-{contract}")
    port, _ = stack.start_envoy(contract, gateway.grpc, engines, name=f"envoy-{contract}")
    return Deployment(contract, f"http://127.0.0.1:{port}", gateway, engines)
