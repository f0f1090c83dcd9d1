"""A deterministic tokenizer that needs no download.

Text is cut into words, runs of spaces and single punctuation marks (roughly
what BPE pre-tokenizers do), each piece maps to a stable id. Equal text gives
equal ids, so prompts that share a prefix share token blocks, which is what
prefix caching and prefix-aware routing depend on.
"""

from __future__ import annotations

import re
import zlib

VOCAB_SIZE = 32_000
_PIECES = re.compile(r" ?[A-Za-z]{1,6}| ?\d{1,3}| ?[^\sA-Za-z\d]|\s+")
#: Words the emulator "generates"; output text is a pure function of the request.
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "engines",
    "batch",
    "tokens",
    "and",
    "caches",
    "keep",
    "prefixes",
    "warm",
    "so",
    "that",
    "routers",
    "can",
    "send",
    "each",
    "request",
    "where",
    "it",
    "is",
    "served",
    "fastest",
]


def encode(text: str) -> list[int]:
    return [zlib.crc32(piece.encode()) % VOCAB_SIZE for piece in _PIECES.findall(text)]


def count(text: str) -> int:
    return len(_PIECES.findall(text))


def output_piece(seed: int, index: int) -> str:
    """The ``index``-th generated token's text for a request with ``seed``."""
    return " " + _WORDS[(seed + index * 7) % len(_WORDS)]
