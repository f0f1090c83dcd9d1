"""A chat request's messages and tools as vLLM hands them to the chat template (text-only models).

vLLM does not pass the request's messages through: ``parse_chat_messages`` rebuilds each one with the
fields templates use (``role``, ``content``, an assistant's ``tool_calls`` and ``reasoning``, a tool's
``tool_call_id``, ``name``), turns content into one string (``string`` templates: text parts joined with
``"\\n"``) or into a list of ``{"type": "text", ...}`` parts (``openai`` templates), refuses media parts a
text-only model cannot take, drops Claude Code's per-request billing line from system text, and parses tool
calls' JSON arguments into objects. Tools go through vLLM's request model, which fixes their fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gateway_plugins.tokenization.errors import TemplateError
from gateway_plugins.tokenization.template import ContentFormat

#: Content-part types vLLM reads as text, and the field holding the text.
TEXT_PARTS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
#: Part types (and, on parts without a type, keys) that carry media: a text-only model refuses them.
MEDIA_PARTS = frozenset(
    [
        "image_url",
        "input_image",
        "image_embeds",
        "image_pil",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "video_embeds",
        "prompt_embeds",
    ]
)
#: Fields of vLLM's content-part types; an ``openai`` template's text parts keep any others (cache_control).
KNOWN_PART_FIELDS = frozenset(
    [
        "audio_embeds",
        "audio_url",
        "closed",
        "data",
        "file",
        "image_embeds",
        "image_pil",
        "image_url",
        "input_audio",
        "name",
        "prompt_cache_breakpoint",
        "refusal",
        "text",
        "thinking",
        "type",
        "uuid",
        "video_embeds",
        "video_url",
    ]
)
BILLING_HEADER = "x-anthropic-billing-header"


def conversation(
    messages: Sequence[Mapping[str, Any]], content_format: ContentFormat
) -> list[dict[str, Any]]:
    """The messages as the template receives them. Raises ``TemplateError`` where vLLM answers 400."""
    openai = content_format == "openai"
    out = []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TemplateError("each message must be an object with a string 'role'")
        role = message["role"]
        content = message.get("content")
        if content is None:
            parts: list[Any] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise TemplateError("a message's content must be a string or a list of content parts")
        if role == "system":
            parts = _strip_billing_header(parts)
        items = [item for part in parts if (item := _content_part(part, openai))]  # vLLM drops falsy ones
        entry: dict[str, Any] = {"role": role, "content": items if openai else "\n".join(items)}
        if role == "assistant":
            calls = message.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise TemplateError("an assistant's tool_calls must be a list")
            if calls:  # an empty list is dropped, keeping templates on the plain assistant path
                entry["tool_calls"] = [_tool_call(call) for call in calls]
            if message.get("reasoning") is not None:
                entry["reasoning"] = entry["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                entry["tool_call_id"] = message["tool_call_id"]
            if openai and all(isinstance(p, dict) and p.get("type") == "text" for p in items):
                entry["content"] = "\n".join(p.get("text") or "" for p in items)
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        if isinstance(message.get("task"), str):
            entry["task"] = message["task"]
        if role == "developer":
            entry["tools"] = message.get("tools")
        out.append(entry)
    return out


def _content_part(part: Any, openai: bool) -> Any:
    """One content part as vLLM passes it on: a string (``string`` format) or a dict; None: dropped."""
    if isinstance(part, str):
        return {"type": "text", "text": part} if openai else part
    if not isinstance(part, Mapping):
        raise TemplateError(f"a content part must be a string or an object, not {type(part).__name__}")
    kind = part.get("type")
    if kind is None or part.get("uuid") is not None:
        if any(key in part for key in MEDIA_PARTS):
            raise TemplateError("this model accepts text only: a content part carries media")
        if "tool_reference" not in part:
            raise TemplateError("Missing 'type' field in multimodal part.")
        kind = "tool_reference"
    if not isinstance(kind, str):
        raise TemplateError("Invalid 'type' field in multimodal part.")
    if kind in TEXT_PARTS:
        field = TEXT_PARTS[kind]
        text = part.get(field)
        if text is None and kind in ("text", "refusal"):
            return None  # vLLM skips these (with a warning)
        if not isinstance(text, str) and not (openai and text is None):
            raise TemplateError(f"a {kind!r} content part needs a string {field!r}")
        if not openai:
            return text
        return {"type": "text", "text": text} | {k: v for k, v in part.items() if k not in KNOWN_PART_FIELDS}
    if kind == "tool_reference":  # a deferred tool's name, for the template to expand
        return {"type": "tool_reference", "name": part.get("name")} if openai else part.get("name")
    if kind in MEDIA_PARTS:
        raise TemplateError(f"this model accepts text only: content part type {kind!r}")
    raise TemplateError(f"Unsupported chat content part type: {kind!r}.")


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    """Without Claude Code's attribution line, whose value changes per request (it defeats prefix caching)."""
    kept = []
    for part in parts:
        is_text = isinstance(part, Mapping) and part.get("type") == "text"
        text = part if isinstance(part, str) else part.get("text") if is_text else None
        if not (isinstance(text, str) and text.startswith(BILLING_HEADER)):
            kept.append(part)
        elif rest := text.partition("\n")[2]:
            kept.append(rest if isinstance(part, str) else {**part, "text": rest})
    return kept


def _tool_call(call: Any) -> dict[str, Any]:
    """An assistant's tool call in the field order of vLLM's request model, its arguments parsed to an
    object (anything that is not a JSON object becomes ``{}``, as in vLLM)."""
    if not isinstance(call, Mapping):
        raise TemplateError("assistant tool_calls entries must be objects.")
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, Mapping):
        raise TemplateError("chat completions only support assistant tool_calls of type 'function'.")
    arguments = function.get("arguments")
    if arguments and isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = None
    if not isinstance(arguments, dict):
        arguments = {}
    fields = {"arguments": arguments, "name": function.get("name")}
    fields |= {k: v for k, v in function.items() if k not in fields}
    ordered = ({"id": call["id"]} if "id" in call else {}) | {"function": fields}
    return ordered | {k: v for k, v in call.items() if k not in ordered}


def developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's fallback for templates that do not know the ``developer`` role: developer messages become
    system ones, merged into one first message when that leaves several, or one that is not first."""
    converted = [
        {k: v for k, v in m.items() if k != "tools"} | {"role": "system"} if m["role"] == "developer" else m
        for m in messages
    ]
    texts: list[str] = []
    merge = False
    for index, message in enumerate(converted):
        if message["role"] != "system":
            continue
        merge = merge or index > 0 or bool(texts)
        content = message.get("content") or ""
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p
                for p in content
                if isinstance(p, str) or (isinstance(p, dict) and "text" in p)
            )
        if content:
            texts.append(content)
    if not merge:
        return converted
    return [
        {"role": "system", "content": "\n\n".join(texts)},
        *(m for m in converted if m["role"] != "system"),
    ]


def tool_dicts(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """Tools as vLLM's request model dumps them: ``type`` and ``function`` (``name``, ``description``,
    ``parameters``, and ``strict`` or ``defer_loading`` when set); other fields are dropped."""
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
            raise TemplateError("each tool must be an object with a 'function' object")
        if tool.get("type", "function") != "function":
            raise TemplateError(f"unsupported tool type {tool.get('type')!r}")
        function = tool["function"]
        if not isinstance(function.get("name"), str):
            raise TemplateError("a tool's function needs a string 'name'")
        dumped: dict[str, Any] = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        if function.get("strict") is not None:
            dumped["strict"] = function["strict"]
        defer, function_defer = tool.get("defer_loading"), function.get("defer_loading")
        if function_defer is not None or defer is not None:
            dumped["defer_loading"] = defer if function_defer is None else function_defer
        entry: dict[str, Any] = {"type": "function", "function": dumped}
        if defer is not None:
            entry["defer_loading"] = defer
        out.append(entry)
    return out
