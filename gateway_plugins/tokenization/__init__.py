"""The gateway tokenizes a request exactly as vLLM does: the model's own tokenizer and chat template.

Routing on exact inputs (issue 14) needs the token ids the engine will see. For a text-only model, vLLM
0.32 (with transformers 5) builds them as follows, and ``ModelTokenizer`` does the same without either:

* the tokenizer is ``tokenizer.json`` through the Rust ``tokenizers`` package, with the special tokens
  of ``tokenizer_config.json`` added where missing, its own post-processor (``add_bos_token`` in the
  config is ignored when ``tokenizer.json`` exists), no truncation or padding (``loading``);
* a completions prompt is encoded with ``add_special_tokens=True`` (the post-processor adds BOS where
  the model has one): ``ModelTokenizer.encode_text``;
* a chat request's messages and tools are normalized as vLLM's request model and ``parse_chat_messages``
  do (``messages``), rendered by transformers' sandboxed Jinja environment with the special tokens and
  the accepted ``chat_template_kwargs`` as variables (``template``), and the text is encoded with
  ``add_special_tokens=False`` (the template writes BOS itself): ``ModelTokenizer.encode_chat``, which
  reuses the pieces of earlier prompts of a conversation (``pieces``).

Not replicated: tokenizer classes that transformers 5 rebuilds from the vocabulary (anything but
``PreTrainedTokenizerFast`` / ``TokenizersBackend``: ``ModelTokenizer.generic`` is False and a warning is
logged), processor chat templates and media parts of multimodal models (a part that is not text is
refused, as vLLM refuses it for a text-only model), Mistral's tokenizer mode, gpt-oss' Harmony rendering,
templates sent with the request (vLLM refuses them by default) and ``--default-chat-template-kwargs``.
docs/routing.md ("Tokenization") has the details and the measured cost.
"""

from gateway_plugins.tokenization.errors import TemplateError, TokenizerLoadError
from gateway_plugins.tokenization.loading import resolve_source
from gateway_plugins.tokenization.model import ModelTokenizer
from gateway_plugins.tokenization.template import detect_content_format

__all__ = ["ModelTokenizer", "TemplateError", "TokenizerLoadError", "detect_content_format", "resolve_source"]
