"""The emulator against real vLLM, side by side, on what routers and sidecars depend on: the metric families
and label keys the sidecar reads, the streamed chunk sequence with usage, error bodies, the LoRA endpoints'
answers and ``/v1/models``. Both serve the same model name with the same context length and LoRA slots."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from brickyard.stack import Engine
from runtime_sidecar.scrape import VLLM
from tests.real_vllm.conftest import MODEL, RealFleet, post, sse_events

#: The label keys the sidecar reads from the info-style families (real vLLM has many more).
INFO_LABELS = {
    "vllm:cache_config_info": {
        "block_size",
        "num_gpu_blocks",
        "kv_cache_size_tokens",
        "enable_prefix_caching",
    },
    "vllm:lora_requests_info": {"max_lora", "running_lora_adapters", "waiting_lora_adapters"},
}


@pytest.fixture(scope="module")
def pair(fleet: RealFleet) -> dict[str, Engine]:
    engines = {"vllm": fleet.engines[0], "emulator": fleet.emulator}
    for engine in engines.values():  # vLLM shows lora_requests_info once its scheduler has logged a step
        assert post(
            engine.url, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        ).is_success
    return engines


def families(engine: Engine) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{engine.url}/metrics").text)}


def test_metric_families_and_labels_the_sidecar_reads(pair: dict[str, Engine]) -> None:
    real, emulated = families(pair["vllm"]), families(pair["emulator"])
    names = []
    for field, candidates in vars(VLLM).items():
        present = [name for name in candidates if name in real]
        if field == "prefix_hit_rate":  # an older vLLM's gauge: V1 has hit and query counters instead
            assert not present
            continue
        assert present, f"real vLLM has none of {candidates}: the sidecar reads names vLLM no longer exposes"
        names.append(present[0])
    for name in names:
        assert name in emulated, f"the emulator lacks {name}"
        assert emulated[name].type == real[name].type, name
        if name in INFO_LABELS:
            for family in (real[name], emulated[name]):
                assert family.samples, name
                assert all(INFO_LABELS[name] <= set(s.labels) for s in family.samples), name
            continue

        def keys(family: Any) -> set[tuple[str, ...]]:
            return {
                tuple(sorted(set(s.labels) - {"le"}))
                for s in family.samples
                if not s.name.endswith("_created")
            }

        assert keys(emulated[name]) == keys(real[name]) == {("engine", "model_name")}, name
        sample_kinds = {s.name.removeprefix(name) for s in real[name].samples} - {"_created"}
        assert {s.name.removeprefix(name) for s in emulated[name].samples} == sample_kinds, name
    for engine in (real, emulated):
        lora = engine["vllm:lora_requests_info"].samples
        assert all(s.labels["max_lora"] == "2" and s.value > 1e9 for s in lora)  # a timestamp, slots set
        assert engine["vllm:cache_config_info"].samples[0].value == 1


def shapes(events: list[Any]) -> list[Any]:
    """What a client or the gateway's usage reader relies on in a stream. Chunks that carry tokens without
    finishing are left out: their number varies with real vLLM, which merges the tokens of several steps into
    one chunk when its API server falls behind the engine."""
    kept = []
    for event in events:
        summary = shape(event)
        if summary != "[DONE]" and summary[1]:
            _, delta_keys, _, finish = summary[1][0]
            if finish is None and "role" not in delta_keys:
                continue  # a chunk of tokens
        kept.append(summary)
    return kept


def shape(event: Any) -> Any:
    if event == "[DONE]":
        return event
    choices = [
        (
            choice["index"],
            sorted(choice.get("delta", {})),
            "text" in choice,
            choice["finish_reason"],
        )
        for choice in event["choices"]
    ]
    return event["object"], choices, sorted(event["usage"]) if event.get("usage") else None


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_streamed_chunk_sequence(pair: dict[str, Engine], path: str, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "stream": True, "ignore_eos": True}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hello there"}]
    else:
        body["prompt"] = "hello there"
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    streams = {kind: sse_events(post(engine.url, path, body)) for kind, engine in pair.items()}
    assert shapes(streams["emulator"]) == shapes(streams["vllm"])
    for events in streams.values():
        assert len({e["id"] for e in events[:-1]}) == 1
        assert all({"id", "object", "created", "model", "choices"} <= set(e) for e in events[:-1])
    # The emulator sends no top-level key that vLLM does not.
    assert set().union(*streams["emulator"][:-1]) <= set().union(*streams["vllm"][:-1])
    if include_usage:
        for events in streams.values():
            usage = events[-2]["usage"]
            assert usage["completion_tokens"] == 5
            assert usage["total_tokens"] == usage["prompt_tokens"] + 5


def error_shape(response: httpx.Response) -> tuple[int, str, str | None, int]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return response.status_code, error["type"], error["param"], error["code"]


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        (
            "/v1/completions",
            {"model": "nope", "prompt": "x"},
            "The model `nope` does not exist. Valid aliases",
        ),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            "does not exist",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 0},
            "max_tokens must be at least 1",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 600}, "cannot be greater than"),
        ("/v1/completions", {"model": MODEL, "prompt": list(range(1, 600))}, "maximum context length is 512"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": list(range(1, 513))},
            "max_tokens must be at least 1, got 0",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, "body.max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "empty conversation"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "x"}, "body.messages"),
    ],
    ids=[
        "unknown-model",
        "unknown-model-chat",
        "max-tokens-0",
        "max-tokens-over-context",
        "prompt-over-context",
        "prompt-fills-context",
        "max-tokens-not-int",
        "empty-messages",
        "messages-not-list",
    ],
)
def test_error_bodies(pair: dict[str, Engine], path: str, body: dict, fragment: str) -> None:
    real, emulated = (post(pair[kind].url, path, body) for kind in ("vllm", "emulator"))
    assert error_shape(emulated) == error_shape(real)
    for response in (real, emulated):
        assert fragment in response.json()["error"]["message"]


def test_context_left_caps_max_tokens(pair: dict[str, Engine]) -> None:
    body = {"model": MODEL, "prompt": list(range(1, 501)), "max_tokens": 100, "ignore_eos": True}
    for engine in pair.values():
        response = post(engine.url, "/v1/completions", body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 12  # 512 - 500
        assert response.json()["choices"][0]["finish_reason"] == "length"


def models_shape(engine: Engine) -> list[tuple]:
    body = httpx.get(f"{engine.url}/v1/models").json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    return [(sorted(card), card["id"], card["parent"], card["max_model_len"]) for card in body["data"]]


def test_lora_endpoints_and_models(pair: dict[str, Engine], fleet: RealFleet) -> None:
    path = str(fleet.model.adapter("lora-a"))
    assert (
        models_shape(pair["emulator"])
        == models_shape(pair["vllm"])
        == [(models_shape(pair["vllm"])[0][0], MODEL, None, 512)]
    )
    answers: dict[str, list] = {}
    for kind, engine in pair.items():
        calls = [
            ("/v1/load_lora_adapter", {"lora_name": "fid", "lora_path": path}),
            ("/v1/load_lora_adapter", {"lora_name": "fid", "lora_path": path}),  # twice
            ("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": "/no/such/adapter"}),
            ("/v1/load_lora_adapter", {"lora_name": "half"}),
            ("models", None),
            ("/v1/unload_lora_adapter", {"lora_name": "fid"}),
            ("/v1/unload_lora_adapter", {"lora_name": "fid"}),  # twice
            ("/v1/unload_lora_adapter", {}),
        ]
        answers[kind] = []
        for call, body in calls:
            if call == "models":
                answers[kind].append(models_shape(engine))
                continue
            response = post(engine.url, call, body)  # type: ignore[arg-type]
            answers[kind].append(
                (response.status_code, response.text) if response.is_success else error_shape(response)
            )
    assert answers["emulator"] == answers["vllm"]
    assert answers["vllm"][0] == (200, "Success: LoRA adapter 'fid' added successfully.")
    assert answers["vllm"][4][1][1:] == ("fid", MODEL, None)  # the adapter's card names its base model
