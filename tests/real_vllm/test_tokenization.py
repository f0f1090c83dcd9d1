"""The gateway's token ids are real vLLM's, request for request (issue 14, part 2).

``ModelTokenizer``, loading the tiny model's tokenizer folder as the gateway will, must give exactly the ids
vLLM's ``POST /tokenize`` returns for every request of ``bench/real_vllm/corpus.py`` (240 chats and
completions: system prompts or none, multi-turn with tool calls, content-part lists, developer messages,
scripts, marks and odd whitespace, text that looks like special tokens, prompts near the 512-token
context), and the ``usage.prompt_tokens`` of a one-token generation for a sample of them; chats the
template refuses must be refused by both. Offline, in the vLLM environment, vLLM's own code is the
reference for what one served model cannot show: other template shapes (content-part loops, macros,
aliases, the developer role, chat_template_kwargs, documents, tool calls as JSON, the content-format
detection's quirks) and tokenizer configs (special tokens missing from the vocabulary, added-token flags,
split_special_tokens, add_bos_token, the legacy special_tokens_map.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.real_vllm.corpus import MAX_MODEL_LEN, CorpusRequest, invalid_chats, tokenization_corpus
from gateway_plugins.tokenization import ModelTokenizer, TemplateError

from .conftest import MODEL, RealFleet, build_tiny_model, vllm_python

USAGE_SAMPLE_EVERY = 9  # about 27 of 240 requests also run as max_tokens=1 generations


def ours(tokenizer: ModelTokenizer, request: CorpusRequest) -> list[int]:
    """The gateway's ids for a corpus request (its body is a /tokenize body)."""
    body = request.body
    if request.kind == "completion":
        return tokenizer.encode_text(body["prompt"])
    return tokenizer.encode_chat(
        body["messages"],
        tools=body.get("tools"),
        add_generation_prompt=body.get("add_generation_prompt", True),
        continue_final_message=body.get("continue_final_message", False),
        chat_template_kwargs=body.get("chat_template_kwargs"),
    )


def describe(request: CorpusRequest, expected: list[int], got: list[int]) -> str:
    first = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    where = f"first difference at {first}" if first is not None else f"lengths {len(expected)} vs {len(got)}"
    return f"{request.name}: {where}\n  {shown(request)}"


def shown(request: CorpusRequest) -> str:
    return f"request: {json.dumps(request.body, ensure_ascii=False)[:600]}"


@pytest.fixture(scope="module")
def tokenizer(fleet: RealFleet) -> ModelTokenizer:
    return ModelTokenizer.load(str(fleet.model.path))


def test_corpus_token_ids_equal_vllm(fleet: RealFleet, tokenizer: ModelTokenizer) -> None:
    corpus = tokenization_corpus()
    assert len(corpus) >= 200 and {r.kind for r in corpus} == {"chat", "completion"}
    assert tokenizer.generic and tokenizer.pieces is not None  # the cached piecewise path is the one proven
    mismatches, counts = [], {}
    with httpx.Client(base_url=fleet.engines[0].url, timeout=60) as client:
        for request in corpus:
            response = client.post("/tokenize", json=request.tokenize_body(MODEL))
            assert response.status_code == 200, f"{request.name}: vLLM refused it: {response.text[:300]}"
            expected = response.json()["tokens"]
            counts[request.name] = len(expected)
            got = ours(tokenizer, request)
            if got != expected:
                mismatches.append(describe(request, expected, got))
            # The same request again comes from cached pieces: still the same ids.
            if request.kind == "chat" and ours(tokenizer, request) != expected:
                mismatches.append(f"{request.name}: differs when served from the piece cache")
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} requests differ:\n" + "\n".join(mismatches)
    assert max(counts.values()) < MAX_MODEL_LEN <= max(counts.values()) + 16, "no prompt near the context"
    assert tokenizer.pieces.hits > 0


def test_usage_prompt_tokens_equal_ours(fleet: RealFleet, tokenizer: ModelTokenizer) -> None:
    corpus = tokenization_corpus()
    sample = corpus[::USAGE_SAMPLE_EVERY] + [r for r in corpus if r.name.endswith(("long-500", "long-505"))]
    assert len(sample) >= 20
    engine = fleet.engines[1]
    wrong = []
    with httpx.Client(base_url=engine.url, timeout=120) as client:
        for request in sample:
            path, body = request.generation_body(MODEL)
            response = client.post(path, json=body)
            assert response.status_code == 200, f"{request.name}: {response.text[:300]}"
            reported = response.json()["usage"]["prompt_tokens"]
            if reported != len(ids := ours(tokenizer, request)):
                wrong.append(f"{request.name}: engine {reported}, gateway {len(ids)}\n  {shown(request)}")
    assert not wrong, "\n".join(wrong)


def test_refused_chats_are_refused_by_both(fleet: RealFleet, tokenizer: ModelTokenizer) -> None:
    """The template's raise_exception (or an empty conversation): a 400 from vLLM, a TemplateError here."""
    with httpx.Client(base_url=fleet.engines[0].url, timeout=60) as client:
        for request in invalid_chats():
            response = client.post("/tokenize", json=request.tokenize_body(MODEL))
            assert response.status_code == 400, f"{request.name}: vLLM said {response.status_code}"
            with pytest.raises(TemplateError):
                ours(tokenizer, request)


# --- other template shapes, against vLLM's rendering code run offline ----------------------------------

#: Renders chat requests with vLLM's own code in the vLLM environment: one JSON job per stdin line
#: ({"template", "body"}: a /tokenize chat body), one result per stdout line. It follows /tokenize for a
#: text-only model: the request model, the chat-parameter merge, parse_chat_messages,
#: safe_apply_chat_template, then the tokenizer.
HARNESS = r"""
import json, sys
from vllm.config import ModelConfig
from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest
from vllm.renderers import merge_kwargs
from vllm.renderers.chat_utils import parse_chat_messages
from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template
from vllm.tokenizers import get_tokenizer

path = sys.argv[1]
config = ModelConfig(model=path, tokenizer=path)
tokenizer = get_tokenizer(path)
for line in sys.stdin:
    job = json.loads(line)
    try:
        request = TokenizeChatRequest(model="m", **job["body"])
        tools = None if request.tools is None else [t.model_dump() for t in request.tools]
        defaults = merge_kwargs({}, dict(tools=tools, tokenize=False))
        params = request.build_chat_params(job["template"], "auto").with_defaults(defaults)
        tools = params.chat_template_kwargs.get("tools")
        content_format = resolve_chat_template_content_format(
            params.chat_template, tools, "auto", tokenizer, model_config=config
        )
        conversation, _, _ = parse_chat_messages(request.messages, config, content_format)
        kwargs = params.get_apply_chat_template_kwargs()
        text = safe_apply_chat_template(config, tokenizer, conversation, **kwargs)
        ids = tokenizer(text, add_special_tokens=request.add_special_tokens)["input_ids"]
        print(json.dumps({"format": content_format, "text": text, "ids": ids}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""

#: Template shapes of real models, written for this test: (name, source, content format vLLM detects).
TEMPLATES = {
    "parts-loop": (
        "{{- bos_token -}}{%- for message in messages -%}<|{{ message.role }}|>\n"
        "{% if message.content is string %}{{ message.content }}{% else %}"
        "{%- for part in message.content -%}"
        "{%- if part.type == 'text' %}{{ part.text }}{% elif part.type == 'tool_reference' %}"
        "[tool {{ part.name }}]{% endif -%}{%- if not loop.last %} | {% endif -%}"
        "{%- endfor -%}{% endif %}\n\n{% endfor -%}"
        "{%- if add_generation_prompt %}<|assistant|>\n{% endif -%}",
        "openai",
    ),
    "macro-content": (
        "{%- macro show(body) -%}{%- if body is string -%}{{ body }}{%- else -%}"
        "{%- for item in body -%}{{ item['text'] }}{{ '/' if item.cache_control is defined }}{%- endfor -%}"
        "{%- endif -%}{%- endmacro -%}"
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ show(m['content']) }}</s>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "openai",
    ),
    "sliced-alias": (  # `set` chains from `messages` are followed, through filters and slices
        "{%- set offset = 1 if messages[0].role == 'system' else 0 -%}"
        "{%- set chat = messages | list -%}{%- set rest = chat[offset:] -%}"
        "{%- if offset %}<|system|>\n{{ messages[0].content | string }}\n{% endif -%}"
        "{%- for turn in rest -%}<|{{ turn.role }}|>\n"
        "{%- if turn.content is string %}{{ turn.content }}{% else %}"
        "{% for chunk in turn.content %}{{ chunk.text }}{% endfor %}{% endif %}\n{%- endfor -%}"
        "{%- if add_generation_prompt %}<|assistant|>\n{%- endif %}",
        "openai",
    ),
    "conditional-alias-quirk": (  # ...but not through a conditional expression: vLLM sees "string"
        "{%- set rest = messages[1:] if messages[0].role == 'system' else messages -%}"
        "{%- for turn in rest -%}<|{{ turn.role }}|>\n"
        "{%- if turn.content is string %}{{ turn.content }}{% else %}"
        "{% for chunk in turn.content %}{{ chunk.text }}{% endfor %}{% endif %}\n{%- endfor -%}",
        "string",
    ),
    "developer-aware": (
        "{% for m in messages %}{% if m.role == 'developer' %}[developer] {% endif %}"
        "<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "string",
    ),
    "kwargs-and-extras": (
        "{{ bos_token }}{% if persona is defined %}[persona: {{ persona }}]\n{% endif %}"
        "{% if enable_thinking %}[thinking on]\n{% endif %}"
        "{% if documents %}{% for d in documents %}<doc title={{ d.title | tojson }}>{{ d.text }}</doc>\n"
        "{% endfor %}{% endif %}"
        "{% if tools %}{{ tools | tojson(indent=2) }}\n{% endif %}"
        "{% for m in messages %}{% if loop.index > 12 %}{% break %}{% endif %}"
        "{% if m.role == 'tool' %}<result id={{ m.tool_call_id | tojson }}>{{ m.content }}</result>\n"
        "{% continue %}{% endif %}"
        "<|{{ m.role }}|>\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}"
        "{% for call in m.tool_calls or [] %}\n{{ call | tojson }}{% endfor %}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        "string",
    ),
    "tuple-target-quirk": (  # vLLM's detection asserts on the tuple target and falls back to "string"
        "{% for first, second in messages | batch(2) %}{% endfor %}"
        "{% for m in messages %}<|{{ m.role }}|>{% for c in m.content %}{{ c }}.{% endfor %}\n{% endfor %}",
        "string",
    ),
}


def cross_check_requests() -> Iterator[dict[str, Any]]:
    """Chat bodies for the other templates: a slice of the corpus and requests aimed at their features."""
    for request in tokenization_corpus()[:80]:
        if request.kind == "chat":
            yield request.body
    text_parts = [{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}, "two"]
    yield {"messages": [{"role": "user", "content": text_parts}]}
    yield {"messages": [{"role": "user", "content": [{"type": "tool_reference", "name": "search"}, "x"]}]}
    yield {
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"persona": "pirate", "enable_thinking": True, "unused": "x"},
    }
    yield {
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"bos_token": "", "persona": None},
    }
    documents = [{"title": 'A "quoted" title', "text": "body <b>"}, {"title": "日本", "text": "二"}]
    yield {
        "messages": [{"role": "user", "content": "cite"}],
        "chat_template_kwargs": {"documents": documents},
    }
    yield {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning": "because"},
            {"role": "user", "content": [{"type": "text", "text": "r"}]},
        ]
    }
    yield {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be terse"}]},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "u"},
        ]
    }
    yield {
        "messages": [
            {"role": "user", "content": "go on"},
            {"role": "assistant", "content": [{"type": "text", "text": "Once"}]},
        ],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    yield {
        "messages": [
            {"role": "user", "content": "weather"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "w", "arguments": '{"b": 1, "a": "é"}'},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "c1",
                "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": "22C"}],
            },
        ],
        "tools": [
            {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}, "strict": False}}
        ],
    }


def test_other_template_shapes_render_as_vllm_renders_them(tmp_path: Path) -> None:
    python = vllm_python()
    model = build_tiny_model(python)
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    jobs = [(name, body) for name in TEMPLATES for body in cross_check_requests()]
    lines = "".join(json.dumps({"template": TEMPLATES[name][0], "body": body}) + "\n" for name, body in jobs)
    done = subprocess.run(
        [python, str(script), str(model.path)],
        check=False,
        input=lines,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(jobs), done.stderr[-3000:]

    tokenizers: dict[str, ModelTokenizer] = {}
    for name, (source, _) in TEMPLATES.items():
        folder = tmp_path / name
        shutil.copytree(model.path, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        (folder / "chat_template.jinja").write_text(source)
        tokenizers[name] = ModelTokenizer.load(str(folder))
    mismatches = []
    for (name, body), expected in zip(jobs, results, strict=True):
        tokenizer = tokenizers[name]
        assert (
            tokenizer.template().content_format
            == TEMPLATES[name][1]
            == expected.get("format", TEMPLATES[name][1])
        )
        request = CorpusRequest(name, "chat", body)
        try:
            got: Any = {
                "text": tokenizer.render_chat(body["messages"], **_options(body)),
                "ids": ours(tokenizer, request),
            }
        except TemplateError as exc:
            got = {"error": str(exc)}
        if ("error" in expected) != ("error" in got) or (
            "error" not in got and (got["text"], got["ids"]) != (expected["text"], expected["ids"])
        ):
            mismatches.append(
                f"{name}: vLLM {str(expected)[:300]}\n  gateway {str(got)[:300]}\n  request {body}"
            )
    assert not mismatches, f"{len(mismatches)} of {len(jobs)} differ:\n" + "\n".join(mismatches[:10])


#: Loads tokenizer folders with vLLM's own loader (transformers' AutoTokenizer, as the engine does) and
#: prints each one's special-token map and the ids of the given texts, with and without special tokens.
LOAD_HARNESS = r"""
import json, sys
from vllm.tokenizers import get_tokenizer
job = json.load(sys.stdin)
out = {}
for folder in job["folders"]:
    tok = get_tokenizer(folder)
    out[folder] = {
        "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
        "with": [tok(t, add_special_tokens=True)["input_ids"] for t in job["texts"]],
        "without": [tok(t, add_special_tokens=False)["input_ids"] for t in job["texts"]],
    }
print(json.dumps(out))
"""

#: tokenizer_config.json variants (over the tiny model's tokenizer.json) and other files: what transformers
#: adds, keeps or ignores when it loads a tokenizer.
TOKENIZER_VARIANTS: dict[str, dict[str, Any]] = {
    "as-built": {},
    "missing-specials": {
        "config": {"eos_token": "<|eot|>", "image_token": "<img>", "extra_special_tokens": ["<x1>", "<x2>"]}
    },
    "added-token-flags": {
        "config": {
            "added_tokens_decoder": {
                "2000": {
                    "content": "<|tool|>",
                    "lstrip": True,
                    "rstrip": False,
                    "normalized": False,
                    "special": False,
                },
                "2001": {
                    "content": "<sep>",
                    "lstrip": False,
                    "rstrip": True,
                    "normalized": False,
                    "special": True,
                },
            },
            "sep_token": "<sep>",
        }
    },
    "split-special-tokens": {"config": {"split_special_tokens": True}},
    "add-bos-token-ignored": {"config": {"add_bos_token": False, "add_eos_token": True}},
    "legacy-map": {
        "config": {"eos_token": None},
        "special_tokens_map": {"eos_token": {"content": "<|end|>", "lstrip": False}, "mask_token": "<mask>"},
    },
}
PROBES = [
    "hello world",
    "a <|tool|> b <img><x1><x2> <|eot|> <s></s><sep> c <|end|><mask>",
    " <|user|>\n日本 🙂 <|assistant|>  ",
    "",
]


def test_tokenizer_loading_follows_transformers(tmp_path: Path) -> None:
    python = vllm_python()
    model = build_tiny_model(python)
    folders = {}
    for name, variant in TOKENIZER_VARIANTS.items():
        folder = folders[name] = tmp_path / name
        shutil.copytree(
            model.path, folder, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja")
        )
        config = json.loads((folder / "tokenizer_config.json").read_text()) | variant.get("config", {})
        (folder / "tokenizer_config.json").write_text(
            json.dumps({k: v for k, v in config.items() if v is not None})
        )
        if "special_tokens_map" in variant:
            (folder / "special_tokens_map.json").write_text(json.dumps(variant["special_tokens_map"]))
    script = tmp_path / "load_harness.py"
    script.write_text(LOAD_HARNESS)
    done = subprocess.run(
        [python, str(script)],
        check=False,
        input=json.dumps({"folders": [str(f) for f in folders.values()], "texts": PROBES}),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads(done.stdout.splitlines()[-1])
    for name, folder in folders.items():
        tokenizer = ModelTokenizer.load(str(folder))
        want = expected[str(folder)]
        assert tokenizer.special_tokens == want["special"], name
        assert [tokenizer.encode_text(t) for t in PROBES] == want["with"], name
        assert [tokenizer.encode_text(t, add_special_tokens=False) for t in PROBES] == want["without"], name
        if tokenizer.pieces is not None:
            assert [tokenizer.pieces.encode(t) for t in PROBES] == want["without"], name


def _options(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "tools": body.get("tools"),
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
        "chat_template_kwargs": body.get("chat_template_kwargs"),
    }
