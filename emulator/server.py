"""The emulator's HTTP surface: vLLM's OpenAI-compatible API over a ``Backend``.

Response bodies, SSE chunk sequences and error shapes follow vLLM's, so that
what routers and sidecars see from the emulator is what they see in production.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import orjson
from aiohttp import web

from emulator import tokens
from emulator.backend import Backend, GenerationRequest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MAX_TOKENS = 16


class EngineError(Exception):
    """An error vLLM would answer with ``{"error": {message, type, param, code}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "BadRequestError",
        404: "NotFoundError",
        500: "InternalServerError",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param

    def response(self) -> web.Response:
        body = {
            "message": str(self),
            "type": self.TYPES.get(self.status, "Error"),
            "param": self.param,
            "code": self.status,
        }
        return web.json_response(
            {"error": body}, status=self.status, dumps=lambda o: orjson.dumps(o).decode()
        )


class EmulatorApp:
    def __init__(self, backend: Backend, *, pod_name: str = "", max_model_len: int = 8192) -> None:
        self.backend = backend
        self.pod_name = pod_name
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self._headers = {"x-emulator-pod": pod_name} if pod_name else {}

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._errors(self.chat))
        app.router.add_post("/v1/completions", self._errors(self.completions))
        app.router.add_post("/v1/embeddings", self._errors(self.embeddings))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @staticmethod
    def _errors(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except EngineError as error:
                return error.response()

        return wrapped

    # -- endpoints ----------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise EngineError(400, "messages must be a non-empty list", "messages")
        text = "".join(
            f"<|{m.get('role')}|>{_content(m.get('content'))}" for m in messages if isinstance(m, dict)
        )
        return await self._generate(request, body, text + "<|assistant|>", chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = "".join(p if isinstance(p, str) else " ".join(map(str, p)) for p in prompt)
        if not isinstance(prompt, str):
            raise EngineError(400, "prompt must be a string or a list", "prompt")
        return await self._generate(request, body, prompt, chat=False)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        if not items or not all(isinstance(i, str) for i in items):
            raise EngineError(400, "input must be a string or a list of strings", "input")
        data, used = [], 0
        for index, text in enumerate(items):
            ids = tokens.encode(text)
            used += len(ids)
            data.append({"object": "embedding", "index": index, "embedding": _embedding(ids)})
        usage = {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0}
        return self._json({"object": "list", "data": data, "model": body["model"], "usage": usage})

    async def models(self, _: web.Request) -> web.Response:
        card = {
            "id": self.backend.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.backend.model,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return self._json({"object": "list", "data": [card]})

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(headers=self._headers)

    async def metrics(self, _: web.Request) -> web.Response:
        c = self.backend.counters
        labels = f'{{engine="0",model_name="{self.backend.model}"}}'
        rows = [
            (
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                c.running,
            ),
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", c.waiting),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", c.prompt_tokens),
            (
                "vllm:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                c.generation_tokens,
            ),
        ]
        text = "".join(
            f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name}{labels} {float(value)}\n"
            for name, kind, help_, value in rows
        )
        return web.Response(text=text, content_type="text/plain")

    # -- generation ------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise EngineError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise EngineError(400, "The request body must be a JSON object")
        if body.get("model") != self.backend.model:
            raise EngineError(404, f"The model `{body.get('model')}` does not exist.", "model")
        return body

    async def _generate(
        self, request: web.Request, body: dict[str, Any], prompt: str, *, chat: bool
    ) -> web.StreamResponse:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise EngineError(400, "max_tokens must be a positive integer", "max_tokens")
        ids = tokens.encode(prompt)
        if len(ids) + max_tokens > self.max_model_len:
            raise EngineError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the "
                "completion). "
                "Please reduce the length of the messages or completion.",
            )
        kind = "chat.completion" if chat else "text_completion"
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body["model"],
        }
        generation = GenerationRequest(meta["id"], body["model"], ids, max_tokens)
        _, pieces = tokens.reply(ids, max_tokens)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            return await self._stream(
                request,
                generation,
                pieces,
                meta,
                kind,
                chat=chat,
                include_usage=bool(options.get("include_usage")),
            )
        produced = [pieces[i] async for i in self.backend.generate(generation)]
        text = "".join(produced)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        usage = _usage(len(ids), len(produced))
        return self._json({**meta, "object": kind, "choices": [choice], "usage": usage})

    async def _stream(
        self,
        request: web.Request,
        generation: GenerationRequest,
        pieces: list[str],
        meta: dict[str, Any],
        kind: str,
        *,
        chat: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self._headers})
        await response.prepare(request)
        chunk_kind = f"{kind}.chunk" if chat else kind

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            event = {**meta, "object": chunk_kind, "choices": choices, **extra}
            await response.write(b"data: " + orjson.dumps(event) + b"\n\n")

        if chat:
            await send(
                [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        produced = 0
        async for index in self.backend.generate(generation):
            produced += 1
            delta = {"delta": {"content": pieces[index]}} if chat else {"text": pieces[index]}
            await send([{"index": 0, **delta, "logprobs": None, "finish_reason": None}])
        end = {"delta": {}} if chat else {"text": ""}
        await send([{"index": 0, **end, "logprobs": None, "finish_reason": "length"}])
        if include_usage:
            await send([], usage=_usage(len(generation.prompt_tokens), produced))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _json(self, payload: dict[str, Any]) -> web.Response:
        return web.Response(
            body=orjson.dumps(payload), content_type="application/json", headers=self._headers
        )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _content(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _embedding(ids: list[int], dims: int = 16) -> list[float]:
    """A deterministic unit-free vector: equal inputs give equal embeddings."""
    return [((sum(ids) * (i + 1) * 2654435761) % 1000) / 1000.0 for i in range(dims)]
