"""What exact tokenization costs on the request path: ``ModelTokenizer.encode_chat`` p50/p99 in µs.

    python -m bench.tokenization [--tokenizer SOURCE] [--tokens 8000] [--repeat 200]

SOURCE is a tokenizer folder or hf://org/repo (default: the tiny model of tests/real_vllm when it is
built, else the same kind of tokenizer trained here: byte-level BPE, 1,024 tokens, the same chat
template). Cases, each timed on one thread with nothing else running in the process:

* ``short``, ``short-whole``: a one-message chat (~20 tokens), piece cache on and off;
* ``long-whole``: a ~N-token multi-turn chat, tokenized whole (piece cache off);
* ``long-new``: ~N-token chats never seen before, piece cache on (every piece a miss);
* ``long-repeat``: the same ~N-token chat again (every piece a hit);
* ``long-next-turn``: each request one turn longer than the previous one of its conversation (the
  earlier turns' pieces are hits, the new turn's are misses), as a chat client sends them;
* ``render-only``: the chat template alone, for the ~N-token chat;
* ``completion``: a ~N-token completions prompt (``encode_text``, no cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.real_vllm import tiny_model
from gateway_plugins.tokenization import ModelTokenizer

Messages = list[dict[str, Any]]


def default_source() -> str:
    """The tiny model's tokenizer folder if built, else a folder with an equivalent tokenizer made here."""
    digest = hashlib.sha256(Path(tiny_model.__file__).read_bytes()).hexdigest()[:16]
    built = tiny_model.CACHE / f"tiny-llama-{digest}" / "model"
    if (built / "tokenizer.json").is_file():
        return str(built)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tiny_model.VOCAB,
        special_tokens=tiny_model.SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_model.corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "TokenizersBackend"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(tiny_model.CHAT_TEMPLATE)
    return str(folder)


def conversation(rng: random.Random, model: ModelTokenizer, tokens: int) -> Messages:
    """A system prompt and alternating turns of ~100-400 tokens until the chat has ``tokens`` tokens."""
    words = tiny_model.WORDS
    messages: Messages = [{"role": "system", "content": " ".join(rng.choice(words) for _ in range(60))}]
    while True:
        role = "user" if messages[-1]["role"] != "user" else "assistant"
        messages.append(
            {"role": role, "content": " ".join(rng.choice(words) for _ in range(rng.randint(100, 400)))}
        )
        if role == "user" and len(model.encode_chat(messages)) >= tokens:
            return messages


def timed(call: Callable[[int], object], repeat: int) -> dict[str, float]:
    """p50/p99/mean of ``call(i)`` in µs over ``repeat`` calls (after 3 warm-up calls)."""
    for i in range(3):
        call(-1 - i)
    samples = []
    for i in range(repeat):
        started = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - started) / 1000)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "mean_us": statistics.fmean(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="folder or hf://org/repo (default: the tiny model)")
    parser.add_argument("--tokens", type=int, default=8000, help="size of the long chat prompt")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    source = args.tokenizer or default_source()
    whole = ModelTokenizer.load(source, cache_tokens=0)
    cached = ModelTokenizer.load(source)
    rng = random.Random(14)
    short: Messages = [{"role": "user", "content": "tell me about the history of the ocean and the river"}]
    long_chat = conversation(rng, whole, args.tokens)
    fresh = [conversation(random.Random(1000 + i), whole, args.tokens) for i in range(args.repeat + 3)]
    # Conversations whose next request adds one turn: request i is conversation i % 8 after its k-th turn.
    growing = [conversation(random.Random(5000 + i), whole, args.tokens + 2000) for i in range(8)]
    starts = [
        next(n for n in range(2, len(c)) if len(whole.encode_chat(c[:n])) >= args.tokens) for c in growing
    ]

    def next_turn(i: int) -> object:
        if i < 0:  # warm-up: the conversations' first requests
            return [cached.encode_chat(c[:n]) for c, n in zip(growing, starts, strict=True)]
        chat, start = growing[i % 8], starts[i % 8]
        length = min(len(chat), start + 2 * (1 + i // 8))
        return cached.encode_chat(chat[: length if chat[length - 1]["role"] == "user" else length - 1])

    prompt = " ".join(tiny_model.WORDS[i % len(tiny_model.WORDS)] for i in range(args.tokens))
    cases = {
        "short": (lambda _: cached.encode_chat(short), len(whole.encode_chat(short))),
        "short-whole": (lambda _: whole.encode_chat(short), len(whole.encode_chat(short))),
        "long-whole": (lambda _: whole.encode_chat(long_chat), len(whole.encode_chat(long_chat))),
        "long-new": (lambda i: cached.encode_chat(fresh[i]), len(whole.encode_chat(fresh[0]))),
        "long-repeat": (lambda _: cached.encode_chat(long_chat), len(whole.encode_chat(long_chat))),
        "long-next-turn": (next_turn, args.tokens),
        "render-only": (lambda _: whole.render_chat(long_chat), len(whole.encode_chat(long_chat))),
        "completion": (lambda _: whole.encode_text(prompt), len(whole.encode_text(prompt))),
    }
    for name, (call, tokens) in cases.items():
        result = timed(call, args.repeat)
        row = {"case": name, "tokens": tokens} | {k: round(v, 1) for k, v in result.items()}
        print(json.dumps(row), flush=True)
    assert cached.pieces is not None and all(
        cached.encode_chat(c) == whole.encode_chat(c) for c in fresh[:5]
    ), "piecewise ids differ"


if __name__ == "__main__":
    main()
