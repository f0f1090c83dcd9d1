"""``ModelTokenizer``: one model's tokenizer and chat templates, applied to a request as vLLM applies them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway_plugins.tokenization.errors import TemplateError, TokenizerLoadError
from gateway_plugins.tokenization.loading import load_files
from gateway_plugins.tokenization.messages import conversation, developer_as_system, tool_dicts
from gateway_plugins.tokenization.pieces import PieceCache, encode_texts, probe_texts
from gateway_plugins.tokenization.template import ChatTemplate, cut_at_final_message, mark_final_message

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

#: Tokenizer classes transformers 5 builds straight from ``tokenizer.json``; it rebuilds the others
#: (``LlamaTokenizer``, ``Qwen2Tokenizer``, ...) from the vocabulary with a pipeline of their own.
GENERIC_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
#: Keyword arguments of transformers' ``apply_chat_template``: vLLM lets ``chat_template_kwargs`` name
#: them whether or not the template reads them, and they never reach the template as variables.
APPLY_PARAMS = frozenset(
    [
        "add_generation_prompt",
        "chat_template",
        "continue_final_message",
        "conversation",
        "documents",
        "max_length",
        "padding",
        "return_assistant_tokens_mask",
        "return_dict",
        "return_tensors",
        "self",
        "tokenize",
        "tokenizer_kwargs",
        "tools",
        "truncation",
    ]
)


class ModelTokenizer:
    """A model's own tokenizer (``tokenizer.json`` through the Rust ``tokenizers`` package) and chat
    template, giving the token ids vLLM gives (``gateway_plugins.tokenization``). Thread-safe."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        templates: Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        tokenizer_class: str | None = "TokenizersBackend",
        name: str = "",
        cache_tokens: int = 0,
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        """``tokenizer`` as transformers would have it (``load`` does that); ``spec`` is its JSON, which
        decides whether chat prompts may be tokenized by cached pieces (``cache_tokens`` > 0)."""
        self.tokenizer = tokenizer
        self.name = name
        self.tokenizer_class = tokenizer_class
        self.special_tokens = dict(special_tokens or {})
        self.templates = {key: ChatTemplate.compile(source) for key, source in (templates or {}).items()}
        self.pieces: PieceCache | None = None
        if cache_tokens > 0:
            reason = PieceCache.unsupported(tokenizer, spec or {})
            cache = PieceCache(tokenizer, cache_tokens) if reason is None else None
            if cache is not None and not cache.agrees(probe_texts(list(cache.ids))):
                reason = "piecewise ids differ on probe texts"
            if reason is None:
                self.pieces = cache
            else:
                log.info("tokenizer %s: chat prompts are tokenized whole (%s)", name, reason)

    @classmethod
    def load(cls, source: str, *, cache_tokens: int = 1_000_000) -> ModelTokenizer:
        """The tokenizer at ``source``: a folder, or ``hf://org/repo[@revision]`` through the HF cache
        (``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` honoured). Blocking: callers run it in a thread.

        ``cache_tokens`` bounds the token ids of chat prompt pieces kept for reuse (0: no cache). Raises
        ``TokenizerLoadError`` (a ``ValueError``) naming the source when it cannot be loaded."""
        try:
            import jinja2  # noqa: F401 - here, so a missing extra fails at load and not per request
            import tokenizers  # noqa: F401
        except ImportError as exc:
            raise TokenizerLoadError(
                f"tokenizer source {source!r} needs the 'tokenizer' extra: {exc}"
            ) from exc
        files = load_files(source)
        model = cls(
            files.tokenizer,
            templates=files.templates,
            special_tokens=files.special_tokens,
            tokenizer_class=files.tokenizer_class,
            name=source,
            cache_tokens=cache_tokens,
            spec=files.spec,
        )
        if not model.generic:
            log.warning(
                "tokenizer %s: transformers 5 (so vLLM) rebuilds class %s from the vocabulary; ids may "
                "differ from tokenizer.json's: compare with the engine's /tokenize",
                source,
                files.tokenizer_class or "(unset: chosen by the model type)",
            )
        if not model.templates:
            log.warning("tokenizer %s: no chat template, chat requests cannot be tokenized", source)
        return model

    @property
    def generic(self) -> bool:
        """Whether transformers 5 uses ``tokenizer.json`` as it is (exact by construction)."""
        return self.tokenizer_class in GENERIC_CLASSES

    def template(self, tools: Sequence[Any] | None = None) -> ChatTemplate:
        """The template vLLM picks: the only one; else ``tool_use`` with tools; else ``default``."""
        if len(self.templates) == 1 and "default" in self.templates:
            return self.templates["default"]
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        if not self.templates:
            raise TemplateError("the model has no chat template: chat requests cannot be rendered")
        raise TemplateError(f"the model has several chat templates and no default: {sorted(self.templates)}")

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """A completions prompt's ids, as vLLM encodes it (special tokens such as BOS added by default)."""
        return encode_texts(self.tokenizer, [text], add_special_tokens=add_special_tokens)[0]

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        documents: Sequence[Any] | None = None,
        reasoning_effort: str | None = None,
    ) -> str:
        """The prompt text vLLM renders for a chat request (``/v1/chat/completions``, ``/tokenize``).

        The arguments are the request's fields of the same names; ``documents`` and ``reasoning_effort``
        exist on chat completions only. Raises ``TemplateError``."""
        user = dict(chat_template_kwargs or {})
        if "chat_template" in user:
            raise TemplateError("a chat template sent with the request is refused (vLLM's default)")
        # vLLM's merge: the request's own fields over its chat_template_kwargs, and both over the
        # defaults (tools, tokenize=False); None and "auto" count as unset.
        own: dict[str, Any] = {
            "add_generation_prompt": add_generation_prompt,
            "continue_final_message": continue_final_message,
            "documents": documents,
            "reasoning_effort": reasoning_effort,
        }
        if reasoning_effort is not None and "enable_thinking" not in user:
            own["enable_thinking"] = reasoning_effort != "none"
        requested = user | {k: v for k, v in own.items() if not _unset(v)}
        merged = {k: v for k, v in requested.items() if not _unset(v)}
        tools_arg = merged.pop("tools", None if tools is None else tool_dicts(tools))
        merged.pop("tokenize", None)
        template = self.template(tools_arg)
        # Only the template's own variables and apply_chat_template's parameters get through.
        accepted = {k: v for k, v in merged.items() if k in template.variables or k in APPLY_PARAMS}
        if clash := {"messages", "conversation", "self"} & accepted.keys():
            raise TemplateError(f"chat_template_kwargs may not set {sorted(clash)}")
        add_generation_prompt = bool(accepted.get("add_generation_prompt", False))
        continue_final = bool(accepted.get("continue_final_message", False))
        documents_arg = accepted.get("documents")
        if documents_arg is not None and not all(isinstance(d, dict) for d in documents_arg):
            raise TemplateError("Documents should be a list of dicts with 'title' and 'text' keys!")

        chat = conversation(messages, template.content_format)
        if not template.knows_developer and any(m["role"] == "developer" for m in chat):
            chat = developer_as_system(chat)
        if not chat:
            raise TemplateError("Cannot apply chat template to an empty conversation.")
        final = ""
        if continue_final:
            if add_generation_prompt:
                raise TemplateError("continue_final_message and add_generation_prompt are not compatible.")
            final = mark_final_message(chat, template.source)
        variables = self.special_tokens | {k: v for k, v in accepted.items() if k not in APPLY_PARAMS}
        variables |= {
            "messages": chat,
            "tools": tools_arg,
            "documents": documents_arg,
            "add_generation_prompt": add_generation_prompt,
        }
        rendered = template.render(variables)
        return cut_at_final_message(rendered, final) if continue_final else rendered

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        documents: Sequence[Any] | None = None,
        reasoning_effort: str | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """The ids vLLM's chat endpoints feed the model: the rendered prompt encoded without adding special
        tokens (the template writes them), unless the request sets ``add_special_tokens``. Raises
        ``TemplateError``."""
        text = self.render_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            documents=documents,
            reasoning_effort=reasoning_effort,
        )
        if self.pieces is not None and not add_special_tokens:
            return self.pieces.encode(text)
        return encode_texts(self.tokenizer, [text], add_special_tokens=add_special_tokens)[0]


def _unset(value: Any) -> bool:
    """vLLM's ``merge_kwargs`` drops None and "auto"."""
    return value is None or (isinstance(value, str) and value == "auto")
