"""The OpenAI API through Envoy and the gateway to real vLLM, both contracts: replies, usage, tenancy's token
accounting, and the engine's own errors."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import redis_at
from tests.real_vllm.conftest import GHOST_MODEL, MODEL, Deployment, RealFleet, eventually, post

PROMPT = "tell me about the ocean and the river"
IGNORE_EOS = {"ignore_eos": True}  # a random model may emit EOS at once; usage is then still exact


def engine_tokens(fleet: RealFleet) -> float:
    """Prompt + generated tokens processed by both engines, from their own counters."""
    return sum(
        fleet.engine_counter(engine, family)
        for engine in fleet.engines
        for family in ("vllm:prompt_tokens", "vllm:generation_tokens")
    )


def tpm_used(fleet: RealFleet, user: str) -> int:
    return sum(int(v) for v in redis_at(fleet.redis_port).hvals(f"brickyard:limit:tpm:{user}"))


def test_sdk_chat_and_completions_with_usage_charged_to_the_tenant(
    fleet: RealFleet, deployment: Deployment
) -> None:
    user = f"tenant-{deployment.contract}"
    api = deployment.client(user=user)
    engines_before, charged_before = engine_tokens(fleet), tpm_used(fleet, user)
    messages = [{"role": "user", "content": PROMPT}]

    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, extra_body=IGNORE_EOS)
    assert chat.usage is not None and chat.usage.completion_tokens == 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 5
    assert chat.choices[0].finish_reason == "length"
    assert chat.choices[0].message.role in ("vllm-a", "vllm-b")  # --response-role: a real replica answered

    chunks = list(
        api.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
    )
    assert chunks[0].choices[0].delta.role in ("vllm-a", "vllm-b")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens  # same prompt, same tokenizer

    completion = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body=IGNORE_EOS)
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    # A stream without include_usage: the gateway asks the engine for usage and strips it from the reply.
    streamed = list(
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True, extra_body=IGNORE_EOS)
    )
    assert all(c.usage is None for c in streamed)
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    hidden = completion.usage.prompt_tokens + 3  # same prompt as the completion above

    visible = chat.usage.total_tokens + chunks[-1].usage.total_tokens + completion.usage.total_tokens
    expected = visible + hidden
    assert eventually(lambda: engine_tokens(fleet) - engines_before >= expected)
    assert engine_tokens(fleet) - engines_before == expected  # the engines processed exactly this
    assert eventually(lambda: tpm_used(fleet, user) - charged_before == expected), (
        tpm_used(fleet, user) - charged_before,
        expected,
    )


def chat(content: str, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


@pytest.mark.parametrize(
    ("body", "status", "kind", "param"),
    [
        (chat("hello", model=GHOST_MODEL), 404, "NotFoundError", "model"),  # known to the gateway, not vLLM
        (chat("word " * 600), 400, "BadRequestError", "input_tokens"),  # beyond --max-model-len 512
        (chat("hello", max_tokens=600), 400, "BadRequestError", "max_tokens"),
        (chat("hello", temperature=-2), 400, "BadRequestError", "temperature"),
        (chat("hello", top_p=2), 400, "BadRequestError", "top_p"),
    ],
    ids=["unknown-model-at-engine", "context-too-long", "max-tokens", "temperature", "top-p"],
)
def test_engine_errors_reach_the_client_as_the_engine_sent_them(
    fleet: RealFleet, deployment: Deployment, body: dict, status: int, kind: str, param: str
) -> None:
    direct = post(fleet.engines[0].url, "/v1/chat/completions", body)
    through = post(deployment.base_url, "/v1/chat/completions", body)
    assert (direct.status_code, through.status_code) == (status, status)
    error = through.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (kind, param, status)
    assert through.json() == direct.json()  # byte-for-byte the engine's error, not the gateway's
    assert "target-pod" in through.headers  # routed, then refused by vLLM
    assert not any(h.startswith("x-error-") for h in through.headers)


def test_the_sdk_raises_openais_exceptions_for_engine_errors(aibrix: Deployment) -> None:
    api = aibrix.client()
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(
            model=GHOST_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert "does not exist" in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        api.completions.create(model=MODEL, prompt="word " * 600, max_tokens=2)
    assert "maximum context length is 512" in too_long.value.message
    # A model nobody serves is the gateway's own 404, before any engine sees it.
    response = httpx.post(
        f"{aibrix.base_url}/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    assert response.status_code == 404
    assert response.headers["x-error-model-not-found"] == "true"
