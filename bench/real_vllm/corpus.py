"""A deterministic corpus of chat and completion requests for comparing the gateway's token ids with vLLM's.

``tokenization_corpus()`` draws requests that stress what tokenization gets wrong: system prompts or
none, multi-turn conversations with tool calls and tool results, content-part lists, developer messages,
scripts and marks (CJK, emoji with modifiers and joiners, combining accents, right-to-left text, zero-width
and unusual spaces), whitespace at the edges, text that looks like (or is) a special token, and prompts
close to the tiny model's 512-token context. ``invalid_chats()`` are requests the tiny model's template
refuses. Each request's ``body`` is what ``POST /tokenize`` takes, less ``model``; ``generation_body()``
turns it into a ``max_tokens: 1`` request for the OpenAI endpoints. Used by tests/real_vllm and benchmarks.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from bench.real_vllm.tiny_model import WORDS

#: Snippets the tokenizer sees rarely or never whole: each script, mark and space class once or more.
UNICODE = [
    "日本語のテキストを分割する",
    "中文分词测试，标点符号！",  # noqa: RUF001 - full-width punctuation on purpose
    "한국어 문장입니다",
    "emoji 🙂👍🏽 and a family 👩‍👩‍👧 and a flag 🇫🇷",
    "combining: e\u0301 n\u0303 a\u030a \u0915\u094d\u0937",
    "Ελληνικά και Кириллица",
    "مرحبا بالعالم والنص من اليمين",
    "שלום עולם \u200fמימין לשמאל\u200e",  # noqa: RUF001 - Hebrew on purpose
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "no-break\u00a0space thin\u2009space ideographic\u3000space",
    "math ∑∫√∞ ≤ ≥ ≠ and arrows → ⇒ ↔",
    "accents: café naïve résumé Ångström",
    "\u202eoverride\u202c and \u2066isolate\u2069",
]
#: Whitespace at the edges and inside, which templates' trim and the pre-tokenizer treat differently.
WHITESPACE = ["", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\n\t  \n"]
#: Text that is, or looks like, a special token of the tiny model (the first four are real ones).
SPECIAL_LOOKING = [
    "<s>",
    "</s>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "< s>",
    "<|user",
    "|>",
    "<|im_start|>",
    "[INST]",
    "<<SYS>>",
    "<unk>",
    "<pad>",
    "<|tool|>",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city (température)",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "城市"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_sql",
            "description": "Run a read-only SQL query <select only>",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            "strict": True,
        },
    },
    {"type": "function", "function": {"name": "no_arguments"}},
]
MAX_MODEL_LEN = 512  # the tiny model's context in tests/real_vllm (brickyard.stack's vLLM flags)
#: Drawn requests stay under this many tokens by ``estimated_tokens`` (an overestimate for the tiny
#: model's tokenizer), so every request of the corpus can also run as a generation.
DRAWN_BUDGET = 480
_WORD_SET = frozenset(WORDS)

Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class CorpusRequest:
    """One request: ``body`` is a ``POST /tokenize`` body without ``model``."""

    name: str
    kind: Kind
    body: dict[str, Any]

    def tokenize_body(self, model: str) -> dict[str, Any]:
        return {"model": model, **self.body}

    def generation_body(self, model: str) -> tuple[str, dict[str, Any]]:
        """The same prompt as a one-token generation: (path, body)."""
        if self.kind == "completion":
            return "/v1/completions", {"model": model, "prompt": self.body["prompt"], "max_tokens": 1}
        body = {"model": model, "max_tokens": 1, **self.body}
        if "tools" in body:
            body["tool_choice"] = "none"  # "auto" needs a tool parser; "none" still renders the tools
        return "/v1/chat/completions", body


class _Draw:
    """Random text from the tiny model's words, unicode snippets and whitespace."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def words(self, low: int, high: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(low, high)))

    def text(self, low: int = 3, high: int = 30) -> str:
        """Words, sometimes with a unicode snippet, a special-looking string or odd whitespace mixed in."""
        pieces = [self.words(low, high)]
        roll = self.rng.random()
        if roll < 0.3:
            pieces.insert(self.rng.randint(0, 1), self.rng.choice(UNICODE))
        elif roll < 0.4:
            pieces.insert(self.rng.randint(0, 1), self.rng.choice(SPECIAL_LOOKING))
        text = self.rng.choice([" ", "\n", " \n", "\t"]).join(pieces)
        if self.rng.random() < 0.25:
            text = self.rng.choice(WHITESPACE) + text + self.rng.choice(WHITESPACE)
        return text

    def content(self, text: str) -> str | list[Any]:
        """The text as a string, or split into a content-part list (text parts, plain strings)."""
        if self.rng.random() < 0.7:
            return text
        cut = self.rng.randint(0, len(text))
        parts: list[Any] = [{"type": "text", "text": text[:cut]}, {"type": "text", "text": text[cut:]}]
        if self.rng.random() < 0.3:
            parts.append(self.rng.choice(["a plain string part", {"type": "text", "text": self.words(1, 5)}]))
        if self.rng.random() < 0.2:
            parts[0]["cache_control"] = {"type": "ephemeral"}
        return parts

    def tool_call(self, index: int) -> dict[str, Any]:
        tool = self.rng.choice(TOOLS)["function"]["name"]
        arguments: Any = {
            "get_weather": {
                "city": self.rng.choice(["Paris", "東京", "Zürich", "القاهرة"]),
                "unit": "celsius",
            },
            "run_sql": {"query": f"select {self.rng.choice(WORDS)} from t where a < 3 and b > 'x'"},
            "no_arguments": {},
        }[tool]
        encoded = json.dumps(arguments, ensure_ascii=self.rng.random() < 0.5)
        if self.rng.random() < 0.1:
            encoded = self.rng.choice(["{not json", "[]", "", "42"])  # vLLM coerces these to {}
        return {"id": f"call_{index}", "type": "function", "function": {"name": tool, "arguments": encoded}}


def _conversation(draw: _Draw, turns: int, *, system: bool, calls: bool) -> list[dict[str, Any]]:
    rng = draw.rng
    longest = max(6, 48 // turns)  # words per message: longer conversations, shorter messages
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": draw.content(draw.text(2, 20))})
    for turn in range(turns):
        messages.append({"role": "user", "content": draw.content(draw.text(3, longest))})
        if turn == turns - 1:
            break
        if calls and rng.random() < 0.7:
            calls = [draw.tool_call(turn * 10 + i) for i in range(rng.randint(1, 2))]
            content = None if rng.random() < 0.5 else draw.words(1, 6)
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
            for call in calls:
                result = draw.content(draw.text(1, 10))
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            messages.append({"role": "assistant", "content": draw.text(2, 12)})
        else:
            messages.append({"role": "assistant", "content": draw.content(draw.text(2, longest))})
    return messages


def estimated_tokens(body: dict[str, Any]) -> int:
    """At least the tiny model's token count for ``body`` (checked by tests/real_vllm): a vocabulary word
    is one token, anything else at most one per UTF-8 byte, plus the template's markup."""
    total = 2
    for text in _strings(body.get("messages", body.get("prompt"))):
        for piece in re.split(r"(\s+)", text):
            if piece.isspace():
                total += len(piece)
            elif piece:
                total += 1 if piece in _WORD_SET else len(piece.encode())
    total += 12 * len(body.get("messages", []))
    if body.get("tools"):
        total += 60 + 40 * len(body["tools"]) + len(json.dumps(body["tools"], ensure_ascii=False).encode())
    return total


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _long_chat(draw: _Draw, words: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": draw.words(words, words)}]


def tokenization_corpus(seed: int = 14, size: int = 240) -> list[CorpusRequest]:
    """``size`` requests (about 3 chats to 1 completion), the same for the same seed."""
    rng = random.Random(seed)
    draw = _Draw(rng)
    out: list[CorpusRequest] = []

    def add(kind: Kind, label: str, body: dict[str, Any]) -> None:
        out.append(CorpusRequest(f"{len(out):03d}-{label}", kind, body))

    # Fixed cases first: the edges each run must cover whatever the seed draws.
    add("chat", "lone-user", {"messages": [{"role": "user", "content": "hello there"}]})
    add("chat", "empty-content", {"messages": [{"role": "user", "content": ""}]})
    add("chat", "whitespace-only", {"messages": [{"role": "user", "content": " \n\t "}]})
    add(
        "chat",
        "special-tokens-in-content",
        {"messages": [{"role": "user", "content": " ".join(SPECIAL_LOOKING)}]},
    )
    half = len(UNICODE) // 2
    add("chat", "unicode-a", {"messages": [{"role": "user", "content": "\n".join(UNICODE[:half])}]})
    add("chat", "unicode-b", {"messages": [{"role": "user", "content": "\n".join(UNICODE[half:])}]})
    add(
        "chat",
        "system-with-edges",
        {"messages": [{"role": "system", "content": "\n  be brief  \n"}, {"role": "user", "content": "hi"}]},
    )
    add(
        "chat", "tools-no-system", {"messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS[:2]}
    )
    add(
        "chat",
        "developer-first",
        {
            "messages": [
                {"role": "developer", "content": "answer in sql"},
                {"role": "user", "content": "count"},
            ]
        },
    )
    add(
        "chat",
        "developer-late",
        {
            "messages": [
                {"role": "system", "content": "one"},
                {"role": "user", "content": "a"},
                {"role": "developer", "content": "two"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
    )
    add(
        "chat",
        "continue-final",
        {
            "messages": [
                {"role": "user", "content": "name a city"},
                {"role": "assistant", "content": "The city "},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    )
    add(
        "chat",
        "no-generation-prompt",
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "add_generation_prompt": False,
        },
    )
    add(
        "chat",
        "part-types",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        "a bare string part",
                        {"type": "text", "text": "a text part"},
                        {"type": "input_text", "text": "an input_text part"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot"}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": None}, {"type": "text", "text": "after"}],
                },
            ]
        },
    )
    add(
        "chat",
        "system-billing-header",
        {
            "messages": [
                {"role": "system", "content": "x-anthropic-billing-header: cch=1234\nthe real system prompt"},
                {"role": "user", "content": "hi"},
            ]
        },
    )
    add(
        "chat",
        "chat-template-kwargs",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {"ignored": 1, "bos_token": ""},
        },
    )
    odd_arguments = ["{not json", "[]", "", '{"b": 2, "a": "\\u00e9t\\u00e9"}']
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "run_sql", "arguments": arguments}}
        for i, arguments in enumerate(odd_arguments)
    ]
    add(
        "chat",
        "tool-call-arguments",
        {
            "messages": [
                {"role": "user", "content": "run them"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                *({"role": "tool", "tool_call_id": c["id"], "content": f"result {c['id']}"} for c in calls),
                {"role": "assistant", "content": "done", "tool_calls": []},
                {"role": "user", "content": "thanks"},
            ]
        },
    )
    add("completion", "plain", {"prompt": "the model token cache"})
    add("completion", "empty-ish", {"prompt": " "})
    add("completion", "special-tokens", {"prompt": "".join(SPECIAL_LOOKING)})
    add("completion", "bos-inside", {"prompt": "<s>already a bos</s> then text"})
    add("completion", "unicode-a", {"prompt": " | ".join(UNICODE[:half])})
    add("completion", "unicode-b", {"prompt": " | ".join(UNICODE[half:])})
    add("completion", "chat-looking", {"prompt": "<s><|user|>\nhi\n<|assistant|>\n"})
    # Near the context: the lone-user template costs 5 tokens around the words, which are one token each
    # (the tokenizer's own vocabulary), so 500 words make 505 tokens with the generation prompt.
    for words in (300, 420, 480, 500):
        add("chat", f"long-{words}", {"messages": _long_chat(draw, words)})
    for words in (300, 490, 505):
        add("completion", f"long-{words}", {"prompt": draw.words(words, words)})

    while len(out) < size:
        if rng.random() < 0.25:
            prompt = draw.text(1, 60) if rng.random() < 0.8 else draw.words(150, 250)
            add("completion", "random", {"prompt": prompt})
            continue
        turns = rng.choice([1, 1, 2, 3, 4, 5, 6])
        system = rng.random() < 0.5
        calls = turns > 1 and rng.random() < 0.35  # assistant tool calls and tool results in the history
        declared = rng.random() < 0.2  # the request declares tools (the template prints them as JSON)
        label = f"{turns}-turn" + ("-system" if system else "") + ("-calls" if calls else "")
        label += "-tools" if declared else ""
        for _ in range(50):  # draw again until it fits the context
            body: dict[str, Any] = {"messages": _conversation(draw, turns, system=system, calls=calls)}
            if declared:
                body["tools"] = rng.sample(TOOLS, 1 if calls else rng.randint(1, 2))
            if estimated_tokens(body) <= DRAWN_BUDGET:
                add("chat", label, body)
                break
    return out


def invalid_chats() -> list[CorpusRequest]:
    """Chats the tiny model's template refuses (``raise_exception``): vLLM and the gateway both say no."""
    user, assistant = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    cases = {
        "unknown-role": [user, {"role": "narrator", "content": "x"}],
        "assistant-first": [assistant, user],
        "two-users": [user, user],
        "late-system": [user, assistant, {"role": "system", "content": "x"}, user],
        "tool-after-user": [user, {"role": "tool", "tool_call_id": "c", "content": "x"}],
        "empty": [],
    }
    return [CorpusRequest(f"invalid-{name}", "chat", {"messages": m}) for name, m in cases.items()]
