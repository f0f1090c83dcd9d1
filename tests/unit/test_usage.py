"""Token usage is read exactly from vLLM responses, whatever the chunking, and stripping removes only
the usage-only chunk."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_plugins.tenancy import usage as usage_module
from gateway_plugins.tenancy.usage import JsonUsage, SseUsage, Usage, usage_from_json

CHAT_JSON = (
    b'{"id":"chatcmpl-8f3c2a","object":"chat.completion","created":1718000000,'
    b'"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! How can I help?","refusal":null,"annotations":null,"audio":null,"function_call":null,'
    b'"tool_calls":[],"reasoning_content":null},"logprobs":null,"finish_reason":"stop","stop_reason":null}],'
    b'"service_tier":null,"system_fingerprint":null,"usage":{"prompt_tokens":12,"total_tokens":21,'
    b'"completion_tokens":9,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}'
)
COMPLETIONS_JSON = (
    b'{"id":"cmpl-5d1e","object":"text_completion","created":1718000001,"model":"Qwen/Qwen2.5-0.5B",'
    b'"choices":[{"index":0,"text":" a city in France","logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null,"prompt_logprobs":null}],"service_tier":null,"system_fingerprint":null,'
    b'"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7,"prompt_tokens_details":null},'
    b'"kv_transfer_params":null}'
)
EMBEDDINGS_JSON = (
    b'{"id":"embd-77a0","object":"list","created":1718000002,"model":"BAAI/bge-m3",'
    b'"data":[{"index":0,"object":"embedding","embedding":[0.0123,-0.0456,0.0789]}],'
    b'"usage":{"prompt_tokens":8,"total_tokens":8}}'
)
RESPONSES_JSON = (
    b'{"id":"resp_0b2c","created_at":1718000003,"instructions":null,"metadata":null,'
    b'"model":"openai/gpt-oss-20b","object":"response","output":[{"id":"msg_1","content":[{"annotations":[],'
    b'"text":"Hi there","type":"output_text","logprobs":null}],"role":"assistant","status":"completed",'
    b'"type":"message"}],"parallel_tool_calls":true,"temperature":1.0,"tool_choice":"auto","tools":[],'
    b'"top_p":1.0,"background":false,"max_output_tokens":100,"status":"completed","text":null,'
    b'"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15},"user":null}'
)
VLLM_ERROR_JSON = (
    b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.",'
    b'"type":"BadRequestError","param":null,"code":400}'
)
OPENAI_ERROR_JSON = (
    b'{"error":{"message":"The model `nope` does not exist.","type":"NotFoundError","param":null,"code":404}}'
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (CHAT_JSON, Usage(12, 9, 21)),
        (COMPLETIONS_JSON, Usage(5, 7, 12)),
        (EMBEDDINGS_JSON, Usage(8, 0, 8)),
        (RESPONSES_JSON, Usage(10, 5, 15)),
        (VLLM_ERROR_JSON, None),
        (OPENAI_ERROR_JSON, None),
        (b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}', Usage(3, 4, 7)),  # total derived
        (b'{"usage":{"prompt_tokens":3.0,"completion_tokens":4,"total_tokens":7.0}}', Usage(3, 4, 7)),
        (b'{"usage":{"prompt_tokens":3,"completion_tokens":true}}', Usage(3, 0, 3)),  # bool: missing
        (b'{"usage":{"prompt_tokens":3,"completion_tokens":1.5,"total_tokens":-1}}', Usage(3, 0, 3)),
        (b'{"usage":{"prompt_tokens":true,"completion_tokens":4}}', None),
        (b'{"usage":{"prompt_tokens":-3,"completion_tokens":4}}', None),
        (b'{"usage":{"prompt_tokens":"3","completion_tokens":4}}', None),
        (b'{"usage":{"completion_tokens":4,"total_tokens":4}}', None),
        (b'{"usage":null}', None),
        (b'{"usage":[1,2,3]}', None),
        (b'[{"usage":{"prompt_tokens":1}}]', None),
        (b'{"usage":{"prompt_tokens":1,', None),
        (b"not json", None),
        (b"", None),
        (b"\xff\xfe{}", None),
    ],
)
def test_usage_from_json(body: bytes, expected: Usage | None) -> None:
    assert usage_from_json(body) == expected


@pytest.mark.parametrize("size", [1, 3, 64, 10_000])
def test_json_usage_accumulates_any_chunking(size: int) -> None:
    for body in (CHAT_JSON, COMPLETIONS_JSON, EMBEDDINGS_JSON, RESPONSES_JSON, VLLM_ERROR_JSON):
        reader = JsonUsage()
        reader.feed(b"")
        for i in range(0, len(body), size):
            reader.feed(body[i : i + size])
        assert reader.finish() == usage_from_json(body)


def test_json_usage_drops_an_oversized_body() -> None:
    reader = JsonUsage(max_bytes=len(CHAT_JSON) - 1)
    reader.feed(CHAT_JSON[:100])
    reader.feed(CHAT_JSON[100:])
    assert reader.finish() is None
    assert JsonUsage().finish() is None


# --- streams -------------------------------------------------------------------------------------------


def chunk_event(payload: dict, sep: bytes = b"\n") -> bytes:
    return b"data: " + orjson.dumps(payload) + sep + sep


def chat_chunk(delta: dict, finish: str | None = None, **extra: object) -> dict:
    return {
        "id": "chatcmpl-a1b2",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def usage_chunk(prompt: int, completion: int) -> dict:
    return {
        "id": "chatcmpl-a1b2",
        "object": "chat.completion.chunk",
        "created": 1718000000,
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        },
    }


INCLUDE_USAGE_EVENTS = [
    chunk_event(chat_chunk({"role": "assistant", "content": ""})),
    chunk_event(chat_chunk({"content": "Hel"})),
    chunk_event(chat_chunk({"content": "lo, "}, usage=None)),
    b'data: {"id":"chatcmpl-a1b2","object":"chat.completion.chunk","created":1718000000,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"w\xc3\xb6rld \xf0\x9f\x8c\x8d"},"logprobs":null,'
    b'"finish_reason":null}],"usage": null}\n\n',
    chunk_event(chat_chunk({"content": "usage"})),  # a content token that looks like the key
    chunk_event(chat_chunk({"content": ""}, finish="stop", stop_reason=None)),
]
USAGE_EVENT = chunk_event(usage_chunk(17, 6))
DONE = b"data: [DONE]\n\n"
INCLUDE_USAGE_STREAM = b"".join([*INCLUDE_USAGE_EVENTS, USAGE_EVENT, DONE])


def feed_all(parser: SseUsage, chunks: list[bytes]) -> bytes:
    return b"".join([parser.feed(chunk) for chunk in chunks]) + parser.finish()


@pytest.mark.parametrize("size", [1, 2, 5, 17, 1 << 20])
def test_include_usage_stream(size: int) -> None:
    chunks = [INCLUDE_USAGE_STREAM[i : i + size] for i in range(0, len(INCLUDE_USAGE_STREAM), size)]
    observer = SseUsage()
    assert feed_all(observer, chunks) == INCLUDE_USAGE_STREAM
    assert observer.usage == Usage(17, 6, 23)
    stripper = SseUsage(strip_usage_chunk=True)
    assert feed_all(stripper, chunks) == b"".join([*INCLUDE_USAGE_EVENTS, DONE])
    assert stripper.usage == Usage(17, 6, 23)


def test_stream_without_usage_has_none() -> None:
    stream = b"".join([*INCLUDE_USAGE_EVENTS, DONE])
    for strip in (False, True):
        parser = SseUsage(strip)
        assert feed_all(parser, [stream]) == stream
        assert parser.usage is None


def test_continuous_usage_stats_last_wins() -> None:
    events = [
        chunk_event(chat_chunk({"role": "assistant", "content": ""}, usage=usage_chunk(9, 0)["usage"])),
        *(
            chunk_event(chat_chunk({"content": f"t{i}"}, usage=usage_chunk(9, i)["usage"]))
            for i in range(1, 5)
        ),
        chunk_event(chat_chunk({"content": ""}, finish="length", usage=usage_chunk(9, 5)["usage"])),
    ]
    parser = SseUsage()
    feed_all(parser, [*events, DONE])
    assert parser.usage == Usage(9, 5, 14)
    # Stripping removes only the usage-only chunk; chunks with choices keep their usage.
    stripper = SseUsage(strip_usage_chunk=True)
    assert feed_all(stripper, [*events, chunk_event(usage_chunk(9, 6)), DONE]) == b"".join([*events, DONE])
    assert stripper.usage == Usage(9, 6, 15)


def responses_event(kind: str, payload: dict, sep: bytes = b"\n") -> bytes:
    return b"event: " + kind.encode() + sep + chunk_event({**payload, "type": kind}, sep)


def test_responses_api_stream() -> None:
    base = {"id": "resp_1", "object": "response", "model": "openai/gpt-oss-20b", "output": []}
    stream = b"".join(
        [
            responses_event(
                "response.created", {"response": {**base, "status": "in_progress", "usage": None}}
            ),
            responses_event("response.in_progress", {"response": {**base, "status": "in_progress"}}),
            responses_event(
                "response.output_text.delta", {"delta": "Hi", "item_id": "msg_1", "output_index": 0}
            ),
            responses_event(
                "response.output_text.done", {"text": "Hi", "item_id": "msg_1", "output_index": 0}
            ),
            responses_event(
                "response.completed",
                {
                    "response": {
                        **base,
                        "status": "completed",
                        "usage": {
                            "input_tokens": 10,
                            "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": 2,
                            "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": 12,
                        },
                    },
                    "sequence_number": 9,
                },
            ),
        ]
    )
    for strip in (False, True):
        parser = SseUsage(strip)
        assert feed_all(parser, [stream[i : i + 3] for i in range(0, len(stream), 3)]) == stream
        assert parser.usage == Usage(10, 2, 12)


def test_sse_field_syntax() -> None:
    # No space after the colon, a multi-line data field, comments, id/retry fields, CR line ends.
    stream = (
        b": keep-alive\r\r"
        b'id: 7\rretry: 1000\rdata:{"choices":[],\r: inside\rdata:"usage":{"prompt_tokens":4,\r'
        b'data: "completion_tokens":2}}\r\r'
        b"data: [DONE]\r\r"
    )
    stripper = SseUsage(strip_usage_chunk=True)
    assert feed_all(stripper, [stream]) == b": keep-alive\r\rdata: [DONE]\r\r"
    assert stripper.usage == Usage(4, 2, 6)


def test_an_event_ending_in_cr_waits_for_the_next_byte() -> None:
    stripper = SseUsage(strip_usage_chunk=True)
    # CR-terminated: complete once the next byte is not LF.
    assert stripper.feed(b"data: 1\r\r") == b""
    assert stripper.feed(b"d") == b"data: 1\r\r"
    # CRLF-terminated, cut between the last CR and LF: the LF belongs to the event.
    assert stripper.feed(b'ata: {"choices":[],"usage":{"prompt_tokens":1}}\r\n\r') == b""
    assert stripper.feed(b"\ndata: [DONE]\r\n\r") == b""
    assert stripper.finish() == b"data: [DONE]\r\n\r"
    assert stripper.usage == Usage(1, 0, 1)


def test_truncated_stream_counts_and_flushes_the_last_event() -> None:
    stripper = SseUsage(strip_usage_chunk=True)
    assert stripper.feed(b"data: x\n\ndata: y") == b"data: x\n\n"
    assert stripper.finish() == b"data: y"
    stripper = SseUsage(strip_usage_chunk=True)
    assert stripper.feed(b"data: x\n\n" + USAGE_EVENT[:-2]) == b"data: x\n\n"
    assert stripper.finish() == b""
    assert stripper.usage == Usage(17, 6, 23)
    observer = SseUsage()
    observer.feed(USAGE_EVENT[:-1])
    assert observer.finish() == b""
    assert observer.usage == Usage(17, 6, 23)


def test_oversized_event_passes_through_unparsed() -> None:
    big = chunk_event(chat_chunk({"content": "x" * 500}))
    stream = big + USAGE_EVENT + big + DONE
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    stripper = SseUsage(strip_usage_chunk=True, max_event_bytes=300)
    out = []
    for chunk in chunks:
        out.append(stripper.feed(chunk))
        assert len(stripper._buf) <= 300 + 7
    assert b"".join(out) + stripper.finish() == big + big + DONE
    assert stripper.usage == Usage(17, 6, 23)
    observer = SseUsage(max_event_bytes=300)
    assert all(observer.feed(chunk) is chunk for chunk in chunks)
    assert observer.finish() == b""
    assert observer.usage == Usage(17, 6, 23)
    # The chunk that makes an event oversized ends inside its blank line.
    for sep in (b"\n", b"\r\n", b"\r"):
        big = chunk_event(chat_chunk({"content": "x" * 500}), sep)
        usage = chunk_event(usage_chunk(17, 6), sep)
        for cut in range(len(big) - len(sep) - 1, len(big) + 1):
            stripper = SseUsage(strip_usage_chunk=True, max_event_bytes=300)
            out = stripper.feed(big[:cut]) + stripper.feed(big[cut:] + usage) + stripper.feed(b"data: [DONE]")
            assert out + stripper.finish() == big + b"data: [DONE]"
            assert stripper.usage == Usage(17, 6, 23)
    # An oversized usage event is not read (nor stripped).
    stripper = SseUsage(strip_usage_chunk=True, max_event_bytes=50)
    assert feed_all(stripper, chunks) == stream
    assert stripper.usage is None


# --- properties ----------------------------------------------------------------------------------------


@dataclass
class Stream:
    events: list[bytes]
    usage_only: list[bool]  # which events stripping removes
    usage: Usage | None

    @property
    def raw(self) -> bytes:
        return b"".join(self.events)

    @property
    def stripped(self) -> bytes:
        return b"".join(e for e, cut in zip(self.events, self.usage_only, strict=True) if not cut)


texts = st.sampled_from(["usage", '"usage": null', '"usage":{', "data: x\n\n", "\r\n"])


def data_lines(payload: dict, multiline: bool, space: bool) -> list[bytes]:
    """The payload as data lines; multi-line splits it between top-level members (still valid JSON)."""
    prefix = b"data: " if space else b"data:"
    members = [orjson.dumps(k) + b":" + orjson.dumps(v) for k, v in payload.items()]
    if not multiline:
        return [prefix + b"{" + b",".join(members) + b"}"]
    pieces = [m + b"," for m in members[:-1]] + [members[-1] + b"}"]
    pieces[0] = b"{" + pieces[0]
    return [prefix + p for p in pieces]


@st.composite
def streams(
    draw: st.DrawFn,
    usage_modes: tuple[str, ...] = ("none", "include", "continuous", "both"),
    text_size: int = 12,
) -> Stream:
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    mode = draw(st.sampled_from(usage_modes))
    null_usage = draw(st.booleans())
    events: list[bytes] = []
    usage_only: list[bool] = []
    last: Usage | None = None

    def add(lines: list[bytes], cut: bool = False) -> None:
        if draw(st.booleans()):
            lines = [b": keep-alive", *lines] if draw(st.booleans()) else [b"id: 1", *lines]
        events.append(b"".join(line + sep for line in lines) + sep)
        usage_only.append(cut)
        if draw(st.integers(0, 4)) == 0:  # a stray blank line or a comment event between events
            events.append(draw(st.sampled_from([sep, b": ping" + sep + sep])))
            usage_only.append(False)

    prompt = draw(st.integers(0, 10**6))
    contents = draw(st.lists(st.text(max_size=text_size) | texts, max_size=6))
    last_delta = {"content": draw(st.text(max_size=text_size))} if draw(st.booleans()) else {}
    deltas = [{"role": "assistant", "content": ""}, *({"content": t} for t in contents), last_delta]
    for i, delta in enumerate(deltas):
        finish = "stop" if i == len(deltas) - 1 else None
        extra: dict = {}
        if mode in ("continuous", "both"):
            extra["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt + i, "completion_tokens": i}
            last = Usage(prompt, i, prompt + i)
        elif null_usage:
            extra["usage"] = None
        add(data_lines(chat_chunk(delta, finish, **extra), draw(st.booleans()), draw(st.booleans())))
    if mode in ("include", "both"):
        completion = draw(st.integers(0, 10**6))
        add(data_lines(usage_chunk(prompt, completion), draw(st.booleans()), draw(st.booleans())), cut=True)
        last = Usage(prompt, completion, prompt + completion)
    add([b"data: [DONE]"])
    return Stream(events, usage_only, last)


@st.composite
def splits(draw: st.DrawFn, raw: bytes) -> list[bytes]:
    if draw(st.integers(0, 5)) == 0:
        return [raw[i : i + 1] for i in range(len(raw))]
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=40)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def ready_at(stream: Stream) -> list[float]:
    """When each event must have been forwarded: at its last byte, or one later if that is a CR."""
    total = len(stream.raw)
    out: list[float] = []
    end = 0
    for event in stream.events:
        end += len(event)
        if event.endswith(b"\r"):
            out.append(end + 1 if end < total else float("inf"))
        else:
            out.append(end)
    return out


def check_stream(stream: Stream, chunks: list[bytes], max_event_bytes: int = 16 << 20) -> None:
    raw = stream.raw
    whole = SseUsage()
    assert whole.feed(raw) is raw
    whole.finish()
    assert whole.usage == stream.usage

    observer = SseUsage(max_event_bytes=max_event_bytes)
    for chunk in chunks:
        assert observer.feed(chunk) is chunk
    assert observer.finish() == b""
    assert observer.usage == stream.usage

    stripper = SseUsage(strip_usage_chunk=True, max_event_bytes=max_event_bytes)
    expected = stream.stripped
    ready = ready_at(stream)
    forwarded = b""
    fed = 0
    for chunk in chunks:
        forwarded += stripper.feed(chunk)
        fed += len(chunk)
        due = b"".join(
            e
            for e, cut, at in zip(stream.events, stream.usage_only, ready, strict=True)
            if at <= fed and not cut
        )
        assert expected.startswith(forwarded)
        assert len(forwarded) >= len(due)  # no complete event held back
    assert forwarded + stripper.finish() == expected
    assert stripper.usage == stream.usage


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_stream_any_split(data: st.DataObject) -> None:
    stream = data.draw(streams())
    check_stream(stream, data.draw(splits(stream.raw)))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_split_with_oversized_content_events(data: st.DataObject) -> None:
    stream = data.draw(streams(usage_modes=("none", "include"), text_size=200))
    # Small enough to skip some content events, large enough for the usage event.
    floor = max(
        len(e) for e, cut in zip(stream.events, stream.usage_only, strict=True) if cut or b"[DONE]" in e
    )
    max_event_bytes = data.draw(st.integers(floor, floor + 300))
    check_stream(stream, data.draw(splits(stream.raw)), max_event_bytes=max_event_bytes)


fragments = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"event: x",
        b": c",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b'"usage"',
        b'"usage":null',
        b'"usage": null',
        b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}',
        b'{"response":{"usage":{"input_tokens":3}}}',
        b"[DONE]",
        b"\xf0\x9f",
        b"{",
        b"}",
    ]
) | st.binary(max_size=8)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_garbage_never_raises_and_ignores_chunking(data: st.DataObject) -> None:
    raw = b"".join(data.draw(st.lists(fragments, max_size=40)))
    chunks = data.draw(splits(raw))
    for strip in (False, True):
        whole = SseUsage(strip)
        reference = feed_all(whole, [raw])
        parser = SseUsage(strip)
        outputs = [parser.feed(chunk) for chunk in chunks]
        if not strip:
            assert all(out is chunk for out, chunk in zip(outputs, chunks, strict=True))
        assert b"".join(outputs) + parser.finish() == reference
        assert parser.usage == whole.usage
        if not strip or b'"usage"' not in raw:
            assert reference == raw
    reader = JsonUsage()
    for chunk in chunks:
        reader.feed(chunk)
    assert reader.finish() == usage_from_json(raw)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert usage_from_json(raw) is None or isinstance(usage_from_json(raw), Usage)
    for strip in (False, True):
        parser = SseUsage(strip)
        feed_all(parser, [raw[: len(raw) // 2], raw[len(raw) // 2 :]])


# --- cost ----------------------------------------------------------------------------------------------


def test_an_event_in_many_pieces_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned = 0
    real = usage_module._BLANK_LINE

    class Counting:
        def search(self, data: bytes, pos: int) -> object:
            nonlocal scanned
            scanned += len(data) - pos
            return real.search(data, pos)

    monkeypatch.setattr(usage_module, "_BLANK_LINE", Counting())
    big = chunk_event(chat_chunk({"content": "y" * 50_000}), b"\r\n")
    stream = big + USAGE_EVENT + DONE
    for strip in (False, True):
        scanned = 0
        parser = SseUsage(strip)
        feed_all(parser, [stream[i : i + 10] for i in range(0, len(stream), 10)])
        assert parser.usage == Usage(17, 6, 23)
        assert scanned < 2 * len(stream)


def test_only_events_with_a_non_null_usage_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = usage_module._event_data

    def spy(event: bytes) -> bytes | bytearray | None:
        parsed.append(bytes(event))
        return real(event)

    monkeypatch.setattr(usage_module, "_event_data", spy)
    parser = SseUsage()
    feed_all(parser, [INCLUDE_USAGE_STREAM])
    # The content token "usage" is parsed (cheap to tell apart only by parsing); "usage":null chunks are not.
    assert parsed == [INCLUDE_USAGE_EVENTS[4], USAGE_EVENT]
