"""The emulated model's tokenizer is a real BPE: the ``tokenizer.json`` it writes gives, through the Rust
``tokenizers`` and the gateway's ``ModelTokenizer``, exactly the ids the emulator computes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from emulator import tokens
from emulator.tokens import EmulatorTokenizer, write_tokenizer
from gateway_plugins.tokenization import ModelTokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("emulated-model"))


def corpus() -> list[str]:
    rng = random.Random(5)
    vocabulary = tokens.vocabulary()
    texts = [
        vocabulary.text(vocabulary.segment(np.random.default_rng(1), 300)),
        "Hello, World! It's 2026-12-08 at 10:45; pi = 3.14159265.",
        "  two spaces, a\ttab, and\r\nnewlines\n\n\nthen words",
        "naïve café — crème brûlée, 東京 and Москва; emoji 🚀👩‍💻, RTL שלום, combining e\u0301",
        "no\u00a0break\u2003em space\u200bzero width",
        "averyveryverylongwordwithoutspaces" * 3,
        " " + "x" * 50,
        "",
        "12345678901234567890",
        "<|user|>\nnot special here\n<|assistant|>\n",
    ]
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_\n\té日🙂"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(200)]
    return texts


def test_the_written_tokenizer_gives_the_emulators_ids(folder: Path) -> None:
    rust = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in corpus():
        assert rust.encode(text, add_special_tokens=False).ids == tokens.encode(text), text
        assert rust.decode(tokens.encode(text)) == text


def test_vocabulary_words_are_one_token_each() -> None:
    vocabulary = tokens.vocabulary()
    assert len(vocabulary.words) == 4096
    ids = vocabulary.segment(np.random.default_rng(3), 500)
    assert tokens.encode(vocabulary.text(ids)) == ids


def test_the_gateway_tokenizes_chats_as_the_emulator_does(folder: Path) -> None:
    gateway = ModelTokenizer.load(str(folder))
    emulator = EmulatorTokenizer()
    chats = [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 東京?"},
        ],
        [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
    ]
    for messages in chats:
        assert gateway.encode_chat(messages) == emulator.encode_chat(messages), messages
        assert gateway.encode_chat(messages, add_generation_prompt=False) == emulator.encode_chat(
            messages, add_generation_prompt=False
        )
    for text in corpus()[:20]:
        assert gateway.encode_text(text) == emulator.encode_text(text)
