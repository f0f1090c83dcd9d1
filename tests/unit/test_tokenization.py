"""ModelTokenizer without vLLM: loading (folders, hf:// from a prepared HF cache), chat rendering as vLLM
renders, special tokens, and the piece cache. tests/real_vllm/test_tokenization.py proves the ids against
real vLLM; these pin the behaviours one by one."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants as hub_constants  # imported before any test changes the environment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gateway_plugins.tokenization import (
    ModelTokenizer,
    TemplateError,
    TokenizerLoadError,
    detect_content_format,
    resolve_source,
)
from gateway_plugins.tokenization.pieces import PieceCache

SPECIAL = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set offset = 1 -%}"
    "<|system|>\n{{ messages[0]['content'] | trim }}{{ '\\n' }}"
    "{%- else -%}{%- set offset = 0 -%}{%- endif -%}"
    "{%- if tools %}<|system|>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif -%}"
    "{%- for message in messages[offset:] -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{- raise_exception('Unknown role: ' + message['role']) -}}{%- endif -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' and not loop.last %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif -%}"
)
WORDS = ["the", "cache", "model", "token", "prefix", "route", "gateway", "hello", "world", "tell", "me", "a"]


def train_tokenizer() -> Tokenizer:
    """A small byte-level BPE with the chat markers as special tokens and BOS added to single texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_tokenizer().to_str()


def make_folder(
    root: Path,
    tokenizer_json: str,
    *,
    config: dict[str, Any] | None = None,
    template_file: str | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """A tokenizer folder as save_pretrained writes it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text(tokenizer_json)
    settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TEMPLATE}
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    (root / "tokenizer_config.json").write_text(json.dumps(settings | (config or {})))
    if template_file is not None:
        (root / "chat_template.jinja").write_text(template_file)
    for name, text in (extra or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def model(tmp_path: Path, tokenizer_json: str) -> ModelTokenizer:
    return ModelTokenizer.load(str(make_folder(tmp_path / "model", tokenizer_json)))


def with_template(tmp_path: Path, tokenizer_json: str, template: str, **config: Any) -> ModelTokenizer:
    return ModelTokenizer.load(
        str(make_folder(tmp_path / "t", tokenizer_json, config=config, template_file=template))
    )


USER = {"role": "user", "content": "hello world"}


# --- loading -------------------------------------------------------------------------------------------


def test_loads_a_folder(model: ModelTokenizer) -> None:
    assert model.generic and model.special_tokens == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    assert model.render_chat([USER]) == "<s><|user|>\nhello world\n<|assistant|>\n"


def test_chat_template_file_wins_over_the_config(tmp_path: Path, tokenizer_json: str) -> None:
    folder = make_folder(tmp_path / "m", tokenizer_json, template_file="FILE {{ messages[0].content }}")
    assert ModelTokenizer.load(str(folder)).render_chat([USER]) == "FILE hello world"


def test_named_templates_pick_tool_use_for_tools(tmp_path: Path, tokenizer_json: str) -> None:
    extra = {"additional_chat_templates/tool_use.jinja": "TOOLS {{ tools | length }}"}
    folder = make_folder(tmp_path / "m", tokenizer_json, template_file="PLAIN", extra=extra)
    model = ModelTokenizer.load(str(folder))
    assert model.render_chat([USER]) == "PLAIN"
    assert model.render_chat([USER], tools=[{"type": "function", "function": {"name": "f"}}]) == "TOOLS 1"


def test_templates_as_a_list_in_the_config(tmp_path: Path, tokenizer_json: str) -> None:
    templates = [{"name": "default", "template": "D"}, {"name": "rag", "template": "R"}]
    folder = make_folder(tmp_path / "m", tokenizer_json, config={"chat_template": templates})
    assert ModelTokenizer.load(str(folder)).render_chat([USER]) == "D"


def test_missing_tokenizer_json_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer\.json"):
        ModelTokenizer.load(str(tmp_path))


@pytest.mark.parametrize(
    "source", ["/no/such/folder", "hf://", "hf://a/b/c", "hf://org/repo@", "s3://bucket/x"]
)
def test_bad_sources_are_named(source: str) -> None:
    with pytest.raises(ValueError, match="tokenizer source") as raised:
        resolve_source(source)
    assert repr(source) in str(raised.value)


def test_a_file_is_not_a_source(tmp_path: Path, tokenizer_json: str) -> None:
    folder = make_folder(tmp_path / "m", tokenizer_json)
    with pytest.raises(TokenizerLoadError, match=r"the folder holding tokenizer\.json"):
        ModelTokenizer.load(str(folder / "tokenizer.json"))


def test_without_a_template_only_chat_fails(tmp_path: Path, tokenizer_json: str) -> None:
    folder = make_folder(tmp_path / "m", tokenizer_json, config={"chat_template": None})
    model = ModelTokenizer.load(str(folder))
    assert model.encode_text("hello")[0] == 0
    with pytest.raises(TemplateError, match="no chat template"):
        model.encode_chat([USER])


def test_a_template_that_does_not_compile_fails_each_chat(tmp_path: Path, tokenizer_json: str) -> None:
    model = with_template(tmp_path, tokenizer_json, "{% for m in messages %}")
    with pytest.raises(TemplateError, match="does not compile"):
        model.render_chat([USER])


def test_model_specific_classes_are_flagged(
    tmp_path: Path, tokenizer_json: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_folder(tmp_path / "m", tokenizer_json, config={"tokenizer_class": "Qwen2Tokenizer"})
    with caplog.at_level(logging.WARNING):
        model = ModelTokenizer.load(str(folder))
    assert not model.generic and "rebuilds class Qwen2Tokenizer" in caplog.text


# --- hf:// through the HF cache ------------------------------------------------------------------------


def hub_cache(root: Path, tokenizer_json: str, repo: str, revisions: dict[str, str]) -> Path:
    """A Hugging Face cache holding ``repo`` at each revision (name -> template), as downloads leave it."""
    storage = root / f"models--{repo.replace('/', '--')}"
    for index, (revision, template) in enumerate(revisions.items()):
        commit = f"{index + 1:040x}"
        make_folder(storage / "snapshots" / commit, tokenizer_json, template_file=template)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
    return root


def test_hf_sources_load_offline_from_the_cache(
    tmp_path: Path, tokenizer_json: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = hub_cache(tmp_path / "hub", tokenizer_json, "org/tiny", {"main": "MAIN", "v1": "V1"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ModelTokenizer.load("hf://org/tiny").render_chat([USER]) == "MAIN"
    assert ModelTokenizer.load("hf://org/tiny@v1").render_chat([USER]) == "V1"
    with pytest.raises(TokenizerLoadError, match=r"'hf://org/absent'.*HF_HUB_OFFLINE"):
        ModelTokenizer.load("hf://org/absent")
    with pytest.raises(TokenizerLoadError, match=r"hf://org/tiny@v2"):
        ModelTokenizer.load("hf://org/tiny@v2")


def test_hf_sources_ask_hf_endpoint_then_fall_back_to_the_cache(
    tmp_path: Path, tokenizer_json: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    class Failing(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cache = hub_cache(tmp_path / "hub", tokenizer_json, "org/tiny", {"main": "MAIN"})
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert ModelTokenizer.load("hf://org/tiny").render_chat([USER]) == "MAIN"
        assert any("/api/models/org/tiny" in path for path in asked)
    finally:
        server.shutdown()
        server.server_close()


# --- special tokens and encoding -----------------------------------------------------------------------


def test_completions_get_bos_and_chats_get_it_once(model: ModelTokenizer) -> None:
    assert model.encode_text("hello") == [0, *model.encode_text("hello", add_special_tokens=False)]
    ids = model.encode_chat([USER])
    assert ids[0] == 0 and ids[1] != 0 and ids.count(0) == 1
    assert model.encode_chat([USER], add_special_tokens=True)[:2] == [0, 0]  # what vLLM does if asked


def test_special_token_text_in_content_becomes_special_ids(model: ModelTokenizer) -> None:
    ids = model.encode_chat([{"role": "user", "content": "<|assistant|>"}])
    assert ids.count(SPECIAL.index("<|assistant|>")) == 2  # vLLM does not escape content


def test_special_tokens_missing_from_the_vocabulary_are_added(tmp_path: Path, tokenizer_json: str) -> None:
    config = {"eos_token": "<|eot|>", "image_token": "<img>", "extra_special_tokens": ["<x1>"]}
    model = ModelTokenizer.load(str(make_folder(tmp_path / "m", tokenizer_json, config=config)))
    for token in ("<|eot|>", "<img>", "<x1>"):
        assert len(model.encode_text(token, add_special_tokens=False)) == 1
    assert model.special_tokens["image_token"] == "<img>"  # model-specific tokens are template variables
    assert "<x1>" not in model.special_tokens.values()  # extra ones are not


def test_add_bos_token_is_ignored_when_tokenizer_json_exists(tmp_path: Path, tokenizer_json: str) -> None:
    config = {"add_bos_token": False, "add_eos_token": True}
    model = ModelTokenizer.load(str(make_folder(tmp_path / "m", tokenizer_json, config=config)))
    assert model.encode_text("hello")[0] == 0 and model.encode_text("hello")[-1] != 1


def test_split_special_tokens(tmp_path: Path, tokenizer_json: str) -> None:
    folder = make_folder(tmp_path / "m", tokenizer_json, config={"split_special_tokens": True})
    model = ModelTokenizer.load(str(folder))
    assert 0 not in model.encode_text("<s>", add_special_tokens=False)
    assert model.pieces is None


def test_legacy_special_tokens_map_only_without_added_tokens_decoder(
    tmp_path: Path, tokenizer_json: str
) -> None:
    legacy_map = {"eos_token": "<|end|>", "image_token": {"content": "<img>", "lstrip": False}}
    extra = {"special_tokens_map.json": json.dumps(legacy_map)}
    legacy = ModelTokenizer.load(str(make_folder(tmp_path / "a", tokenizer_json, extra=extra)))
    assert legacy.special_tokens["eos_token"] == "<|end|>" and legacy.special_tokens["image_token"] == "<img>"
    assert len(legacy.encode_text("<img>", add_special_tokens=False)) == 1
    decoder = {
        "0": {"content": "<s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False}
    }
    modern = make_folder(
        tmp_path / "b", tokenizer_json, config={"added_tokens_decoder": decoder}, extra=extra
    )
    assert ModelTokenizer.load(str(modern)).special_tokens["eos_token"] == "</s>"


# --- rendering -----------------------------------------------------------------------------------------


def test_generation_prompt_and_system_message(model: ModelTokenizer) -> None:
    messages = [{"role": "system", "content": "  be brief \n"}, USER, {"role": "assistant", "content": "hi"}]
    assert model.render_chat(messages, add_generation_prompt=False) == (
        "<s><|system|>\nbe brief\n<|user|>\nhello world\n<|assistant|>\nhi\n"
    )
    assert model.render_chat(messages[:2]).endswith("<|assistant|>\n")


def test_text_parts_are_joined_for_string_templates(model: ModelTokenizer) -> None:
    parts = [
        "a",
        {"type": "text", "text": "b"},
        {"type": "text", "text": ""},
        {"type": "input_text", "text": "c"},
    ]
    parts += [{"type": "text", "text": None}, {"type": "refusal", "refusal": "d"}]
    assert "<|user|>\na\nb\nc\nd\n" in model.render_chat([{"role": "user", "content": parts}])


def test_openai_templates_get_part_lists(tmp_path: Path, tokenizer_json: str) -> None:
    template = "{% for m in messages %}{% for p in m.content %}{{ p | tojson }};{% endfor %}{% endfor %}"
    model = with_template(tmp_path, tokenizer_json, template)
    parts = ["a", {"type": "input_text", "text": "b", "cache_control": {"type": "ephemeral"}}]
    assert model.render_chat([{"role": "user", "content": parts}]) == (
        '{"type": "text", "text": "a"};{"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}};'
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ messages[0].content }}", "string"),
        ("{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
        ("{% for m in messages %}{% for p in m.content | list %}{% endfor %}{% endfor %}", "openai"),
        (
            "{% set ms = messages[1:] %}{% for m in ms %}{% for p in m.content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        (
            "{% macro show(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}"
            "{% for m in messages %}{{ show(m.content) }}{% endfor %}",
            "openai",
        ),
        (
            "{% for m in messages %}{% set content = m.content %}"
            "{% for p in content %}{% endfor %}{% endfor %}",
            "openai",
        ),
        # vLLM's quirks: a conditional alias is not followed, a tuple loop target stops the detection.
        (
            "{% set ms = messages if x else [] %}"
            "{% for m in ms %}{% for p in m.content %}{% endfor %}{% endfor %}",
            "string",
        ),
        (
            "{% for a, b in messages|batch(2) %}{% endfor %}"
            "{% for m in messages %}{% for p in m.content %}{% endfor %}{% endfor %}",
            "string",
        ),
        ("{% for m in messages %", "string"),
    ],
)
def test_content_format_detection(template: str, expected: str) -> None:
    assert detect_content_format(template) == expected


def test_tools_are_dumped_as_vllm_does_and_rendered_with_tojson(model: ModelTokenizer) -> None:
    tools = [
        {"type": "function", "extra": 1, "function": {"name": "f", "parameters": {"q": "<é>"}, "x": 2}},
        {"type": "function", "defer_loading": True, "function": {"name": "g", "strict": True}},
    ]
    rendered = model.render_chat([USER], tools=tools)
    assert (
        '{"type": "function", "function": {"name": "f", "description": null, "parameters": {"q": "<é>"}}}'
        in rendered
    )
    assert (
        '{"type": "function", "function": {"name": "g", "description": null, "parameters": null, '
        '"strict": true, "defer_loading": true}, "defer_loading": true}'
    ) in rendered


def test_raise_exception_is_a_template_error(model: ModelTokenizer) -> None:
    with pytest.raises(TemplateError, match=r"^Unknown role: narrator$"):
        model.encode_chat([USER, {"role": "narrator", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty conversation"),
        ([{"content": "no role"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text only"),
        ([{"role": "user", "content": [{"image_url": "x"}]}], "text only"),
        ([{"role": "user", "content": [{"type": "hologram"}]}], "Unsupported"),
        ([{"role": "user", "content": [{"text": "x"}]}], "Missing 'type'"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"type": "web"}]}], "type 'function'"),
    ],
)
def test_messages_vllm_refuses(model: ModelTokenizer, messages: list[Any], match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        model.encode_chat(messages)


def test_other_template_failures_are_template_errors(tmp_path: Path, tokenizer_json: str) -> None:
    model = with_template(tmp_path, tokenizer_json, "{{ messages[0].content + 1 }}")
    with pytest.raises(TemplateError):
        model.render_chat([USER])
    sandboxed = with_template(tmp_path / "2", tokenizer_json, "{{ messages.append(1) }}")
    with pytest.raises(TemplateError):
        sandboxed.render_chat([USER])


def test_chat_template_kwargs(tmp_path: Path, tokenizer_json: str) -> None:
    template = "{{ bos_token }}{{ persona | default('none') }}|{{ enable_thinking }}|{{ reasoning_effort }}"
    model = with_template(tmp_path, tokenizer_json, template)
    assert model.render_chat([USER]) == "<s>none||"
    assert model.render_chat([USER], chat_template_kwargs={"persona": "pirate", "unused": 1}) == "<s>pirate||"
    assert model.render_chat([USER], chat_template_kwargs={"persona": None, "bos_token": ""}) == "none||"
    assert model.render_chat([USER], reasoning_effort="none") == "<s>none|False|none"
    assert model.render_chat([USER], reasoning_effort="high") == "<s>none|True|high"
    with pytest.raises(TemplateError, match="refused"):
        model.render_chat([USER], chat_template_kwargs={"chat_template": "{{ 1 }}"})


def test_documents_and_globals(tmp_path: Path, tokenizer_json: str) -> None:
    template = (
        "{% for d in documents %}{{ d.title }};{% endfor %}{{ strftime_now('%Y') }}"
        "{% generation %}[{{ '<&>' | tojson }}]{% endgeneration %}{% for i in range(5) %}{% if i > 1 %}"
        "{% break %}{% endif %}{{ i }}{% endfor %}"
    )
    model = with_template(tmp_path, tokenizer_json, template)
    year = str(datetime.datetime.now().year)
    assert model.render_chat([USER], documents=[{"title": "a"}, {"title": "b"}]) == f'a;b;{year}["<&>"]01'
    with pytest.raises(TemplateError, match="Documents"):
        model.render_chat([USER], documents=["not a dict"])


def test_continue_final_message(model: ModelTokenizer) -> None:
    messages = [USER, {"role": "assistant", "content": "The answer is "}]
    text = model.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == "<s><|user|>\nhello world\n<|assistant|>\nThe answer is "
    with pytest.raises(TemplateError, match="not compatible"):
        model.render_chat(messages, add_generation_prompt=True, continue_final_message=True)


def test_developer_messages_become_system_for_templates_without_the_role(
    tmp_path: Path, tokenizer_json: str
) -> None:
    template = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"
    plain = with_template(tmp_path, tokenizer_json, template)
    messages = [{"role": "system", "content": "s"}, USER, {"role": "developer", "content": "d", "tools": []}]
    assert plain.render_chat(messages) == "system=s\n\nd;user=hello world;"
    aware = with_template(tmp_path / "2", tokenizer_json, template + "{# 'developer' #}")
    assert aware.render_chat(messages) == "system=s;user=hello world;developer=d;"


def test_message_fields_as_vllm_passes_them(tmp_path: Path, tokenizer_json: str) -> None:
    model = with_template(tmp_path, tokenizer_json, "{{ messages | tojson }}")
    calls = [
        {"type": "function", "function": {"name": "f", "arguments": '{"b": 1, "a": 2}'}, "id": "c1"},
        {"id": "c2", "type": "function", "function": {"arguments": "{oops", "name": "g"}},
    ]
    messages = [
        {"role": "system", "content": "x-anthropic-billing-header: cch=9\nreal", "extra": 1},
        {"role": "assistant", "content": None, "tool_calls": calls, "reasoning": "r", "name": "bot"},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done", "tool_calls": []},
    ]
    assert json.loads(model.render_chat(messages)) == [
        {"role": "system", "content": "real"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "function": {"arguments": {"b": 1, "a": 2}, "name": "f"}, "type": "function"},
                {"id": "c2", "function": {"arguments": {}, "name": "g"}, "type": "function"},
            ],
            "reasoning": "r",
            "reasoning_content": "r",
            "name": "bot",
        },
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
        {"role": "assistant", "content": "done"},
    ]
    assert list(json.loads(model.render_chat(messages))[1]["tool_calls"][0]) == ["id", "function", "type"]


# --- the piece cache -----------------------------------------------------------------------------------


def test_piecewise_ids_equal_whole_text_ids(model: ModelTokenizer) -> None:
    assert model.pieces is not None
    texts = [
        "<s><|user|>\nhello world<|assistant|> tell me</s>",
        "  <s>  <s><s>x<|user|",
        "<|system|>\n\n日本 🙂 e\u0301\n<|user|>",
        "no special tokens at all",
    ]
    for text in texts:
        assert model.pieces.encode(text) == model.tokenizer.encode(text, add_special_tokens=False).ids


def test_a_conversation_reuses_its_earlier_pieces(model: ModelTokenizer) -> None:
    assert model.pieces is not None
    turn = [USER, {"role": "assistant", "content": "a long answer about the cache"}]
    model.encode_chat(turn)
    hits, misses = model.pieces.hits, model.pieces.misses
    conversation = [*turn, {"role": "user", "content": "and the route?"}]
    ids = model.encode_chat(conversation)
    # The user message and the glue between special tokens come from the cache; the new user message and the
    # assistant's (followed by EOS now that it is not last) are tokenized.
    assert model.pieces.hits >= hits + 2 and model.pieces.misses == misses + 2
    assert ids == model.tokenizer.encode(model.render_chat(conversation), add_special_tokens=False).ids


def test_the_piece_cache_is_bounded(tmp_path: Path, tokenizer_json: str) -> None:
    model = ModelTokenizer.load(str(make_folder(tmp_path / "m", tokenizer_json)), cache_tokens=40)
    assert model.pieces is not None
    for i in range(30):
        model.encode_chat([{"role": "user", "content": f"tell me about the model {i}"}])
    assert model.pieces.tokens <= 40


def test_cache_off(tmp_path: Path, tokenizer_json: str) -> None:
    model = ModelTokenizer.load(str(make_folder(tmp_path / "m", tokenizer_json)), cache_tokens=0)
    assert model.pieces is None and model.encode_chat([USER])[0] == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("lstrip", "strips whitespace"),
        ("metaspace", "first piece"),
        ("normalized", "normalized text"),
    ],
)
def test_tokenizers_the_piece_cache_refuses(change: str, reason: str) -> None:
    tokenizer = train_tokenizer()
    spec: dict[str, Any] = {}
    if change == "lstrip":
        tokenizer.add_special_tokens([AddedToken("<|x|>", lstrip=True)])
    elif change == "metaspace":
        spec = {
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [{"type": "Metaspace", "prepend_scheme": "first"}],
            }
        }
    else:
        tokenizer.add_tokens([AddedToken("<y>", normalized=True)])
        spec = {"normalizer": {"type": "NFC"}}
    assert reason in (PieceCache.unsupported(tokenizer, spec) or "")
