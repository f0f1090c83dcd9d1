"""LoRA adapters become routable model names end to end: sidecar -> Redis -> gateway registry -> Envoy."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from brickyard.stack import Engine, Stack
from brickyard_core.podmetrics import decode_record, pod_key
from tests.conftest import MODEL, redis_at, sidecar_auth
from tests.support.adapters import adapter

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Write a query."}]


@dataclass
class LoraFleet:
    engines: list[Engine]
    sidecars: dict[str, str]  # engine name -> sidecar base URL
    api: openai.OpenAI

    def served(self) -> list[str]:
        return [model.id for model in self.api.models.list().data]

    def adapter_call(self, engine: Engine, action: str, body: dict) -> httpx.Response:
        url = f"{self.sidecars[engine.name]}/v1/lora_adapter/{action}"
        return httpx.post(url, json=body, headers=sidecar_auth(), timeout=30)


@pytest.fixture(scope="module")
def fleet(stack: Stack, redis_port: int) -> LoraFleet:
    engines = [
        stack.start_engine(f"lora-route-{i}", MODEL, None, "--enable-lora", "--max-loras", "2")
        for i in range(2)
    ]
    sidecars = {e.name: f"http://127.0.0.1:{stack.start_sidecar(e, redis_port)}" for e in engines}
    endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / "lora-endpoints.yaml")
    gateway = stack.start_gateway("aibrix", endpoints, redis_port=redis_port, name="gateway-lora")
    port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="envoy-lora")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    return LoraFleet(engines, sidecars, api)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``check`` holds within ``timeout`` (records travel asynchronously: scrape, Redis, gateway)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_model_not_found(fleet: LoraFleet, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        fleet.api.chat.completions.create(model=model, messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_a_loaded_adapter_is_routed_to_its_pod_and_unknown_again_once_unloaded(
    fleet: LoraFleet, redis_port: int, tmp_path: Path
) -> None:
    assert_model_not_found(fleet, "sql")
    host = fleet.engines[1]
    loaded = fleet.adapter_call(
        host, "load", {"lora_name": "sql", "lora_path": str(adapter(tmp_path, "sql"))}
    )
    assert loaded.status_code == 200, loaded.text
    assert eventually(lambda: "sql" in fleet.served()), fleet.served()
    assert fleet.served() == sorted([MODEL, "sql"])
    records = redis_at(redis_port).mget([pod_key("default", e.name) for e in fleet.engines])
    assert [decode_record(r)[2].adapters for r in records] == [(), ("sql",)]  # type: ignore[arg-type]
    for _ in range(8):
        raw = fleet.api.chat.completions.with_raw_response.create(
            model="sql",
            messages=CHAT,  # type: ignore[arg-type]
            max_tokens=2,
            extra_headers={"routing-strategy": "lora-affinity"},
        )
        assert (raw.headers["target-pod"], raw.headers["x-emulator-pod"]) == (host.name, host.name)
        assert raw.headers["routing-strategy"] == "lora-affinity"
        assert raw.parse().model == "sql"
    unloaded = fleet.adapter_call(host, "unload", {"lora_name": "sql"})
    assert unloaded.json()["status"] == "unloaded"
    assert eventually(lambda: "sql" not in fleet.served()), fleet.served()
    assert_model_not_found(fleet, "sql")


def test_an_adapter_on_several_pods_is_served_by_each(fleet: LoraFleet, tmp_path: Path) -> None:
    path = adapter(tmp_path, "chat")
    for engine in fleet.engines:
        assert (
            fleet.adapter_call(engine, "load", {"lora_name": "chat", "lora_path": str(path)}).status_code
            == 200
        )
    assert eventually(lambda: "chat" in fleet.served())
    pods = {
        fleet.api.chat.completions.with_raw_response.create(
            model="chat", messages=CHAT, max_tokens=2, extra_headers={"routing-strategy": "random"}
        ).headers["target-pod"]
        for _ in range(30)
    }
    assert pods == {engine.name for engine in fleet.engines}
    for engine in fleet.engines:
        fleet.adapter_call(engine, "unload", {"lora_name": "chat"})
    assert eventually(lambda: "chat" not in fleet.served())


def test_adapters_loaded_behind_the_sidecars_back_are_found(fleet: LoraFleet, tmp_path: Path) -> None:
    engine = fleet.engines[0]
    path = adapter(tmp_path, "direct")
    body = {"lora_name": "direct", "lora_path": str(path)}
    assert httpx.post(f"{engine.url}/v1/load_lora_adapter", json=body).status_code == 200
    assert eventually(lambda: "direct" in fleet.served())  # the sidecar's periodic re-read
    raw = fleet.api.chat.completions.with_raw_response.create(
        model="direct",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=2,
    )
    assert raw.headers["target-pod"] == engine.name
    assert httpx.post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": "direct"}).status_code == 200
    assert eventually(lambda: "direct" not in fleet.served())
    assert_model_not_found(fleet, "direct")


def test_an_adapter_whose_engine_is_down_is_unavailable_not_unknown(
    fleet: LoraFleet, stack: Stack, tmp_path: Path
) -> None:
    engine = fleet.engines[0]
    body = {"lora_name": "ops", "lora_path": str(adapter(tmp_path, "ops"))}
    assert fleet.adapter_call(engine, "load", body).status_code == 200
    assert eventually(lambda: "ops" in fleet.served())
    stack.stop_child(next(c for c in stack.children if c.name == engine.name))
    assert eventually(lambda: "ops" not in fleet.served())
    with pytest.raises(openai.APIStatusError) as info:
        fleet.api.chat.completions.create(model="ops", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert (info.value.status_code, info.value.body["code"]) == (503, "no_ready_pods")  # type: ignore[index]
    # A restarted engine has lost its runtime-loaded adapters: once its sidecar sees that, "ops" is unknown.
    stack.start_engine(engine.name, MODEL, engine.port, "--enable-lora", "--max-loras", "2")

    def unknown() -> bool:
        try:
            fleet.api.chat.completions.create(model="ops", messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
        except openai.APIStatusError as exc:  # 503 until the pod is back, then 404 from the gateway
            return exc.body["code"] == "model_not_found"  # type: ignore[index]
        return False

    assert eventually(unknown)
