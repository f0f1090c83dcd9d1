"""OpenAI SDK -> real Envoy -> gateway -> emulated engines, for both wire contracts."""

from __future__ import annotations

import concurrent.futures
import socket
from collections import Counter

import httpx
import openai
import orjson
import pytest

from tests.conftest import COLD_MODEL, MODEL, Deployment

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "Say something about gateways."}]


def client(deployment: Deployment, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployment.base_url}/v1", api_key="unused", max_retries=0, **kwargs)


def test_chat_lands_on_the_pod_named_in_the_response(deployment: Deployment) -> None:
    addresses = {e.name: e.address for e in deployment.engines}
    for strategy in ("random", "least-request"):
        raw = client(deployment).chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, extra_headers={"routing-strategy": strategy}
        )
        served_by = raw.headers["x-emulator-pod"]  # set by the engine itself
        assert raw.headers["target-pod"] == served_by
        assert raw.headers["target-pod-ip"] == addresses[served_by]
        assert raw.headers["routing-strategy"] == strategy
        assert raw.headers["request-id"]
        completion = raw.parse()
        assert completion.choices[0].message.content
        assert (
            completion.usage.total_tokens
            == completion.usage.prompt_tokens + completion.usage.completion_tokens
        )


def test_client_request_id_is_honoured(deployment: Deployment) -> None:
    raw = client(deployment).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, extra_headers={"x-request-id": "my-trace-42"}
    )
    assert raw.headers["request-id"] == "my-trace-42"


def test_client_cannot_choose_its_own_pod(deployment: Deployment) -> None:
    bogus = {"target-pod": "127.0.0.1:1", "x-gateway-destination-endpoint": "127.0.0.1:1"}
    raw = client(deployment).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, extra_headers=bogus
    )
    assert raw.headers["target-pod-ip"] != "127.0.0.1:1"
    assert raw.parse().choices[0].message.content


def test_streams_arrive_intact(deployment: Deployment) -> None:
    """The SSE stream through Envoy and the gateway equals the engine's own, chunk for chunk."""
    kwargs = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    through = list(client(deployment).chat.completions.create(**kwargs))
    engine = deployment.engines[0]
    direct = list(openai.OpenAI(base_url=f"{engine.url}/v1", api_key="x").chat.completions.create(**kwargs))

    def shape(chunks: list) -> list:
        return [
            (c.choices[0].delta.content, c.choices[0].finish_reason) if c.choices else c.usage for c in chunks
        ]

    assert shape(through) == shape(direct)
    assert len(through) == 40 + 2  # role chunk, 40 tokens (the last with finish_reason, as vLLM), usage chunk
    assert through[-1].usage.completion_tokens == 40


def test_completions_embeddings_and_models(deployment: Deployment) -> None:
    api = client(deployment)
    completion = api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert completion.usage.completion_tokens == 5
    streamed = "".join(
        c.choices[0].text for c in api.completions.create(model=MODEL, prompt="x", max_tokens=5, stream=True)
    )
    assert len(streamed.split()) == 5
    embedding = api.embeddings.create(model=MODEL, input=["a", "b"])
    assert [d.index for d in embedding.data] == [0, 1]
    assert [m.id for m in api.models.list().data] == [MODEL]
    assert api.models.retrieve(MODEL).id == MODEL


def _post(deployment: Deployment, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{deployment.base_url}{path}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def _chat(**fields: object) -> bytes:
    return orjson.dumps({"messages": CHAT, **fields})


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code", "error_header"),
    [
        ("/v1/chat/completions", b"{not json", {}, 400, "invalid_json", "x-error-invalid-body"),
        ("/v1/chat/completions", _chat(), {}, 400, "missing_model", "x-error-missing-model"),
        ("/v1/chat/completions", _chat(model="nope"), {}, 404, "model_not_found", "x-error-model-not-found"),
        (
            "/v1/chat/completions",
            _chat(model=MODEL),
            {"routing-strategy": "fastest"},
            400,
            "invalid_routing_strategy",
            "x-error-invalid-routing-strategy",
        ),
        (
            "/v1/chat/completions",
            _chat(model=COLD_MODEL),
            {},
            503,
            "no_ready_pods",
            "x-error-no-model-backends",
        ),
        ("/v1/audio/speech", _chat(model=MODEL), {}, 404, "unknown_url", "x-error-unsupported-path"),
        ("/v1/chat/completions", b"", {}, 400, "invalid_json", "x-error-invalid-body"),
    ],
)
def test_bad_requests_get_openai_errors(
    deployment: Deployment, path: str, body: bytes, headers: dict, status: int, code: str, error_header: str
) -> None:
    response = _post(deployment, path, body, **headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers[error_header] == "true"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not any(deployment.wait_inflight(lambda c: not any(c.values())).values())


def test_sdk_raises_typed_errors(deployment: Deployment) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(deployment).chat.completions.create(model="nope", messages=CHAT)
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client(deployment).chat.completions.create(
            model=MODEL, messages=CHAT, extra_headers={"routing-strategy": "nope"}
        )


def test_body_over_the_gateway_limit_is_413(deployment: Deployment) -> None:
    body = _chat(model=MODEL, padding="x" * (9 * 1024 * 1024))  # gateway limit 8 MiB < Envoy's 16 MiB
    response = _post(deployment, "/v1/chat/completions", body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-error-body-too-large"] == "true"


def test_body_over_envoys_buffer_is_413_in_openai_shape(deployment: Deployment) -> None:
    """AIBrix: Envoy's buffer overflows first (its reply is rewritten to OpenAI's shape).
    EPP: Envoy streams the body through, so the gateway's own limit answers."""
    response = _post(deployment, "/v1/chat/completions", _chat(model=MODEL, padding="x" * (17 * 1024 * 1024)))
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")


def test_client_disconnect_mid_stream_releases_the_inflight_count(deployment: Deployment) -> None:
    body = _chat(model=MODEL, max_tokens=2000, stream=True)
    host, port = deployment.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    sock.settimeout(10)
    received = b""
    while b"data: " not in received:  # the stream is flowing
        received += sock.recv(65536)
    busy = deployment.wait_inflight(lambda c: sum(c.values()) == 1)
    assert sum(busy.values()) == 1
    sock.close()  # the client goes away 10 s before the stream would end
    idle = deployment.wait_inflight(lambda c: not any(c.values()))
    assert not any(idle.values()), idle


def test_a_burst_spreads_across_pods(deployment: Deployment) -> None:
    api = client(deployment, timeout=60)

    def one(_: int) -> str:
        raw = api.chat.completions.with_raw_response.create(
            model=MODEL, messages=CHAT, max_tokens=200, extra_headers={"routing-strategy": "least-request"}
        )
        return raw.headers["target-pod"]

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        served = Counter(pool.map(one, range(30)))
    assert sorted(served.values()) == [10, 10, 10], served
