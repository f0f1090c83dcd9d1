"""The exact prefix index end to end with emulated engines: their KV-cache events over ZMQ (in vLLM's
encoding) feed the gateway through its subscriptions, behind a real Envoy; the gateway's prediction of
each request's cached tokens meets what the engine reports, for token-id prompts (no tokenizer involved)
and for chats (the emulated model's tokenizer and chat template, loaded from the files it writes).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import yaml

from brickyard.stack import Stack
from emulator import tokens
from emulator.tokens import write_tokenizer
from gateway_plugins.extproc.contracts import PREDICTED_CACHED_HEADER, PREFIX_INDEX_HEADER

MODEL = "emulated-model"
BLOCKS = 48  # of 16 tokens per engine: a working set several times larger is evicted and re-stored


@dataclass
class Fleet:
    base_url: str
    metrics_url: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with Stack(tmp_path_factory.mktemp("exact-emulated")) as stack:
        engines = [
            stack.start_engine(
                name, MODEL, None, "--num-blocks", str(BLOCKS), "--max-model-len", "512", kv_events=True
            )
            for name in ("emu-a", "emu-b")
        ]
        endpoints = stack.write_endpoints(engines, MODEL, stack.workdir / "endpoints.yaml")
        settings = stack.workdir / "gateway.yaml"
        settings.write_text(
            yaml.safe_dump(
                {
                    "default_strategy": "prefix-cache",
                    "observe_response_status": True,
                    "kv_events": {"enabled": True},
                    # The emulated model's own tokenizer, loaded as a real model's would be.
                    "models": {MODEL: {"tokenizer": str(write_tokenizer(stack.workdir / "model"))}},
                }
            )
        )
        gateway = stack.start_gateway("aibrix", endpoints, "--config", str(settings), log_level="warning")
        port, _ = stack.start_envoy("aibrix", gateway.grpc, engines)
        yield Fleet(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gateway.metrics}/metrics")


def metrics(fleet: Fleet) -> dict[str, float]:
    values = {}
    for line in httpx.get(fleet.metrics_url).text.splitlines():
        if line.startswith("brickyard_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def prefixed(count: int, seed: int) -> Iterator[tuple[list[int], list[int]]]:
    """(shared prefix, own tail) token ids: 12 prefixes of 3-8 blocks (Zipf 1.1), tails of 3-40 tokens."""
    rng = random.Random(seed)
    draw = np.random.default_rng(seed)
    vocabulary = tokens.vocabulary()
    prefixes = [vocabulary.segment(draw, 16 * rng.randint(3, 8)) for _ in range(12)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(prefixes))]
    for _ in range(count):
        yield rng.choices(prefixes, weights)[0], vocabulary.segment(draw, rng.randint(3, 40))


def prompts(count: int, seed: int = 3) -> Iterator[list[int]]:
    """Token-id completions prompts."""
    for prefix, tail in prefixed(count, seed):
        yield prefix + tail


def chats(count: int, seed: int = 4) -> Iterator[list[dict[str, str]]]:
    """Chats: the shared prefix as the system prompt (text of vocabulary words), the tail as the question."""
    vocabulary = tokens.vocabulary()
    for prefix, tail in prefixed(count, seed):
        yield [
            {"role": "system", "content": vocabulary.text(prefix)},
            {"role": "user", "content": "Why?" + vocabulary.text(tail)},
        ]


@pytest.mark.parametrize("kind", ["token ids", "chat"])
def test_predictions_meet_the_engines_cached_tokens(fleet: Fleet, kind: str) -> None:
    outcomes = []
    if kind == "chat":
        bodies = [("/v1/chat/completions", {"messages": chat}) for chat in chats(150)]
    else:
        bodies = [("/v1/completions", {"prompt": prompt}) for prompt in prompts(150)]
    before = metrics(fleet).get('brickyard_prefix_decisions_total{index="exact"}', 0)
    with httpx.Client(timeout=30) as client:
        for path, fields in bodies:
            response = client.post(
                f"{fleet.base_url}{path}", json={"model": MODEL, "max_tokens": 2, **fields}
            )
            assert response.status_code == 200, response.text
            outcomes.append(
                (
                    response.headers[PREFIX_INDEX_HEADER],
                    int(response.headers[PREDICTED_CACHED_HEADER]),
                    response.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
                )
            )
    by_index = Counter(index for index, _, _ in outcomes)
    agree = sum(predicted == cached for _, predicted, cached in outcomes)
    hits = sum(cached for _, _, cached in outcomes)
    print(f"exact agreement {agree}/{len(outcomes)}, hit tokens {hits}")
    report = f"agree {agree}/{len(outcomes)}, indexes {dict(by_index)}, disagreements " + str(
        [o for o in outcomes if o[1] != o[2]][:10]
    )
    assert by_index["exact"] >= len(outcomes) - 2, report  # each engine's first request precedes its events
    assert agree >= 0.99 * len(outcomes), report
    assert hits > 0, report
    seen = metrics(fleet)
    assert seen['brickyard_prefix_decisions_total{index="exact"}'] - before == by_index["exact"]
    assert seen['brickyard_kv_index_pods{state="live"}'] == 2
    assert seen["brickyard_kv_event_gaps_total"] == 0
    assert seen["brickyard_kv_event_blocks_removed_total"] > 0  # under eviction pressure


TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A gateway that knows the model's tokenizer and tokenizes every prompt in a worker thread."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {
        "[UNK]": 0,
        **{word: i + 1 for i, word in enumerate(["system", "user", "assistant", ":", "hello"])},
    }
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE, "unk_token": "[UNK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with Stack(tmp_path_factory.mktemp("threaded")) as stack:
        engine = stack.start_engine("emu-t", MODEL, None, "--profile", "instant")
        endpoints = stack.write_endpoints([engine], MODEL, stack.workdir / "endpoints.yaml")
        settings = stack.workdir / "gateway.yaml"
        settings.write_text(
            yaml.safe_dump(
                {
                    "default_strategy": "prefix-cache",
                    "observe_response_status": True,
                    "tokenize_in_thread_bytes": 0,
                    "models": {MODEL: {"tokenizer": str(folder)}},
                }
            )
        )
        gateway = stack.start_gateway("aibrix", endpoints, "--config", str(settings), log_level="warning")
        port, _ = stack.start_envoy("aibrix", gateway.grpc, [engine])
        yield Fleet(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gateway.metrics}/metrics")


def test_prompts_tokenized_in_a_thread_route_and_refusals_are_400(threaded: Fleet) -> None:
    chat = [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello hello"}]
    ok = httpx.post(f"{threaded.base_url}/v1/chat/completions", json={"model": MODEL, "messages": chat})
    assert ok.status_code == 200, ok.text
    assert ok.headers[PREFIX_INDEX_HEADER] == "approximate"  # token blocks, but no engine events
    refused = httpx.post(
        f"{threaded.base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
    )
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "messages")
    assert "roles are system, user and assistant" in error["message"]
    seen = metrics(threaded)
    assert seen['brickyard_model_tokenizer{model="emulated-model"}'] == 1
    assert seen[f'brickyard_pod_inflight_requests{{model="{MODEL}",namespace="default",pod="emu-t"}}'] == 0
