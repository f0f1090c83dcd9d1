"""A deterministic tokenizer that needs no download, and the emulator's deterministic replies.

Text is cut into short words, runs of spaces and single punctuation marks
(roughly what BPE pre-tokenizers do); each piece maps to a stable id. Equal
text gives equal ids, so prompts that share a prefix share token blocks, which
is what prefix caching and prefix-aware routing depend on.

``vocabulary()`` lists words that are exactly one token each; workloads build
prompts from them and engines reply with them, so token ids and text are always
produced together and ``encode(text)`` agrees with the ids.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np

VOCAB_SIZE = 32_000
_PIECES = re.compile(r" ?[A-Za-z]{1,6}| ?\d{1,3}| ?[^\sA-Za-z\d]|\s+")


def encode(text: str) -> list[int]:
    return [zlib.crc32(piece.encode()) % VOCAB_SIZE for piece in _PIECES.findall(text)]


def count(text: str) -> int:
    return len(_PIECES.findall(text))


class Vocabulary:
    """Words that are one token each (a leading space and two to six letters), with distinct ids."""

    def __init__(self, size: int = 4096, seed: int = 7) -> None:
        rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        by_id: dict[int, str] = {}
        while len(by_id) < size:
            word = " " + "".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
            by_id.setdefault(encode(word)[0], word)
        self.words = list(by_id.values())
        self.ids = list(by_id)
        self._ids = np.array(self.ids, dtype=np.int64)
        self._word_of = by_id

    def segment(self, rng: np.random.Generator, length: int) -> list[int]:
        """``length`` random one-token words, as token ids."""
        return self._ids[rng.integers(0, len(self.ids), length)].tolist()

    def text(self, ids: list[int]) -> str:
        """The text of ids drawn from this vocabulary (``encode`` of it gives ``ids`` back)."""
        return "".join(map(self._word_of.__getitem__, ids))


def chat_prompt(messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The emulator's chat template: role tags around each message, then the assistant's turn."""
    text = "".join(f"<|{m.get('role')}|>\n{_content(m.get('content'))}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def _content(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class EmulatorTokenizer:
    """The emulated model's tokenizer and chat template, as the gateway's router takes a model's own
    (``PromptTokenizer``): the simulator's router tokenizes requests with it, as the engines do."""

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return encode(text)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        return encode(chat_prompt(messages, add_generation_prompt=add_generation_prompt))


@cache
def vocabulary() -> Vocabulary:
    return Vocabulary()


def reply(prompt_ids: list[int], length: int) -> tuple[list[int], list[str]]:
    """What an emulated engine answers to ``prompt_ids``: ``length`` tokens, as ids and text pieces.

    A pure function of the prompt, so a multi-turn workload can put the reply
    into the next turn's history exactly as the engine produced (and cached) it.
    """
    vocab = vocabulary()
    seed = zlib.crc32(str(prompt_ids[-32:]).encode()) + len(prompt_ids)
    picks = [(seed + i * 7919) % len(vocab.words) for i in range(length)]
    return [vocab.ids[i] for i in picks], [vocab.words[i] for i in picks]
