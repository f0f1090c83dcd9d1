"""OpenAI SDK -> each peer router (sglang-router, vllm-router; from bench.peers) -> two emulated engines.

Proves the routing benchmark's peers run here, offline and on loopback, in front of our engines: the
three request kinds succeed through each, and traffic reaches both engines. Skipped when the peers'
virtualenv is missing (``python -m bench.peers --install`` builds it).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from collections.abc import Iterator

import openai
import pytest

from bench.peers import PEERS, peers_available, start_peer, stop_peer
from brickyard.stack import Engine, Stack

MODEL = "peer-model"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not peers_available(),
        reason="sglang-router/vllm-router not installed in .peers (python -m bench.peers --install)",
    ),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("peers")) as running:
        yield running


@pytest.fixture(scope="module")
def engines(stack: Stack) -> list[Engine]:
    # The default profile (8B on H100, ~7 ms a decode step): 24-token replies stay in flight long enough
    # for the routers' in-flight counts to differ within a burst.
    return [stack.start_engine(f"peer-engine-{i}", MODEL) for i in range(2)]


@pytest.fixture(params=list(PEERS))
def peer(request: pytest.FixtureRequest, stack: Stack, engines: list[Engine]) -> Iterator[str]:
    url = start_peer(stack, request.param, [e.url for e in engines], MODEL)
    yield url
    stop_peer(stack, url)


def test_completions_stream_and_chat_through_the_peer(peer: str) -> None:
    client = openai.OpenAI(base_url=f"{peer}/v1", api_key="unused", max_retries=0, timeout=30)

    raw = client.completions.with_raw_response.create(model=MODEL, prompt="hello world", max_tokens=5)
    completion = raw.parse()
    assert raw.headers["x-emulator-pod"].startswith("peer-engine-")
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5

    stream = client.completions.create(
        model=MODEL,
        prompt="hello again",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 3


def test_requests_reach_both_engines(peer: str, engines: list[Engine]) -> None:
    # Cache-aware peers send a request that matches no cached prefix to the worker with the fewest
    # requests in flight, so a burst of distinct prompts spreads; power_of_two picks at random here.
    async def burst() -> Counter[str]:
        client = openai.AsyncOpenAI(base_url=f"{peer}/v1", api_key="unused", max_retries=0, timeout=30)

        async def one(i: int) -> str:
            prompt = " ".join(f"topic{i}-{w}" for w in range(20))
            raw = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=24)
            return raw.headers["x-emulator-pod"]

        async with client:
            return Counter(await asyncio.gather(*(one(i) for i in range(16))))

    before = [served(e) for e in engines]
    pods = asyncio.run(burst())
    assert set(pods) == {e.name for e in engines}, pods
    after = [served(e) for e in engines]
    assert all(a > b for a, b in zip(after, before, strict=True))  # the engines' own count agrees


def served(engine: Engine) -> float:
    """Finished requests, from the engine's vLLM-style /metrics."""
    with urllib.request.urlopen(f"{engine.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


def test_sglang_power_of_two_reads_the_engines_load(stack: Stack, engines: list[Engine]) -> None:
    # An answer it cannot parse reads as load -1 for every engine, and the choice becomes random.
    url = start_peer(stack, "sglang-router:power_of_two", [e.url for e in engines], MODEL)
    try:
        with urllib.request.urlopen(f"{url}/get_loads", timeout=5) as response:  # polls the engines now
            loads = json.loads(response.read())["workers"]
    finally:
        stop_peer(stack, url)
    assert sorted(w["worker"] for w in loads) == sorted(e.url for e in engines)
    assert all(w["load"] >= 0 for w in loads), loads
