import orjson
import pytest

from gateway_plugins.errors import GatewayError
from gateway_plugins.request_parsing import parse_body
from gateway_plugins.routing.types import Endpoint, PromptKind


def body(**fields: object) -> bytes:
    return orjson.dumps(fields)


def test_chat_request_fields() -> None:
    request = parse_body(
        Endpoint.CHAT,
        body(
            model="m",
            stream=True,
            stream_options={"include_usage": True},
            user="u1",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        ),
        session_id="s1",
    )
    assert (request.model, request.stream, request.include_usage, request.user, request.session_id) == (
        "m",
        True,
        True,
        "u1",
        "s1",
    )
    assert request.prompt_text == "system\nbe brief\nuser\nhi\n"


def test_user_header_wins_over_body_user() -> None:
    request = parse_body(Endpoint.COMPLETIONS, body(model="m", prompt="x", user="body"), user="header")
    assert request.user == "header"


@pytest.mark.parametrize(
    ("endpoint", "fields", "expected"),
    [
        (Endpoint.COMPLETIONS, {"prompt": "once upon"}, "once upon"),
        (Endpoint.COMPLETIONS, {"prompt": ["a", "b"]}, "a\nb"),
        (Endpoint.COMPLETIONS, {"prompt": [[1, 2], [3]]}, "1 2\n3"),
        (Endpoint.EMBEDDINGS, {"input": "embed me"}, "embed me"),
        (Endpoint.RESPONSES, {"input": "q", "instructions": "sys"}, "system\nsys\nuser\nq\n"),
        (
            Endpoint.RESPONSES,
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "t"}]}]},
            "user\nt\n",
        ),
        (
            Endpoint.CHAT,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}],
                    }
                ]
            },
            "user\na\n",
        ),
    ],
)
def test_prompt_text_per_endpoint(endpoint: Endpoint, fields: dict, expected: str) -> None:
    assert parse_body(endpoint, body(model="m", **fields)).prompt_text == expected


class CountingTokenizer:
    """One token per character; counts its calls and remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(("text", text))
        return [ord(c) for c in text]

    def encode_chat(self, messages, **options) -> list[int]:  # type: ignore[no-untyped-def]
        self.calls.append(("chat", options))
        if any(m.get("role") == "tool" for m in messages):
            raise ValueError("tool messages are not supported by this template")
        return [ord(c) for m in messages for c in f"<{m['role']}>{m['content']}"]


def test_tokenized_once_on_first_use_and_only_when_asked() -> None:
    tokenizer = CountingTokenizer()
    request = parse_body(Endpoint.COMPLETIONS, body(model="m", prompt=["ab", "cde"]))
    request.tokenizer = tokenizer
    assert request.prompt_tokens_so_far == 2  # an estimate from the text ("ab\ncde"): no tokenization
    assert tokenizer.calls == []
    assert request.prompt_token_ids == [97, 98]  # the first prompt of the batch
    assert request.prompt_tokens == request.prompt_tokens_so_far == 5  # the whole batch, exact
    assert request.exact
    request.prompt_token_ids  # noqa: B018
    assert tokenizer.calls == [("text", "ab"), ("text", "cde")]


def test_chat_options_reach_the_tokenizer() -> None:
    tokenizer = CountingTokenizer()
    request = parse_body(
        Endpoint.CHAT,
        body(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
            add_generation_prompt=False,
            continue_final_message=True,
            chat_template_kwargs={"enable_thinking": False},
        ),
    )
    request.tokenizer = tokenizer
    assert request.prompt_tokens == len("<user>x")
    assert tokenizer.calls == [
        (
            "chat",
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "add_generation_prompt": False,
                "continue_final_message": True,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
    ]


def test_a_prompt_the_template_refuses_is_a_400() -> None:
    request = parse_body(Endpoint.CHAT, body(model="m", messages=[{"role": "tool", "content": "x"}]))
    request.tokenizer = CountingTokenizer()
    with pytest.raises(GatewayError) as info:
        request.prompt_tokens  # noqa: B018
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_value", "messages")
    assert "tool messages are not supported" in info.value.message


def test_token_ids_need_no_tokenizer() -> None:
    single = parse_body(Endpoint.COMPLETIONS, body(model="m", prompt=[5, 6, 7]))
    batch = parse_body(Endpoint.EMBEDDINGS, body(model="m", input=[[1, 2], [3]]))
    assert (single.prompt.kind, single.prompt_token_ids, single.prompt_tokens) == (
        PromptKind.TOKENS,
        [5, 6, 7],
        3,
    )
    assert (batch.prompt_token_ids, batch.prompt_tokens) == ([1, 2], 3)


def test_without_a_tokenizer_lengths_are_estimated() -> None:
    request = parse_body(Endpoint.COMPLETIONS, body(model="m", prompt="x" * 40))
    assert (request.prompt_token_ids, request.exact, request.prompt_tokens) == (None, False, 10)


@pytest.mark.parametrize(
    ("endpoint", "fields", "max_tokens", "n"),
    [
        (Endpoint.CHAT, {"messages": [{"role": "user", "content": "x"}]}, None, 1),
        (Endpoint.CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 7, "n": 3}, 7, 3),
        (  # the newer name wins, as in vLLM
            Endpoint.CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 7, "max_completion_tokens": 9},
            9,
            1,
        ),
        (Endpoint.COMPLETIONS, {"prompt": "x", "max_tokens": 0}, 0, 1),
        (
            Endpoint.COMPLETIONS,
            {"prompt": "x", "max_completion_tokens": 9},
            None,
            1,
        ),  # not a completions field
        (Endpoint.RESPONSES, {"input": "x", "max_output_tokens": 11}, 11, 1),
        (Endpoint.EMBEDDINGS, {"input": "x", "n": 4}, None, 1),
    ],
)
def test_output_budget(endpoint: Endpoint, fields: dict, max_tokens: int | None, n: int) -> None:
    request = parse_body(endpoint, body(model="m", **fields))
    assert (request.max_tokens, request.n) == (max_tokens, n)
    assert request.output_tokens(128) == n * (128 if max_tokens is None else max_tokens)


def test_media_parts_are_counted_and_passed_through() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "input_audio", "input_audio": {}},
            ],
        }
    ]
    raw = body(model="m", messages=messages)
    request = parse_body(Endpoint.CHAT, raw)
    assert (request.prompt.media_parts, request.prompt_text) == (2, "user\nlook\n")
    assert request.body["messages"] == messages  # forwarded as sent
    responses = parse_body(
        Endpoint.RESPONSES,
        body(
            model="m",
            input=[{"role": "user", "content": "q"}, {"type": "function_call_output", "output": "4"}],
        ),
    )
    assert (responses.prompt.media_parts, len(responses.prompt.messages)) == (1, 1)


@pytest.mark.parametrize(
    ("endpoint", "raw", "code", "param"),
    [
        (Endpoint.CHAT, b"", "invalid_json", None),
        (Endpoint.CHAT, b"{not json", "invalid_json", None),
        (Endpoint.CHAT, b"[1, 2]", "invalid_json", None),
        (Endpoint.CHAT, body(messages=[{"role": "user", "content": "x"}]), "missing_model", "model"),
        (
            Endpoint.CHAT,
            body(model="", messages=[{"role": "user", "content": "x"}]),
            "missing_model",
            "model",
        ),
        (Endpoint.CHAT, body(model=7, messages=[{"role": "user", "content": "x"}]), "missing_model", "model"),
        (Endpoint.CHAT, body(model="m"), "invalid_value", "messages"),
        (Endpoint.CHAT, body(model="m", messages=[]), "invalid_value", "messages"),
        (Endpoint.CHAT, body(model="m", messages=["hi"]), "invalid_value", "messages"),
        (Endpoint.CHAT, body(model="m", messages=[{}], stream="yes"), "invalid_value", "stream"),
        (Endpoint.CHAT, body(model="m", messages=[{}], stream_options=[]), "invalid_value", "stream_options"),
        (Endpoint.CHAT, body(model="m", messages=[{}], user=5), "invalid_value", "user"),
        (Endpoint.COMPLETIONS, body(model="m"), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=3), "invalid_value", "prompt"),
        (Endpoint.EMBEDDINGS, body(model="m", input={"a": 1}), "invalid_value", "input"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=[]), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=["a", 1]), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=[1, -2]), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=[1, True]), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=[[1], []]), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt=[[1], [[2]]]), "invalid_value", "prompt"),
        (Endpoint.COMPLETIONS, body(model="m", prompt="x", max_tokens="9"), "invalid_value", "max_tokens"),
        (Endpoint.COMPLETIONS, body(model="m", prompt="x", max_tokens=-1), "invalid_value", "max_tokens"),
        (Endpoint.COMPLETIONS, body(model="m", prompt="x", max_tokens=2.5), "invalid_value", "max_tokens"),
        (Endpoint.COMPLETIONS, body(model="m", prompt="x", n=0), "invalid_value", "n"),
        (
            Endpoint.CHAT,
            body(model="m", messages=[{}], max_completion_tokens=True),
            "invalid_value",
            "max_completion_tokens",
        ),
        (Endpoint.CHAT, body(model="m", messages=[{"content": 5}]), "invalid_value", "messages"),
        (Endpoint.CHAT, body(model="m", messages=[{"content": ["x"]}]), "invalid_value", "messages"),
        (
            Endpoint.CHAT,
            body(model="m", messages=[{"content": [{"type": "text"}]}]),
            "invalid_value",
            "messages",
        ),
        (Endpoint.CHAT, body(model="m", messages=[{}], tools={}), "invalid_value", "tools"),
        (
            Endpoint.CHAT,
            body(model="m", messages=[{}], chat_template_kwargs=[]),
            "invalid_value",
            "chat_template_kwargs",
        ),
        (Endpoint.RESPONSES, body(model="m", input=5), "invalid_value", "input"),
        (Endpoint.RESPONSES, body(model="m", input=["x"]), "invalid_value", "input"),
        (Endpoint.RESPONSES, body(model="m", instructions=["x"]), "invalid_value", "instructions"),
        (
            Endpoint.RESPONSES,
            body(model="m", input="x", max_output_tokens=-5),
            "invalid_value",
            "max_output_tokens",
        ),
    ],
)
def test_bad_bodies_are_400_with_param(endpoint: Endpoint, raw: bytes, code: str, param: str | None) -> None:
    with pytest.raises(GatewayError) as info:
        parse_body(endpoint, raw)
    error = info.value
    assert (error.status, error.code, error.param) == (400, code, param)
    payload = orjson.loads(error.body())["error"]
    assert payload["type"] == "invalid_request_error"
    assert payload["message"]


def test_responses_input_is_optional() -> None:
    assert parse_body(Endpoint.RESPONSES, body(model="m", previous_response_id="r1")).prompt_text == ""
