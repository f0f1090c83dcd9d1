import orjson
import pytest

from gateway_plugins.errors import GatewayError
from gateway_plugins.request_parsing import parse_body, prompt_text
from gateway_plugins.routing.types import Endpoint


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
        (Endpoint.RESPONSES, {"input": "q", "instructions": "sys"}, "sys\nq"),
        (
            Endpoint.RESPONSES,
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "t"}]}]},
            "user\nt",
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
    assert prompt_text(parse_body(endpoint, body(model="m", **fields))) == expected


def test_prompt_text_is_lazy_and_cached() -> None:
    calls = []
    request = parse_body(Endpoint.COMPLETIONS, body(model="m", prompt="p"))
    request._prompt_source = lambda r: calls.append(1) or "p"  # type: ignore[assignment]
    assert request.prompt_text == request.prompt_text == "p"
    assert calls == [1]


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
