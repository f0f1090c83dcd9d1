"""OpenAI request bodies -> ``RoutingRequest``, with the validation routing relies on.

The engine validates everything else; the gateway checks only what it must
read to route (model, stream flags, the prompt fields), and answers anything
malformed with a 400 rather than forwarding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway_plugins.errors import GatewayError, bad_request
from gateway_plugins.routing.types import Endpoint, RoutingRequest

#: POST endpoints that carry a model and get routed to an engine.
ROUTED_ENDPOINTS = {
    e.value: e for e in (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS, Endpoint.RESPONSES)
}
#: The body field each endpoint's prompt lives in.
_PROMPT_FIELD = {
    Endpoint.CHAT: "messages",
    Endpoint.COMPLETIONS: "prompt",
    Endpoint.EMBEDDINGS: "input",
    Endpoint.RESPONSES: "input",
}


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
    stream = _optional(body, "stream", bool, False)
    options = _optional(body, "stream_options", dict, None)
    include_usage = bool(options and options.get("include_usage") is True)
    prompt_field = _PROMPT_FIELD[endpoint]
    prompt = body.get(prompt_field)
    if endpoint is Endpoint.CHAT:
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise _invalid(prompt_field, "must be a non-empty array of message objects")
    elif (endpoint is not Endpoint.RESPONSES or prompt is not None) and not isinstance(prompt, str | list):
        raise _invalid(prompt_field, "must be a string or an array")
    body_user = _optional(body, "user", str, None)
    return RoutingRequest(
        model,
        endpoint=endpoint,
        stream=stream,
        include_usage=include_usage,
        user=user or body_user,
        session_id=session_id,
        body=body,
        prompt_source=prompt_text,
    )


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


def prompt_text(request: RoutingRequest) -> str:
    """The text prefix-aware routing hashes: messages or prompt flattened in order.

    Equal conversation prefixes give equal text prefixes, which is all prefix
    matching needs; it is not the engine's chat template. Flattening follows
    the shapes OpenAI's API allows, without recursion: a prompt nested deeper
    (a list of lists of lists) is a 400, never a ``RecursionError``.
    """
    body = request.body
    if request.endpoint is Endpoint.CHAT:
        return "".join(f"{m.get('role', '')}\n{_content_text(m.get('content'))}\n" for m in body["messages"])
    if request.endpoint is Endpoint.RESPONSES:
        instructions = body.get("instructions")
        head = instructions + "\n" if isinstance(instructions, str) else ""
        return head + _flatten(body.get("input"), "input")
    field = _PROMPT_FIELD[request.endpoint]
    return _flatten(body.get(field), field)


def _flatten(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_flatten_item(item, param) for item in value)
    return ""


def _flatten_item(item: Any, param: str) -> str:
    if isinstance(item, dict):  # a Responses API input item or message
        return f"{item.get('role', '')}\n{_content_text(item.get('content'))}"
    if isinstance(item, list):  # one prompt of a batch, as token ids
        if not all(type(token) is int for token in item):
            raise _invalid(param, "a prompt given as a list must hold token ids (integers), not nested lists")
        return " ".join(map(str, item))
    return str(item) if isinstance(item, str | int | float) else ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""
