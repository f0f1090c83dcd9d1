"""Tokenizing a chat prompt piece by piece, so the next turn of a conversation reuses the previous ones.

``tokenizers`` first cuts a text at its added (special) tokens and tokenizes each piece between them on
its own: ``encode(text)`` is the concatenation of the pieces' ids and the special tokens' ids. A chat
template puts special tokens between messages, so the pieces are (mostly) messages, and a conversation's
next request tokenizes only its new ones. ``PieceCache`` makes that cut itself (raw-text tokens first,
leftmost-longest, then tokens matched on normalized text inside the gaps, as the Rust side does) and keeps
the pieces' ids in a bounded LRU. It is used only for tokenizers where the cut provably matches
(``PieceCache.unsupported``) and where probe texts agree with whole-text tokenization at load.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class PieceCache:
    """Token ids of texts assembled from cached pieces; at most ``max_tokens`` ids are kept."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self.misses = 0
        self._pieces: OrderedDict[str, array[int]] = OrderedDict()
        self._lock = threading.Lock()
        added = tokenizer.get_added_tokens_decoder()
        self.ids = {token.content: index for index, token in added.items()}
        self._raw = _alternation(t.content for t in added.values() if not t.normalized)
        self._normalized = _alternation(t.content for t in added.values() if t.normalized)

    @staticmethod
    def unsupported(tokenizer: Tokenizer, spec: Mapping[str, Any]) -> str | None:
        """Why pieces of this tokenizer cannot be tokenized alone (None: they can)."""
        if tokenizer.encode_special_tokens:
            return "split_special_tokens is set"
        added = tokenizer.get_added_tokens_decoder().values()
        if any(t.lstrip or t.rstrip or t.single_word for t in added):
            return "an added token strips whitespace or matches whole words only"
        if any(t.normalized for t in added) and spec.get("normalizer") is not None:
            return "an added token is matched on normalized text"
        if _prepends_first_only(spec.get("pre_tokenizer")):
            return "the pre-tokenizer treats the text's first piece differently"
        return None

    def agrees(self, texts: Sequence[str]) -> bool:
        """Whether piecewise ids equal whole-text ids on ``texts`` (leaves the cache empty)."""
        whole = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        same = all(self.encode(text) == e.ids for text, e in zip(texts, whole, strict=True))
        self.clear()
        return same

    def clear(self) -> None:
        with self._lock:
            self._pieces.clear()
            self.tokens = self.hits = self.misses = 0

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """``(piece, None)`` for text to tokenize, ``("", id)`` for an added token."""
        position = 0
        if self._raw is not None:
            for match in self._raw.finditer(text):
                if match.start() > position:
                    yield from self._split_normalized(text[position : match.start()])
                yield "", self.ids[match.group()]
                position = match.end()
        if position < len(text):
            yield from self._split_normalized(text[position:])

    def _split_normalized(self, text: str) -> Iterator[tuple[str, int | None]]:
        position = 0
        if self._normalized is not None:
            for match in self._normalized.finditer(text):
                if match.start() > position:
                    yield text[position : match.start()], None
                yield "", self.ids[match.group()]
                position = match.end()
        if position < len(text):
            yield text[position:], None

    def encode(self, text: str) -> list[int]:
        """``text``'s ids without added special tokens, as ``tokenizer.encode`` gives them."""
        pieces = list(self.split(text))
        found: dict[str, array[int]] = {}
        missing: list[str] = []
        with self._lock:
            for piece, _ in pieces:
                if not piece or piece in found:
                    continue
                ids = self._pieces.get(piece)
                if ids is None:
                    missing.append(piece)
                    found[piece] = array("i")  # filled below
                else:
                    self._pieces.move_to_end(piece)
                    self.hits += 1
                    found[piece] = ids
            self.misses += len(missing)
        if missing:
            encoded = encode_texts(self.tokenizer, missing, add_special_tokens=False)
            fresh = {piece: array("i", ids) for piece, ids in zip(missing, encoded, strict=True)}
            found.update(fresh)
            self._store(fresh)
        out = array("i")
        for piece, token in pieces:
            if token is None:
                out.extend(found[piece])
            else:
                out.append(token)
        return out.tolist()

    def _store(self, fresh: Mapping[str, array[int]]) -> None:
        with self._lock:
            for piece, ids in fresh.items():
                if len(ids) <= self.max_tokens // 4 and piece not in self._pieces:
                    self._pieces[piece] = ids
                    self.tokens += len(ids)
            while self.tokens > self.max_tokens and self._pieces:
                _, dropped = self._pieces.popitem(last=False)
                self.tokens -= len(dropped)


def encode_texts(tokenizer: Tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """The ids of ``texts`` in one call into Rust (which releases the GIL and may use several cores).
    ``encode_batch_fast`` (tokenizers 0.21+) skips the character offsets nobody here reads: a third faster."""
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]


def _alternation(contents: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching the longest of ``contents`` at the leftmost position (``re`` tries
    alternatives in order, so the longest go first)."""
    ordered = sorted(set(contents), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _prepends_first_only(spec: Any) -> bool:
    """A ``Metaspace`` pre-tokenizer with ``prepend_scheme: first`` marks only the text's first piece."""
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "first":
        return True
    return any(_prepends_first_only(s) for s in spec.get("pretokenizers") or [])


def probe_texts(specials: Sequence[str]) -> list[str]:
    """Texts on which piecewise and whole-text tokenization must agree: special tokens next to words,
    spaces, newlines, each other, and halves of themselves."""
    texts = ["plain text  with\tspaces\n\nand lines", " leading space", "trailing space ", "日本語 ümlaut 🙂"]
    for special in list(specials)[:16] or ["<s>"]:
        half = len(special) // 2
        texts += [
            special,
            f"a{special}b",
            f" {special} ",
            f"\n{special}\nhello world\n",
            f"x {special}{special}  y",
            f"{special[:half]} {special[half:]}",
        ]
    return texts
