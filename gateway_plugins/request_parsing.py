"""OpenAI request bodies -> ``RoutingRequest``: the one parse path of the gateway and the simulator.

The gateway reads what routing depends on: the model, the prompt in every shape the API allows
(completions text, a batch of texts, token ids or a batch of them; chat messages with string or
content-part contents; the Responses API's ``input`` and ``instructions``), the output budget
(``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``, ``n``) and the stream flags. It
checks the types of exactly these and answers anything malformed with a 400 rather than forwarding it;
the engine validates the rest. Nothing here tokenizes: ``RoutingRequest`` does, on first use.

No recursion anywhere: every shape is at most a list of lists, so a body nested deeper than the API
allows is a 400, never a ``RecursionError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway_plugins.errors import GatewayError, bad_request
from gateway_plugins.routing.types import Endpoint, Prompt, PromptKind, RoutingRequest

#: POST endpoints that carry a model and get routed to an engine.
ROUTED_ENDPOINTS = {
    e.value: e for e in (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS, Endpoint.RESPONSES)
}
#: The body fields holding the output budget, by precedence (vLLM prefers the newer name).
_BUDGET_FIELDS = {
    Endpoint.CHAT: ("max_completion_tokens", "max_tokens"),
    Endpoint.COMPLETIONS: ("max_tokens",),
    Endpoint.RESPONSES: ("max_output_tokens",),
    Endpoint.EMBEDDINGS: (),
}
#: Content-part types that carry text (chat and Responses); any other part is media, passed through.
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def parse_body(
    endpoint: Endpoint, raw: bytes, *, user: str | None = None, session_id: str | None = None
) -> RoutingRequest:
    """Parse and check one request body; raises ``GatewayError`` (400) on bad input."""
    if not raw:
        raise bad_request(
            "The request body is empty; expected a JSON object.", cause="invalid-body", code="invalid_json"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(
            f"The request body is not valid JSON: {exc}.", cause="invalid-body", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise bad_request(
            "The request body must be a JSON object.", cause="invalid-body", code="invalid_json"
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(
            "You must provide a model parameter.", cause="missing-model", code="missing_model", param="model"
        )
    options = _optional(body, "stream_options", dict, None)
    return RoutingRequest(
        model,
        endpoint=endpoint,
        stream=_optional(body, "stream", bool, False),
        include_usage=bool(options and options.get("include_usage") is True),
        user=user or _optional(body, "user", str, None),
        session_id=session_id,
        body=body,
        prompt=_prompt(endpoint, body),
        max_tokens=_budget(endpoint, body),
        n=_count(body, "n") if endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS) else 1,
    )


def _prompt(endpoint: Endpoint, body: Mapping[str, Any]) -> Prompt:
    if endpoint is Endpoint.CHAT:
        return _chat(body)
    if endpoint is Endpoint.RESPONSES:
        return _responses(body)
    field = "prompt" if endpoint is Endpoint.COMPLETIONS else "input"
    return _completion(body.get(field), field)


def _completion(value: Any, param: str) -> Prompt:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return Prompt(PromptKind.TEXT, texts=(value,))
    if not isinstance(value, list) or not value:
        raise _invalid(param, "must be a string, an array of strings, or an array of token ids")
    first = value[0]
    if isinstance(first, str):
        if not all(isinstance(item, str) for item in value):
            raise _invalid(param, "an array of prompts must hold only strings")
        return Prompt(PromptKind.TEXT, texts=tuple(value))
    if isinstance(first, list):
        for ids in value:
            if not isinstance(ids, list) or not ids or not _token_ids(ids):
                raise _invalid(param, "a batch of token-id prompts must hold non-empty arrays of token ids")
        return Prompt(PromptKind.TOKENS, token_ids=tuple(value))
    if not _token_ids(value):
        raise _invalid(param, "a prompt given as an array must hold strings or token ids (integers)")
    return Prompt(PromptKind.TOKENS, token_ids=(value,))


def _token_ids(values: list[Any]) -> bool:
    return all(type(token) is int and token >= 0 for token in values)


def _chat(body: Mapping[str, Any]) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _invalid("messages", "must be a non-empty array of message objects")
    media = sum(_media_parts(m.get("content"), "messages") for m in messages)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _invalid("tools", "must be an array")
    kwargs = _optional(body, "chat_template_kwargs", dict, None)
    return Prompt(
        PromptKind.CHAT,
        messages=tuple(messages),
        tools=tools,
        add_generation_prompt=_optional(body, "add_generation_prompt", bool, True),
        continue_final_message=_optional(body, "continue_final_message", bool, False),
        chat_template_kwargs=kwargs,
        media_parts=media,
    )


def _responses(body: Mapping[str, Any]) -> Prompt:
    """The Responses API's ``instructions`` and ``input`` as chat messages, as the engine renders them.

    Input items that are not messages (function calls and their outputs, reasoning) carry no role: they
    are passed through and count as media (not tokenized)."""
    messages: list[Mapping[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("instructions", "must be a string")
        messages.append({"role": "system", "content": instructions})
    value = body.get("input")
    media = 0
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, dict):
                raise _invalid("input", "must be a string or an array of input items (objects)")
            if "role" in item:
                media += _media_parts(item.get("content"), "input")
                messages.append(item)
            else:
                media += 1
    elif value is not None:
        raise _invalid("input", "must be a string or an array of input items")
    return Prompt(PromptKind.CHAT, messages=tuple(messages), media_parts=media)


def _media_parts(content: Any, param: str) -> int:
    """How many non-text parts a message's content has; 400 for a content of the wrong shape."""
    if content is None or isinstance(content, str):
        return 0
    if not isinstance(content, list):
        raise _invalid(param, "a message's content must be a string or an array of content parts")
    media = 0
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _invalid(param, "a content part must be an object with a string 'type'")
        if part["type"] not in _TEXT_PARTS:
            media += 1
        elif not isinstance(part.get("text"), str):
            raise _invalid(param, "a text content part needs a string 'text'")
    return media


def _budget(endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
    for name in _BUDGET_FIELDS[endpoint]:
        value = body.get(name)
        if value is not None:
            if type(value) is not int or value < 0:
                raise _invalid(name, "must be a non-negative integer")
            return value
    return None


def _count(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 1
    if type(value) is not int or value < 1:
        raise _invalid(name, "must be a positive integer")
    return value


_TYPE_NAMES = {bool: "boolean", dict: "object", str: "string"}


def _optional(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise _invalid(name, f"must be a {_TYPE_NAMES[kind]}")
    return value


def _invalid(param: str, problem: str) -> GatewayError:
    return bad_request(
        f"Invalid '{param}': {problem}.", cause="invalid-body", code="invalid_value", param=param
    )
