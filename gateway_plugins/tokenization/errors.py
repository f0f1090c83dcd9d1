"""The two ways tokenization fails: a source that cannot be loaded, a chat the model cannot render."""

from __future__ import annotations


class TokenizerLoadError(ValueError):
    """A tokenizer source that cannot be loaded (bad source, missing files, nothing in the HF cache)."""


class TemplateError(ValueError):
    """A chat request the model cannot render: its template raised, or a message breaks vLLM's rules.

    vLLM answers these with a 400, and so can the gateway; the message is the template's own."""
