"""The gateway behind a real Envoy as a hostile client probes it: tenant credentials stay away from the
engines, a nested prompt cannot leave a pod counted in flight, and no header creates a metric series."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from brickyard.stack import Engine, GatewayPorts, Stack
from tests.support.http_server import serve_in_thread

pytestmark = pytest.mark.slow

MODEL = "guarded-model"
ENGINE_KEY = "sk-engine-only"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@dataclass
class RecordingEngine:
    """An OpenAI-shaped engine that keeps the headers of every request it gets."""

    engine: Engine
    seen: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def recording_engine() -> Iterator[RecordingEngine]:
    recorded: list[dict[str, str]] = []

    async def chat(request: web.Request) -> web.Response:
        recorded.append({k.lower(): v for k, v in request.headers.items()})
        await request.read()
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    with serve_in_thread(app) as port:
        yield RecordingEngine(Engine("recorder", port), recorded)


@dataclass
class Front:
    url: str
    gateway: GatewayPorts

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.gateway.metrics}/metrics").text

    def samples(self, name: str) -> list[Sample]:
        families = text_string_to_metric_families(self.metrics())
        return [sample for family in families for sample in family.samples if sample.name == name]


def front(stack: Stack, engine: Engine, contract: str, name: str, *extra: str) -> Front:
    endpoints = stack.write_endpoints([engine], MODEL, stack.workdir / f"{name}-endpoints.yaml")
    gateway = stack.start_gateway(contract, endpoints, *extra, name=name)
    port, _ = stack.start_envoy(contract, gateway.grpc, [engine], name=f"envoy-{name}")
    return Front(f"http://127.0.0.1:{port}", gateway)


@pytest.fixture(scope="module", params=["aibrix", "epp"])
def plain(request: pytest.FixtureRequest, stack: Stack, recording_engine: RecordingEngine) -> Front:
    return front(stack, recording_engine.engine, request.param, f"guard-{request.param}")


@pytest.fixture(scope="module")
def keyed(stack: Stack, recording_engine: RecordingEngine, tmp_path_factory: pytest.TempPathFactory) -> Front:
    """A gateway whose engines want a key of their own (vLLM ``--api-key``)."""
    secrets = tmp_path_factory.mktemp("engine-key")
    (secrets / "key").write_text(ENGINE_KEY + "\n")
    config = secrets / "gateway.yaml"
    config.write_text(yaml.safe_dump({"engine_credentials": {"api_key_file": str(secrets / "key")}}))
    return front(stack, recording_engine.engine, "aibrix", "guard-keyed", "--config", str(config))


def post(base_url: str, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=30)


TENANT = {"authorization": "Bearer sk-tenant-secret", "x-api-key": "sk-tenant-secret", "api-key": "sk-t"}


def test_tenant_credentials_never_reach_the_engine(plain: Front, recording_engine: RecordingEngine) -> None:
    before = len(recording_engine.seen)
    response = post(plain.url, CHAT, **TENANT)
    assert response.status_code == 200, response.text
    (seen,) = recording_engine.seen[before:]
    assert not seen.keys() & TENANT.keys(), seen
    assert "sk-tenant-secret" not in repr(seen)


def test_engines_that_want_a_key_get_the_gateways(keyed: Front, recording_engine: RecordingEngine) -> None:
    before = len(recording_engine.seen)
    for headers in (TENANT, {}):
        assert post(keyed.url, CHAT, **headers).status_code == 200
    assert [seen["authorization"] for seen in recording_engine.seen[before:]] == [f"Bearer {ENGINE_KEY}"] * 2
    assert "x-api-key" not in recording_engine.seen[-2]


def test_a_nested_prompt_is_400_and_leaves_no_pod_counted(plain: Front) -> None:
    depth = 1000
    raw = f'{{"model": "{MODEL}", "prompt": {"[" * depth}1{"]" * depth}}}'
    response = httpx.post(
        f"{plain.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"
    inflight = plain.samples("brickyard_pod_inflight_requests")
    assert [s.value for s in inflight] == [0.0]


def test_client_strategy_strings_create_no_metric_series(plain: Front) -> None:
    before = len(plain.metrics())
    for weight in range(1, 101):
        response = post(plain.url, CHAT, **{"routing-strategy": f"random:{weight},least-request:1"})
        assert response.status_code == 200
    labels = {sample.labels["strategy"] for sample in plain.samples("brickyard_requests_total")}
    assert labels - {""} == {"combination", "least-request"}, labels  # "": requests refused before routing
    assert len(plain.metrics()) - before < 2_000  # a few counters moved; no hundred new series
