"""The live emulator over HTTP: vLLM's API shapes, LoRA admin endpoints, tokens, metrics, aborts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from emulator import tokens
from emulator.engine import EngineCore
from emulator.live import LiveEngine
from emulator.profile import load_profile
from emulator.server import EmulatorApp
from emulator.tokens import chat_prompt

MODEL = "llama-test"


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    core = EngineCore(load_profile("llama-3.1-8b_h100"), max_loras=2)
    engine = LiveEngine(core, speed=20.0)  # 20 virtual seconds per wall second: fast tests, same behaviour
    app = EmulatorApp(engine, model=MODEL, pod_name="pod-a", max_model_len=2048, enable_lora=True)
    async with TestClient(TestServer(app.build())) as test_client:
        test_client.engine = engine  # type: ignore[attr-defined]
        yield test_client
    await engine.close()


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    return path


async def post(client: TestClient, path: str, body: object) -> tuple[int, object]:
    response = await client.post(path, data=orjson.dumps(body), headers={"content-type": "application/json"})
    text = await response.text()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


async def sse(client: TestClient, path: str, body: dict) -> list[dict]:
    response = await client.post(path, json={**body, "stream": True})
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_chat_completion_and_usage(client: TestClient) -> None:
    status, body = await post(
        client,
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )
    assert status == 200
    prompt_ids = tokens.encode(chat_prompt([{"role": "user", "content": "hi"}]))
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,  # type: ignore[index]
        "total_tokens": len(prompt_ids) + 5,
    }
    assert body["choices"][0]["message"]["content"] == "".join(tokens.reply(prompt_ids, 5)[1])  # type: ignore[index]
    assert body["object"] == "chat.completion"  # type: ignore[index]


async def test_streamed_chat_chunk_sequence_matches_vllm(client: TestClient) -> None:
    events = await sse(
        client,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True},
        },
    )
    # As vLLM (checked against it in tests/real_vllm): a role chunk, one chunk per token, the last one with
    # finish_reason, a usage chunk with no choices.
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:5]] == list(
        tokens.reply(tokens.encode(chat_prompt([{"role": "user", "content": "hi"}])), 4)[1]
    )
    assert [e["choices"][0]["finish_reason"] for e in events[1:5]] == [None, None, None, "length"]
    assert len(events) == 6
    assert events[5]["choices"] == []
    assert events[5]["usage"]["completion_tokens"] == 4
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1


async def test_completion_stream_without_usage(client: TestClient) -> None:
    events = await sse(client, "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 3})
    assert [e["choices"][0]["text"] for e in events[:3]] == tokens.reply(tokens.encode("Once upon"), 3)[1]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events)


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "fragment"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "NotFoundError", "does not exist"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x " * 2100},
            400,
            "BadRequestError",
            "maximum context length",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 0},
            400,
            "BadRequestError",
            "max_tokens",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 4096},
            400,
            "BadRequestError",
            "cannot be greater than max_model_len",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "Bad Request", "body.prompt"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": []},
            400,
            "BadRequestError",
            "empty conversation",
        ),
        ("/v1/chat/completions", {"model": MODEL, "messages": "x"}, 400, "Bad Request", "body.messages"),
    ],
)
async def test_engine_errors_have_vllms_shape(
    client: TestClient, path: str, body: dict, status: int, kind: str, fragment: str
) -> None:
    got, error = await post(client, path, body)
    assert got == status
    assert error["error"]["type"] == kind  # type: ignore[index]
    assert error["error"]["code"] == status  # type: ignore[index]
    assert fragment in error["error"]["message"]  # type: ignore[index]


async def test_invalid_json_is_400(client: TestClient) -> None:
    response = await client.post("/v1/completions", data=b"{nope")
    assert response.status == 400
    assert (await response.json())["error"]["type"] == "Bad Request"  # vLLM's request-schema errors


async def test_max_tokens_is_capped_to_the_context_left(client: TestClient) -> None:
    prompt = list(range(2040))  # token ids; the test engine's context is 2048
    status, body = await post(
        client, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 100}
    )
    assert status == 200
    assert body["usage"]["completion_tokens"] == 8  # type: ignore[index]
    status, error = await post(client, "/v1/completions", {"model": MODEL, "prompt": [1] * 2048})
    assert status == 400
    assert error["error"]["message"].startswith("max_tokens must be at least 1, got 0.")  # type: ignore[index]


async def test_lora_lifecycle(client: TestClient, adapter_dir: Path) -> None:
    status, text = await post(
        client, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapter_dir)}
    )
    assert (status, text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    models = await (await client.get("/v1/models")).json()
    assert [(m["id"], m["parent"]) for m in models["data"]] == [(MODEL, None), ("sql", MODEL)]
    assert models["data"][1]["root"] == str(adapter_dir)
    status, body = await post(
        client, "/v1/completions", {"model": "sql", "prompt": "select", "max_tokens": 2}
    )
    assert status == 200
    assert body["model"] == "sql"  # type: ignore[index]
    status, text = await post(client, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert (status, text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    status, _ = await post(client, "/v1/completions", {"model": "sql", "prompt": "select"})
    assert status == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "a"}, 400, "body.lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/no/such/dir"}, 404, "No adapter found"),
        ("/v1/unload_lora_adapter", {"lora_name": "ghost"}, 404, "cannot be found"),
        ("/v1/unload_lora_adapter", {}, 400, "lora_name"),
    ],
)
async def test_lora_errors(client: TestClient, path: str, body: dict, status: int, fragment: str) -> None:
    got, error = await post(client, path, body)
    assert got == status
    assert fragment in error["error"]["message"]  # type: ignore[index]


async def test_loading_twice_is_an_error(client: TestClient, adapter_dir: Path) -> None:
    body = {"lora_name": "a", "lora_path": str(adapter_dir)}
    assert (await post(client, "/v1/load_lora_adapter", body))[0] == 200
    status, error = await post(client, "/v1/load_lora_adapter", body)
    assert status == 400
    assert "already been loaded" in error["error"]["message"]  # type: ignore[index]


async def test_tokenize_and_render(client: TestClient) -> None:
    _, tokenized = await post(client, "/tokenize", {"model": MODEL, "prompt": "hello world"})
    assert tokenized == {
        "count": len(tokens.encode("hello world")),
        "max_model_len": 2048,
        "tokens": tokens.encode("hello world"),
    }
    _, rendered = await post(client, "/v1/completions/render", {"model": MODEL, "prompt": "hello world"})
    assert rendered[0]["token_ids"] == tokens.encode("hello world")  # type: ignore[index]
    messages = [{"role": "user", "content": "hi"}]
    _, chat = await post(client, "/v1/chat/completions/render", {"model": MODEL, "messages": messages})
    assert chat["token_ids"] == tokens.encode(chat_prompt(messages))  # type: ignore[index]


async def test_metrics_use_vllms_names_and_labels(client: TestClient, adapter_dir: Path) -> None:
    await post(client, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(adapter_dir)})
    task = asyncio.create_task(
        post(client, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 1500})
    )
    await asyncio.sleep(0.2)
    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:num_preemptions",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:cache_config_info",
        "vllm:lora_requests_info",
    ):
        assert name in families, name
    running = families["vllm:num_requests_running"].samples[0]
    assert running.labels == {"engine": "0", "model_name": MODEL}
    assert running.value == 1
    lora = [s for s in families["vllm:lora_requests_info"].samples if s.labels["max_lora"]]
    assert lora[0].labels == {"max_lora": "2", "running_lora_adapters": "a", "waiting_lora_adapters": ""}
    assert lora[0].value > 1e9  # a timestamp, as vLLM reports it
    cache = families["vllm:cache_config_info"].samples[0].labels
    assert cache["block_size"] == "16"
    assert int(cache["num_gpu_blocks"]) > 1000
    status, _ = await task
    assert status == 200


async def test_client_abort_frees_the_engine(client: TestClient) -> None:
    response = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1500, "stream": True}
    )
    await response.content.readline()
    engine: LiveEngine = client.engine  # type: ignore[attr-defined]
    assert engine.stats().num_running == 1
    response.close()
    for _ in range(100):
        if engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.02)
    stats = engine.stats()
    assert (stats.num_running, stats.requests_finished.get("abort")) == (0, 1)
    assert stats.kv_cache_usage == 0.0


async def test_get_load_and_status(client: TestClient) -> None:
    assert await (await client.get("/get_load")).json() == {"load": 0}
    await post(client, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3})
    status = await (await client.get("/emulator/status")).json()
    assert status["pod"] == "pod-a"
    assert status["steps"] >= 3
    assert status["lag_max_seconds"] < 1.0


async def test_get_load_in_sglangs_shape_on_request(client: TestClient) -> None:
    # sglang-router's power_of_two only reads SGLang's per-DP-rank list and sums num_tokens;
    # vllm-router only reads {"load": N}; the engine answers whichever it was told to.
    assert await post(client, "/emulator/load_format", {"format": "sglang"}) == (200, {"format": "sglang"})
    assert await (await client.get("/get_load")).json() == [
        {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}
    ]
    prompt = " ".join(f"word{i}" for i in range(40))
    task = asyncio.create_task(
        post(client, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1500})
    )
    engine: LiveEngine = client.engine  # type: ignore[attr-defined]
    for _ in range(100):
        if engine.stats().kv_cache_usage > 0:
            break
        await asyncio.sleep(0.02)
    (rank,) = await (await client.get("/get_load")).json()
    assert rank["num_reqs"] == 1
    assert rank["num_tokens"] >= len(tokens.encode(prompt))  # the prompt's KV blocks, at least
    assert rank["num_tokens"] % 16 == 0  # whole blocks
    assert await post(client, "/emulator/load_format", {"format": "load"}) == (200, {"format": "load"})
    assert await (await client.get("/get_load")).json() == {"load": 1}
    status, error = await post(client, "/emulator/load_format", {"format": "json"})
    assert status == 400
    assert error["error"]["param"] == "format"  # type: ignore[index]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_app_builds_without_a_loop() -> None:
    assert isinstance(
        EmulatorApp(LiveEngine(EngineCore(load_profile("llama-3.1-8b_l4"))), model="m").build(),
        web.Application,
    )
