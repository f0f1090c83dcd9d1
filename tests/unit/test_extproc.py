"""The ext_proc service over the real transport, driven message by message like Envoy does."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import orjson
import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from brickyard_core.api.envoy.config.core.v3 import base_pb2 as core
from brickyard_core.api.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as modes
from brickyard_core.api.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from brickyard_core.api.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from gateway_plugins.config import GatewaySettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.extproc.messages import STREAMED_CHUNK_BYTES
from gateway_plugins.extproc.service import PROCESS_METHOD, ExtProcService
from gateway_plugins.extproc.stream import ExtProcStream
from gateway_plugins.metrics import RequestMetrics
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import Stateless, Strategy, build_strategies
from gateway_plugins.routing.types import PodState, RoutingRequest
from gateway_plugins.transport.server import GrpcServer

MODEL = "llama"
CHAT = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
BUFFERED = pb.ProtocolConfiguration(request_body_mode=modes.ProcessingMode.BUFFERED)
DUPLEX = pb.ProtocolConfiguration(
    request_body_mode=modes.ProcessingMode.FULL_DUPLEX_STREAMED,
    response_body_mode=modes.ProcessingMode.FULL_DUPLEX_STREAMED,
)


@dataclass
class Harness:
    registry: PodRegistry
    stub: pb_grpc.ExternalProcessorStub
    server: GrpcServer
    metrics: CollectorRegistry

    def inflight(self) -> list[int]:
        return [p.inflight for p in self.registry.ready_pods(MODEL)]

    def strategy_labels(self) -> set[str]:
        return {
            sample.labels["strategy"]
            for family in self.metrics.collect()
            if family.name == "brickyard_requests"
            for sample in family.samples
        }


async def _harness(
    contract: str,
    *,
    strategies: dict[str, Strategy] | None = None,
    engine_api_key: str | None = None,
    **settings: object,
) -> AsyncIterator[Harness]:
    registry = PodRegistry()
    registry.replace_all([PodInfo(f"pod-{i}", f"10.0.0.{i}:8000", MODEL) for i in range(3)])
    registry.upsert(PodInfo("cold", "10.0.1.1:8000", "cold-model", ready=False))
    config = GatewaySettings(contract=contract, **settings)  # type: ignore[arg-type]
    router = Router(
        registry, {**build_strategies(), **(strategies or {})}, default_strategy=config.default_strategy
    )
    metrics = CollectorRegistry()
    service = ExtProcService(config, registry, router, RequestMetrics(metrics), engine_api_key=engine_api_key)
    server = GrpcServer({PROCESS_METHOD: functools.partial(ExtProcStream, service)})
    port = await server.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Harness(registry, pb_grpc.ExternalProcessorStub(channel), server, metrics)
    await server.drain(0.1)


@pytest.fixture
async def aibrix() -> AsyncIterator[Harness]:
    async for harness in _harness("aibrix", max_body_bytes=4096):
        yield harness


@pytest.fixture
async def epp() -> AsyncIterator[Harness]:
    async for harness in _harness("epp"):
        yield harness


def headers(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    eos: bool = False,
    config: pb.ProtocolConfiguration | None = None,
    metadata: dict | None = None,
    **extra: str,
) -> pb.ProcessingRequest:
    pairs = {":path": path, ":method": method, "x-request-id": "req-1", **extra}
    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=core.HeaderMap(
                headers=[core.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
            ),
            end_of_stream=eos,
        ),
    )
    if config is not None:
        request.protocol_config.CopyFrom(config)
    for namespace, values in (metadata or {}).items():
        request.metadata_context.filter_metadata[namespace].update(values)
    return request


def body(data: bytes, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


async def exchange(
    harness: Harness, messages: Sequence[pb.ProcessingRequest], expect: int
) -> list[pb.ProcessingResponse]:
    """Send ``messages``, read ``expect`` replies, then end the stream like Envoy does."""
    queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        while (item := await queue.get()) is not None:
            yield item

    call = harness.stub.Process(requests())
    replies = [await asyncio.wait_for(call.read(), 5) for _ in range(expect)]
    queue.put_nowait(None)
    assert await call.read() == grpc.aio.EOF
    return replies


def set_headers(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


def error_of(reply: pb.ProcessingResponse) -> tuple[int, dict]:
    immediate = reply.immediate_response
    assert reply.WhichOneof("response") == "immediate_response"
    assert set_headers(immediate.headers)["content-type"] == "application/json"
    return immediate.status.code, orjson.loads(immediate.body)["error"]


# -- AIBrix contract (BUFFERED) ----------------------------------------------------------------


async def test_aibrix_routes_on_the_body_reply(aibrix: Harness) -> None:
    first, second = await exchange(aibrix, [headers(config=BUFFERED), body(CHAT)], 2)
    assert first.WhichOneof("response") == "request_headers"
    assert not first.request_headers.response.header_mutation.set_headers
    mutation = second.request_body.response.header_mutation
    target = set_headers(mutation)["target-pod"]
    assert target in {"10.0.0.0:8000", "10.0.0.1:8000", "10.0.0.2:8000"}
    decision = json_format.MessageToDict(second.dynamic_metadata)["brickyard"]
    assert decision["pod_ip"] == target
    assert decision["strategy"] == "least-request"
    assert aibrix.inflight() == [0, 0, 0]  # released when the stream ended


async def test_client_routing_headers_are_stripped(aibrix: Harness) -> None:
    (first, _) = await exchange(
        aibrix,
        [headers(**{"target-pod": "6.6.6.6:1", "x-gateway-destination-endpoint": "6.6.6.6:1"}), body(CHAT)],
        2,
    )
    removed = set(first.request_headers.response.header_mutation.remove_headers)
    assert removed == {"target-pod", "x-gateway-destination-endpoint"}


async def test_missing_request_id_is_generated(aibrix: Harness) -> None:
    request = headers()
    del request.request_headers.headers.headers[2]  # x-request-id
    (first, _) = await exchange(aibrix, [request, body(CHAT)], 2)
    assert len(set_headers(first.request_headers.response.header_mutation)["x-request-id"]) == 32


async def test_inflight_held_until_stream_ends_then_released(aibrix: Harness) -> None:
    queue: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
    for message in (headers(), body(CHAT)):
        queue.put_nowait(message)

    async def requests() -> AsyncIterator[pb.ProcessingRequest]:
        while (item := await queue.get()) is not None:
            yield item

    call = aibrix.stub.Process(requests())
    await call.read()
    await call.read()
    assert sorted(aibrix.inflight()) == [0, 0, 1]  # the engine is working on it
    call.cancel()  # the client went away
    for _ in range(100):
        if aibrix.inflight() == [0, 0, 0]:
            break
        await asyncio.sleep(0.01)
    assert aibrix.inflight() == [0, 0, 0]


async def test_models_list_and_model_lookup(aibrix: Harness) -> None:
    (reply,) = await exchange(aibrix, [headers("/v1/models", "GET", eos=True)], 1)
    assert reply.immediate_response.status.code == 200
    listing = orjson.loads(reply.immediate_response.body)
    assert [m["id"] for m in listing["data"]] == [MODEL]  # cold-model has no ready pod
    (one,) = await exchange(aibrix, [headers(f"/v1/models/{MODEL}?x=1", "GET", eos=True)], 1)
    assert orjson.loads(one.immediate_response.body)["id"] == MODEL
    (missing,) = await exchange(aibrix, [headers("/v1/models/cold-model", "GET", eos=True)], 1)
    assert error_of(missing)[0] == 404


@pytest.mark.parametrize(
    ("request_headers", "messages", "status", "code"),
    [
        (headers("/v1/unknown"), [], 404, "unknown_url"),
        (headers("/v1/chat/completions", "GET", eos=True), [], 405, "method_not_allowed"),
        (headers("/v1/models", "POST"), [], 405, "method_not_allowed"),
        (headers(**{"routing-strategy": "nope"}), [], 400, "invalid_routing_strategy"),
        (headers(eos=True), [], 400, "invalid_json"),
        (headers(), [body(b"{oops")], 400, "invalid_json"),
        (headers(), [body(b'{"messages": []}')], 400, "missing_model"),
        (headers(), [body(orjson.dumps({"model": "ghost", "messages": [{}]}))], 404, "model_not_found"),
        (headers(), [body(orjson.dumps({"model": "cold-model", "messages": [{}]}))], 503, "no_ready_pods"),
        (headers(), [body(b"x" * 5000)], 413, "request_too_large"),
    ],
)
async def test_bad_input_gets_openai_errors_and_leaks_nothing(
    aibrix: Harness, request_headers: pb.ProcessingRequest, messages: list, status: int, code: str
) -> None:
    replies = await exchange(aibrix, [request_headers, *messages], 1 + bool(messages))
    got_status, error = error_of(replies[-1])
    assert (got_status, error["code"]) == (status, code)
    assert error["message"]
    assert error["type"] in {"invalid_request_error", "overloaded_error"}
    assert set_headers(replies[-1].immediate_response.headers).keys() & {
        f"x-error-{c}"
        for c in (
            "unsupported-path",
            "method-not-allowed",
            "invalid-routing-strategy",
            "invalid-body",
            "missing-model",
            "model-not-found",
            "no-model-backends",
            "body-too-large",
        )
    }
    assert aibrix.inflight() == [0, 0, 0]


async def test_response_headers_report_the_decision(aibrix: Harness) -> None:
    response_headers = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=core.HeaderMap(headers=[core.HeaderValue(key=":status", raw_value=b"200")])
        )
    )
    replies = await exchange(aibrix, [headers(), body(CHAT), response_headers], 3)
    added = set_headers(replies[2].response_headers.response.header_mutation)
    routed = set_headers(replies[1].request_body.response.header_mutation)["target-pod"]
    assert added["target-pod-ip"] == routed
    assert added["target-pod"].startswith("pod-")
    assert added["routing-strategy"] == "least-request"
    assert added["request-id"] == "req-1"


async def test_session_ids_ride_in_the_metadata_of_each_request(aibrix: Harness) -> None:
    """Four sessions on three pods: a reply cached per pod would hand one session's id to another."""
    response_headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
    for session in ("s0", "s1", "s2", "s3"):
        extra = {"routing-strategy": "session-affinity", "x-session-id": session}
        replies = await exchange(aibrix, [headers(**extra), body(CHAT), response_headers], 3)
        assert json_format.MessageToDict(replies[1].dynamic_metadata)["brickyard"]["session_id"] == session
        assert set_headers(replies[2].response_headers.response.header_mutation)["x-session-id"] == session
    generated = await exchange(aibrix, [headers(**{"routing-strategy": "session-affinity"}), body(CHAT)], 2)
    assert len(json_format.MessageToDict(generated[1].dynamic_metadata)["brickyard"]["session_id"]) == 32
    unbound = await exchange(aibrix, [headers(**{"x-session-id": "s0"}), body(CHAT), response_headers], 3)
    assert "session_id" not in json_format.MessageToDict(unbound[1].dynamic_metadata)["brickyard"]
    assert "x-session-id" not in set_headers(unbound[2].response_headers.response.header_mutation)


# -- EPP contract (FULL_DUPLEX_STREAMED) -------------------------------------------------------


async def test_epp_defers_headers_until_body_complete(epp: Harness) -> None:
    payload = orjson.dumps({"model": MODEL, "prompt": "p" * 150_000})
    chunks = [payload[i : i + 40_000] for i in range(0, len(payload), 40_000)]
    messages = [headers("/v1/completions", config=DUPLEX)] + [
        body(c, eos=i == len(chunks) - 1) for i, c in enumerate(chunks)
    ]
    expected_chunks = -(-len(payload) // STREAMED_CHUNK_BYTES)
    replies = await exchange(epp, messages, 1 + expected_chunks)
    first = replies[0]
    assert first.WhichOneof("response") == "request_headers"  # nothing was answered before the body ended
    endpoints = set_headers(first.request_headers.response.header_mutation)["x-gateway-destination-endpoint"]
    assert len(endpoints.split(",")) == 3  # primary + 2 fallbacks
    metadata = json_format.MessageToDict(first.dynamic_metadata)
    assert metadata["envoy.lb"]["x-gateway-destination-endpoint"] == endpoints
    streamed = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert b"".join(s.body for s in streamed) == payload
    assert [s.end_of_stream for s in streamed] == [False] * (expected_chunks - 1) + [True]
    assert all(len(s.body) <= STREAMED_CHUNK_BYTES for s in streamed)


async def test_epp_subset_hint_is_honoured(epp: Harness) -> None:
    for hint in (["10.0.0.2:8000"], "10.0.0.2:8000, 10.9.9.9:1"):
        metadata = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": hint}}
        first, _ = await exchange(epp, [headers(config=DUPLEX, metadata=metadata), body(CHAT)], 2)
        endpoints = set_headers(first.request_headers.response.header_mutation)[
            "x-gateway-destination-endpoint"
        ]
        assert endpoints == "10.0.0.2:8000"


async def test_epp_empty_subset_is_503(epp: Harness) -> None:
    metadata = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": []}}
    (reply,) = await exchange(epp, [headers(config=DUPLEX, metadata=metadata), body(CHAT)], 1)
    assert error_of(reply)[0] == 503


async def test_epp_echoes_response_body_and_trailers(epp: Harness) -> None:
    response = [
        pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: 1\n\n", end_of_stream=False)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: [DONE]\n\n", end_of_stream=True)),
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
    ]
    replies = await exchange(epp, [headers(config=DUPLEX), body(CHAT), *response], 6)
    echoed = [r.response_body.response.body_mutation.streamed_response for r in replies[3:5]]
    assert [(e.body, e.end_of_stream) for e in echoed] == [
        (b"data: 1\n\n", False),
        (b"data: [DONE]\n\n", True),
    ]
    assert replies[5].WhichOneof("response") == "response_trailers"


async def test_epp_request_trailers_end_the_body(epp: Harness) -> None:
    trailers = pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    replies = await exchange(epp, [headers(config=DUPLEX), body(CHAT, eos=False), trailers], 3)
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers",
        "request_body",
        "request_trailers",
    ]
    streamed = replies[1].request_body.response.body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (CHAT, False)


async def test_epp_contract_strips_control_headers(epp: Harness) -> None:
    extra = {
        "x-gateway-inference-objective": "critical",
        "x-gateway-destination-endpoint-subset": "1.1.1.1:1",
    }
    first, _ = await exchange(epp, [headers(config=DUPLEX, **extra), body(CHAT)], 2)
    assert set(first.request_headers.response.header_mutation.remove_headers) == set(extra)


async def test_debug_logging_writes_one_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway_plugins.requests")
    async for harness in _harness("aibrix"):
        await exchange(harness, [headers(), body(CHAT)], 2)
        await exchange(harness, [headers("/v1/nope")], 1)
        await harness.server.drain(1)
    lines = [r for r in caplog.records if r.name == "gateway_plugins.requests"]
    assert [(r.request_id, r.status, r.model) for r in lines] == [("req-1", None, MODEL), ("req-1", 404, "")]
    assert lines[0].pod.startswith("pod-")
    assert lines[0].strategy == "least-request"
    assert lines[1].pod is None


# -- hostile input -----------------------------------------------------------------------------


def nested(depth: int) -> str:
    """JSON text of a list ``depth`` levels deep (built as text: orjson writes only 255 levels)."""
    return "[" * depth + "1" + "]" * depth


class Broken(Stateless):
    """A strategy with a bug: the gateway answers 500 with a code and counts nothing."""

    name = "broken"

    def score(self, request: RoutingRequest, pods: Sequence[PodState]) -> Sequence[float]:
        raise ZeroDivisionError("a bug")


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "prompt", nested(1000)),  # orjson reads up to 1,024 levels
        ("/v1/completions", "prompt", "[[1, 2], [3, [4]]]"),
        ("/v1/embeddings", "input", nested(3)),
        ("/v1/responses", "input", f"[{nested(500)}]"),
    ],
)
async def test_nested_prompts_are_400_and_count_nothing(
    contract: str, path: str, field: str, value: str
) -> None:
    """A prompt nested deeper than OpenAI's shapes once hit Python's recursion limit after the pod's
    in-flight count was raised: a 500 without a code and a count never released."""
    raw = f'{{"model": "{MODEL}", "{field}": {value}}}'.encode()
    messages = [headers(path, config=DUPLEX if contract == "epp" else BUFFERED), body(raw)]
    async for harness in _harness(contract):
        replies = await exchange(harness, messages, 1 if contract == "epp" else 2)
        status, error = error_of(replies[-1])
        assert (status, error["code"], error["param"]) == (400, "invalid_value", field)
        assert harness.inflight() == [0, 0, 0]


async def test_a_bug_is_a_500_with_a_code_and_counts_nothing() -> None:
    async for harness in _harness("aibrix", strategies={"broken": Broken()}):
        replies = await exchange(harness, [headers(**{"routing-strategy": "broken"}), body(CHAT)], 2)
        status, error = error_of(replies[-1])
        assert (status, error["code"], error["type"]) == (500, "internal_error", "api_error")
        assert harness.inflight() == [0, 0, 0]


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
async def test_tenant_credentials_never_reach_the_engine(contract: str) -> None:
    config = DUPLEX if contract == "epp" else BUFFERED
    credentials = {"authorization": "Bearer sk-tenant", "x-api-key": "sk-tenant", "api-key": "sk-tenant"}
    for engine_key in (None, "sk-engine"):
        async for harness in _harness(contract, engine_api_key=engine_key):
            first, _ = await exchange(harness, [headers(config=config, **credentials), body(CHAT)], 2)
            mutation = first.request_headers.response.header_mutation
            removed, added = set(mutation.remove_headers), set_headers(mutation)
            if engine_key is None:
                assert removed == set(credentials)
                assert "authorization" not in added
            else:  # the engines' own key replaces the tenant's
                assert removed == set(credentials) - {"authorization"}
                assert added["authorization"] == "Bearer sk-engine"


async def test_strategy_label_takes_only_known_names(aibrix: Harness) -> None:
    """Each weighted combination a client makes up is one ``combination`` series, not one of its own."""
    for weight in range(1, 40):
        await exchange(
            aibrix, [headers(**{"routing-strategy": f"random:1,least-request:{weight}"}), body(CHAT)], 2
        )
    preset = "least-queue:2,least-kv-cache:2,prefix-cache:3"  # the inference-extension preset, spelled out
    _, routed = await exchange(aibrix, [headers(**{"routing-strategy": preset}), body(CHAT)], 2)
    assert (
        json_format.MessageToDict(routed.dynamic_metadata)["brickyard"]["strategy"] == "inference-extension"
    )
    await exchange(aibrix, [headers(**{"routing-strategy": "round-robin"}), body(CHAT)], 2)
    assert aibrix.strategy_labels() == {"combination", "inference-extension", "round-robin"}
