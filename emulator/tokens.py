"""The emulated model's tokenizer (a real byte-level BPE, no download) and its deterministic replies.

Text is cut into pieces the way BPE pre-tokenizers do (a leading space and up to six letters, up to three
digits, one other character, or a run of whitespace); a piece that is a vocabulary word is one token, any
other piece is its longest word-prefix followed by its remaining bytes. This is exactly what a byte-level
BPE gives whose merges spell out the vocabulary's words left to right, and ``write_tokenizer`` writes that
BPE as a Hugging Face ``tokenizer.json`` with the chat template below: a gateway (or any tool) loads the
emulated model's tokenizer as it loads a real model's, and gets the very ids the emulator computes.

``vocabulary()`` lists the words (a leading space and two to six letters) that are one token each;
workloads build prompts from them and engines reply with them, so token ids and text are always produced
together and ``encode(text)`` agrees with the ids. Equal text gives equal ids, so prompts that share a
prefix share token blocks, which is what prefix caching and prefix-aware routing depend on.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

#: The pre-tokenizer's pieces. Whitespace is spelled out rather than ``\s`` so that Python and the Rust
#: ``tokenizers`` (Oniguruma) agree on every character.
PIECES = r" ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^ \t\n\r\f\vA-Za-z0-9]|[ \t\n\r\f\v]+"
_PIECES = re.compile(PIECES)
#: The emulated model's chat template (Jinja, as in ``tokenizer_config.json``): role tags around each
#: message, then the assistant's turn. Content parts are joined with newlines, as vLLM does for templates
#: that take string content.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Bpe:
    """The byte-level BPE whose merges build each vocabulary word from its first byte on.

    Ids 0-255 are the bytes; then every prefix of a word (two bytes and longer) in order of first use.
    All prefixes of every word are tokens, so the merges of a piece stop at its longest word-prefix and
    leave the rest as single bytes: ``encode`` computes that without merging.
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.ids: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        self.merges: list[tuple[bytes, bytes]] = []
        for word in words:
            data = word.encode()
            for end in range(2, len(data) + 1):
                if data[:end] not in self.ids:
                    self.merges.append((data[: end - 1], data[end - 1 : end]))
                    self.ids[data[:end]] = len(self.ids)
        self.longest = max(map(len, self.ids))

    def encode(self, text: str) -> list[int]:
        ids, longest = self.ids, self.longest
        out: list[int] = []
        for piece in _PIECES.findall(text):
            data = piece.encode()
            token = ids.get(data)
            if token is not None:
                out.append(token)
                continue
            end = min(len(data), longest)
            while end > 1 and data[:end] not in ids:
                end -= 1
            out.append(ids[data[:end]])
            out.extend(data[end:])  # a byte's id is its value
        return out

    def tokenizer_json(self) -> dict[str, Any]:
        """This BPE as a Hugging Face ``tokenizer.json`` (byte-level: bytes spelled as GPT-2's characters)."""
        char = _byte_chars()

        def spell(data: bytes) -> str:
            return "".join(char[b] for b in data)

        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": PIECES}, "behavior": "Isolated", "invert": False},
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": False,
                        "trim_offsets": True,
                        "use_regex": False,
                    },
                ],
            },
            "post_processor": None,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": True,
                "trim_offsets": True,
                "use_regex": True,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {spell(token): token_id for token, token_id in self.ids.items()},
                "merges": [[spell(left), spell(right)] for left, right in self.merges],
            },
        }


@cache
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for code points 256+."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def encode(text: str) -> list[int]:
    return bpe().encode(text)


def write_tokenizer(folder: Path) -> Path:
    """The emulated model's tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` with the chat
    template) in ``folder``, for ``models.<name>.tokenizer`` of a gateway in front of emulators."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(bpe().tokenizer_json()))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _words(size: int = 4096, seed: int = 7) -> list[str]:
    """The vocabulary's words: distinct, a leading space and two to six letters, drawn with ``seed``."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: dict[str, None] = {}
    while len(words) < size:
        words.setdefault(" " + "".join(rng.choice(letters) for _ in range(rng.randint(2, 6))))
    return list(words)


@cache
def bpe() -> Bpe:
    return Bpe(_words())


class Vocabulary:
    """Words that are one token each (a leading space and two to six letters), with distinct ids."""

    def __init__(self, words: Sequence[str]) -> None:
        tokenizer = bpe()
        by_id = {tokenizer.ids[word.encode()]: word for word in words}
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
    """``CHAT_TEMPLATE`` rendered (``write_tokenizer`` hands the template itself to a gateway)."""
    text = "".join(f"<|{m.get('role')}|>\n{_content(m.get('content'))}\n" for m in messages)
    return text + "<|assistant|>\n" if add_generation_prompt else text


def _content(content: Any) -> str:
    if isinstance(content, list):  # text parts, joined as vLLM joins them for a string-content template
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"]
        )
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
    return Vocabulary(_words())


def reply(prompt_ids: list[int], length: int) -> tuple[list[int], list[str]]:
    """What an emulated engine answers to ``prompt_ids``: ``length`` tokens, as ids and text pieces.

    A pure function of the prompt, so a multi-turn workload can put the reply
    into the next turn's history exactly as the engine produced (and cached) it.
    """
    vocab = vocabulary()
    seed = zlib.crc32(str(prompt_ids[-32:]).encode()) + len(prompt_ids)
    picks = [(seed + i * 7919) % len(vocab.words) for i in range(length)]
    return [vocab.ids[i] for i in picks], [vocab.words[i] for i in picks]
