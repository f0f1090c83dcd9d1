"""Chat templates as vLLM renders them: transformers' Jinja environment and vLLM's content-format detection.

vLLM calls transformers' ``apply_chat_template``, which renders in an ``ImmutableSandboxedEnvironment``
with ``trim_blocks``, ``lstrip_blocks``, loop controls, a ``{% generation %}`` tag, a ``tojson`` that keeps
non-ASCII and does not escape HTML, and the globals ``raise_exception`` and ``strftime_now``. Before that,
vLLM decides from the template's syntax tree whether it reads message content as a string or loops over
content parts (``renderers/hf.py``); ``detect_content_format`` follows the same rules, quirks included.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from gateway_plugins.tokenization.errors import TemplateError

if TYPE_CHECKING:
    import jinja2
    import jinja2.nodes

ContentFormat = Literal["string", "openai"]
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: Jinja's own escapes ``<>&'``, which would change the prompt."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:  # the keyword templates call it with
    return datetime.datetime.now().strftime(format)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


_environment: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """The Jinja environment transformers renders chat templates in (built once)."""
    global _environment
    if _environment is None:
        import jinja2.ext
        import jinja2.nodes
        import jinja2.sandbox

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; a
            prompt renders the body unchanged."""

            tags: ClassVar[set[str]] = {"generation"}

            def parse(self, parser: Any) -> jinja2.nodes.Node:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller: Any) -> str:
                return str(caller())

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        _environment = env
    return _environment


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and what vLLM derives from its source (once, not per request)."""

    source: str
    compiled: Any  # jinja2.Template; None when the source does not compile
    error: str | None  # why it does not compile: every chat request fails with it, as in vLLM
    variables: frozenset[str]  # undeclared variables: the chat_template_kwargs vLLM lets through
    content_format: ContentFormat
    knows_developer: bool  # else vLLM turns developer messages into system ones

    @classmethod
    def compile(cls, source: str) -> ChatTemplate:
        import jinja2.meta

        env = environment()
        try:
            compiled = env.from_string(source)
            variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))
            error = None
        except Exception as exc:  # any syntax error: the template is unusable
            compiled, variables, error = None, frozenset(), f"the chat template does not compile: {exc}"
        return cls(
            source=source,
            compiled=compiled,
            error=error,
            variables=variables,
            content_format=detect_content_format(source),
            knows_developer='"developer"' in source or "'developer'" in source,
        )

    def render(self, variables: dict[str, Any]) -> str:
        if self.compiled is None:
            raise TemplateError(self.error or "no chat template")
        try:
            return str(self.compiled.render(**variables))
        except Exception as exc:  # vLLM answers any template failure with a 400
            raise TemplateError(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    """The most specific message of a template failure: the template's own for ``raise_exception``."""
    import jinja2

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, jinja2.TemplateError):
            return str(current)
        current = current.__cause__ or current.__context__
    return str(exc)


# --- content format ------------------------------------------------------------------------------------


def detect_content_format(source: str) -> ContentFormat:
    """``openai`` when the template loops over a message's content (it takes content-part lists), else
    ``string``, including vLLM's fallback to ``string`` when the template does not parse or has a shape
    its detection does not follow."""
    try:
        next(_content_loops(environment().parse(source)))
    except Exception:  # StopIteration (no such loop), a syntax error, an unfollowed shape
        return "string"
    return "openai"


class _UnfollowedError(Exception):
    """A shape vLLM's detection asserts against: a tuple where it expects a variable name."""


def _reads(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    """``node`` reads variable ``name`` (or its ``key`` item/attribute), maybe through a filter, a test
    or a slice."""
    import jinja2.nodes as n

    if isinstance(node, n.Filter):
        return node.node is not None and _reads(node.node, name, key)
    if isinstance(node, n.Test) or (isinstance(node, n.Getitem) and isinstance(node.arg, n.Slice)):
        return _reads(node.node, name, key)
    if key is None:
        return _is_name(node, name)
    if isinstance(node, n.Getitem):
        return _is_name(node.node, name) and isinstance(node.arg, n.Const) and node.arg.value == key
    return isinstance(node, n.Getattr) and _is_name(node.node, name) and node.attr == key


def _is_name(node: jinja2.nodes.Node, name: str) -> bool:
    import jinja2.nodes as n

    return isinstance(node, n.Name) and node.ctx == "load" and node.name == name


def _target(node: jinja2.nodes.Node) -> str:
    import jinja2.nodes as n

    if not isinstance(node, n.Name):
        raise _UnfollowedError
    return str(node.name)


def _content_loops(root: jinja2.nodes.Template) -> Iterator[str]:
    """The variables of ``for`` loops over message content, in the order vLLM finds them."""
    import jinja2.nodes as n

    # Variables holding the messages (or a filtered or sliced copy), followed through `set` chains.
    holders, pending = ["messages"], ["messages"]
    while pending:
        current = pending.pop(0)
        for assign in root.find_all(n.Assign):
            if _reads(assign.node, current):
                holders.append(name := _target(assign.target))
                if name != current:
                    pending.append(name)
    messages = [
        _target(loop.target) for loop in root.find_all(n.For) if any(_reads(loop.iter, h) for h in holders)
    ]

    # Macro parameters that calls pass a message's content.
    params_by_loop: dict[int, set[str]] = {}
    in_macros: set[int] = set()
    for macro in root.find_all(n.Macro):
        names = [arg.name for arg in macro.args]
        content_params: set[str] = set()
        for call in root.find_all(n.Call):
            if not (isinstance(call.node, n.Name) and call.node.name == macro.name):
                continue
            for index, arg in enumerate(call.args):
                if index < len(names) and any(_reads(arg, m, "content") for m in messages):
                    content_params.add(names[index])
            for keyword in call.kwargs:
                if keyword.key in names and any(_reads(keyword.value, m, "content") for m in messages):
                    content_params.add(keyword.key)
        for loop in macro.find_all(n.For):
            in_macros.add(id(loop))
            if content_params:
                params_by_loop[id(loop)] = content_params

    for loop in root.find_all(n.For):
        iterated = loop.iter.name if isinstance(loop.iter, n.Name) else None
        if (
            any(_reads(loop.iter, m, "content") for m in messages)
            or (iterated is not None and iterated in params_by_loop.get(id(loop), ()))
            or (iterated == "content" and id(loop) not in in_macros)
        ):
            yield _target(loop.target)


# --- continue_final_message ----------------------------------------------------------------------------


def mark_final_message(chat: list[dict[str, Any]], source: str) -> str:
    """transformers' ``continue_final_message``: tag the last message's (last) text so the rendered prompt
    can be cut right after it; returns that text."""
    last = chat[-1] = dict(chat[-1])
    content = last.get("content")
    if content is None:
        raise TemplateError(
            'continue_final_message is set but the final message has no "content" to continue!'
        )
    if "content" not in source:
        raise TemplateError('continue_final_message is set to "content" but this is not an accepted field')
    if isinstance(content, list):
        parts = [dict(p) if isinstance(p, dict) else p for p in content]
        for part in reversed(parts):
            if isinstance(part, dict) and "text" in part:
                final = part["text"]
                part["text"] = f"{final}{CONTINUE_TAG}"
                last["content"] = parts
                return str(final)
        raise TemplateError("continue_final_message is set but we could not find any text to continue")
    last["content"] = f"{content}{CONTINUE_TAG}"
    return str(content)


def cut_at_final_message(rendered: str, final: str) -> str:
    """The rendered prompt up to the end of the tagged final message."""
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise TemplateError(
            "continue_final_message is set but the final message does not appear in the chat after applying "
            "the chat template"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()
