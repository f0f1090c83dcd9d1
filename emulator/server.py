"""The emulator's HTTP surface: vLLM's OpenAI-compatible API over a ``Backend``.

Response bodies, SSE chunk sequences, error shapes, the LoRA admin endpoints
and ``/metrics`` follow vLLM's, so what routers and sidecars see from the
emulator is what they see in production. Also served: ``/tokenize``,
``/v1/completions/render`` and ``/v1/chat/completions/render`` (token ids),
and ``/get_load``, which peer routers call; ``/emulator/status`` reports how far
behind real time the engine loop runs.

``/get_load`` has two shapes because the peers disagree on it: vllm-router parses
the old SGLang ``{"load": N}``, sglang-router (0.3+) only SGLang's newer list with
one entry per DP rank and sums its ``num_tokens`` (anything else reads as load -1).
``POST /emulator/load_format {"format": "load" | "sglang"}`` picks one at run time,
so one engine can serve either router; ``"load"`` is the default.

``POST /reset_prefix_cache[?reset_running_requests=true]`` answers ``{"success": bool}`` as vLLM does
(vLLM serves it with ``VLLM_SERVER_DEV_MODE=1``; the emulator always). An ``EmulatorApp`` given a
``KVEventPublisher`` (``--kv-events-config``) starts its replay service with the app and closes it after.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from aiohttp import web

from emulator import exposition, tokens
from emulator.backend import Backend, GenerationRequest
from emulator.tokens import chat_prompt

if TYPE_CHECKING:  # pyzmq and msgpack are needed only with KV events on
    from emulator.kv_events import KVEventPublisher

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MAX_TOKENS = 16
LOAD_FORMATS = ("load", "sglang")


class EngineError(Exception):
    """An error vLLM would answer with ``{"error": {message, type, param, code}}``.

    vLLM's own checks say ``BadRequestError``; its request-schema checks (FastAPI/pydantic) say
    ``Bad Request`` with ``param`` naming the field as ``body.<field>`` (``invalid_body``)."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "BadRequestError",
        404: "NotFoundError",
        500: "InternalServerError",
    }

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind or self.TYPES.get(status, "Error")

    @classmethod
    def invalid_body(cls, field: str, problem: str) -> EngineError:
        """A request-schema error, shaped as vLLM's validation errors."""
        return cls(
            400,
            f"1 validation error:\n  {{'loc': 'body.{field}', 'msg': '{problem}'}}",
            f"body.{field}",
            "Bad Request",
        )

    def response(self) -> web.Response:
        body = {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}
        return web.json_response(
            {"error": body}, status=self.status, dumps=lambda o: orjson.dumps(o).decode()
        )


class EmulatorApp:
    def __init__(
        self,
        backend: Backend,
        *,
        model: str,
        pod_name: str = "",
        max_model_len: int = 8192,
        enable_lora: bool = False,
        kv_events: KVEventPublisher | None = None,
        prompt_tokens_details: bool = False,
    ) -> None:
        self.backend = backend
        #: vLLM's ``--enable-prompt-tokens-details``: usage says how many prompt tokens were cache hits.
        self.prompt_tokens_details = prompt_tokens_details
        self.kv_events = kv_events
        self.model = model
        self.pod_name = pod_name
        self.max_model_len = max_model_len
        self.enable_lora = enable_lora
        self.adapters: dict[str, str] = {}  # name -> local path, in load order
        self.created = int(time.time())
        self.load_format = "load"  # the shape of /get_load, see the module docstring
        self._headers = {"x-emulator-pod": pod_name} if pod_name else {}

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        routes = {
            "/v1/chat/completions": self.chat,
            "/v1/completions": self.completions,
            "/v1/embeddings": self.embeddings,
            "/v1/load_lora_adapter": self.load_lora_adapter,
            "/v1/unload_lora_adapter": self.unload_lora_adapter,
            "/tokenize": self.tokenize,
            "/v1/completions/render": self.render_completion,
            "/v1/chat/completions/render": self.render_chat,
            "/emulator/load_format": self.set_load_format,
            "/reset_prefix_cache": self.reset_prefix_cache,
        }
        for path, handler in routes.items():
            app.router.add_post(path, self._errors(handler))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/get_load", self.get_load)
        app.router.add_get("/emulator/status", self.status)
        if self.kv_events is not None:
            app.on_startup.append(self._start_kv_events)
            app.on_cleanup.append(self._close_kv_events)
        return app

    async def _start_kv_events(self, _: web.Application) -> None:
        assert self.kv_events is not None
        self.kv_events.start()

    async def _close_kv_events(self, _: web.Application) -> None:
        assert self.kv_events is not None
        await self.kv_events.close()

    @staticmethod
    def _errors(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except EngineError as error:
                return error.response()

        return wrapped

    # -- generation ------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        lora = self._model(body)
        return await self._generate(
            request, body, tokens.encode(chat_prompt(_messages(body))), lora, chat=True
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        lora = self._model(body)
        return await self._generate(request, body, _prompt_ids(body), lora, chat=False)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        self._model(body)
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

    async def _generate(
        self, request: web.Request, body: dict[str, Any], ids: list[int], lora: str | None, *, chat: bool
    ) -> web.StreamResponse:
        max_tokens = next(
            (body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None),
            DEFAULT_MAX_TOKENS,
        )
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise EngineError.invalid_body("max_tokens", "Input should be a valid integer")
        # vLLM (0.32) checks, in this order: the requested length, the prompt alone, then caps max_tokens to
        # what the context leaves (a prompt that fills it leaves 0, which is refused as such).
        if max_tokens > self.max_model_len:
            raise EngineError(
                400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len={self.max_model_len}. Please "
                f"request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
                "max_tokens",
            )
        if len(ids) > self.max_model_len:
            counted = self.max_model_len + 1  # vLLM stops tokenizing there: "at least" that many
            raise EngineError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"contains at least {counted} input tokens, which exceeds this limit even without any output "
                "tokens. Please reduce the length of the input prompt. "
                f"(parameter=input_tokens, value={counted})",
                "input_tokens",
            )
        max_tokens = min(max_tokens, self.max_model_len - len(ids))
        if max_tokens < 1:
            raise EngineError(
                400,
                f"max_tokens must be at least 1, got {max_tokens}. "
                f"(parameter=max_tokens, value={max_tokens})",
                "max_tokens",
            )
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        meta = {"id": rid, "created": int(time.time()), "model": body["model"]}
        generation = GenerationRequest(rid, ids, max_tokens, lora)
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
        usage = self._usage(generation, len(produced))
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
        # vLLM puts finish_reason on the chunk of the last token; the emulator always generates max_tokens
        # tokens, so that is the chunk of index max_tokens - 1 (an end chunk of its own if it stopped short).
        produced, last = 0, generation.max_tokens - 1
        async for index in self.backend.generate(generation):
            produced += 1
            delta = {"delta": {"content": pieces[index]}} if chat else {"text": pieces[index]}
            finish = "length" if index == last else None
            await send([{"index": 0, **delta, "logprobs": None, "finish_reason": finish}])
        if produced <= last:
            end = {"delta": {}} if chat else {"text": ""}
            await send([{"index": 0, **end, "logprobs": None, "finish_reason": "length"}])
        if include_usage:
            await send([], usage=self._usage(generation, produced))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _usage(self, generation: GenerationRequest, completion: int) -> dict[str, Any]:
        usage: dict[str, Any] = _usage(len(generation.prompt_tokens), completion)
        if self.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": generation.cached_tokens}
        return usage

    # -- models and LoRA adapters ------------------------------------------------------------

    def _model(self, body: dict[str, Any]) -> str | None:
        """The adapter a request names (None for the base model); 404 for anything else."""
        model = body.get("model")
        if model == self.model:
            return None
        if model in self.adapters:
            return model
        raise EngineError(404, f"The model `{model}` does not exist. Valid aliases: {self.model}.", "model")

    async def models(self, _: web.Request) -> web.Response:
        cards = [
            {
                "id": self.model,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.model,
                "parent": None,
                "max_model_len": self.max_model_len,
                "permission": [self._permission()],
            }
        ]
        cards += [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": path,
                "parent": self.model,
                "max_model_len": None,
                "permission": [self._permission()],
            }
            for name, path in self.adapters.items()
        ]
        return self._json({"object": "list", "data": cards})

    def _permission(self) -> dict[str, Any]:
        return {
            "id": f"modelperm-{uuid.uuid4().hex[:16]}",
            "object": "model_permission",
            "created": self.created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._body(request, check_model=False)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not self.enable_lora:
            raise EngineError(400, "LoRA is not enabled: start the engine with --enable-lora.")
        if not name or not path:
            raise EngineError.invalid_body("lora_name" if not name else "lora_path", "Field required")
        if name in self.adapters:
            raise EngineError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                "place, set 'load_inplace' to True.",
                kind="InvalidUserInput",
            )
        if not await asyncio.to_thread(Path(path, "adapter_config.json").is_file):
            raise EngineError(404, f"Loading lora {name} failed: No adapter found for {path}")
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await self._body(request, check_model=False)
        name = body.get("lora_name")
        if not name:
            raise EngineError.invalid_body("lora_name", "Field required")
        if self.adapters.pop(name, None) is None:
            raise EngineError(404, f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # -- tokens --------------------------------------------------------------------------------

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._body(request, check_model=False)
        ids = tokens.encode(chat_prompt(_messages(body))) if "messages" in body else _prompt_ids(body)
        return self._json({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def render_completion(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return self._json([self._rendered(body, _prompt_ids(body), "cmpl")])

    async def render_chat(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return self._json(self._rendered(body, tokens.encode(chat_prompt(_messages(body))), "chatcmpl"))

    def _rendered(self, body: dict[str, Any], ids: list[int], prefix: str) -> dict[str, Any]:
        self._model(body)
        params = {"max_tokens": body.get("max_tokens") or DEFAULT_MAX_TOKENS}
        return {
            "request_id": f"{prefix}-{uuid.uuid4().hex}",
            "model": body["model"],
            "token_ids": ids,
            "sampling_params": params,
        }

    # -- health, load, metrics ------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(headers=self._headers)

    async def get_load(self, _: web.Request) -> web.Response:
        stats = self.backend.stats()
        requests = stats.num_running + stats.num_waiting
        if self.load_format == "sglang":
            # SGLang's per-DP-rank list; num_tokens is the KV cache held by requests, which is
            # what sglang-router's power_of_two compares.
            rank = {
                "dp_rank": 0,
                "num_reqs": requests,
                "num_waiting_reqs": stats.num_waiting,
                "num_tokens": round(stats.kv_cache_usage * stats.num_blocks * stats.block_size),
            }
            return self._json([rank])
        return self._json({"load": requests})

    async def set_load_format(self, request: web.Request) -> web.Response:
        body = await self._body(request, check_model=False)
        if body.get("format") not in LOAD_FORMATS:
            raise EngineError(400, f"format must be one of {', '.join(LOAD_FORMATS)}", "format")
        self.load_format = body["format"]
        return self._json({"format": self.load_format})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """Drop the engine's cached prefixes; ``success`` is false while requests hold blocks, unless
        ``reset_running_requests`` preempts them first. An engine without a prefix cache has none to drop."""
        reset_running = _query_flag(request, "reset_running_requests")
        _query_flag(request, "reset_external")  # no external (connector) cache here: nothing to reset
        reset = getattr(self.backend, "reset_prefix_cache", None)
        success = True if reset is None else bool(reset(reset_running))
        return self._json({"success": success})

    async def status(self, _: web.Request) -> web.Response:
        return self._json({"model": self.model, "pod": self.pod_name, **self.backend.status()})

    async def metrics(self, _: web.Request) -> web.Response:
        text = exposition.render(self.backend.stats(), self.model, lora_enabled=self.enable_lora)
        return web.Response(text=text, content_type="text/plain")

    # -- helpers ----------------------------------------------------------------------------------

    async def _body(self, request: web.Request, *, check_model: bool = True) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise EngineError(400, f"JSON decode error: {exc}", "body", "Bad Request") from None
        if not isinstance(body, dict):
            raise EngineError(400, "Input should be a valid dictionary", "body", "Bad Request")
        if check_model:
            self._model(body)
        return body

    def _json(self, payload: Any) -> web.Response:
        return web.Response(
            body=orjson.dumps(payload), content_type="application/json", headers=self._headers
        )


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise EngineError.invalid_body("messages", "Input should be a valid list of objects")
    if not messages:
        raise EngineError(
            400, "Cannot apply chat template to an empty conversation. Provide at least one message."
        )
    return messages


def _query_flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter, spelled as FastAPI accepts them."""
    value = request.query.get(name)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("1", "true", "on", "yes", "t", "y"):
        return True
    if lowered in ("0", "false", "off", "no", "f", "n"):
        return False
    raise EngineError(400, f"{name} must be a boolean, not {value!r}", f"query.{name}", "Bad Request")


def _prompt_ids(body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tokens.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)  # token ids
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return tokens.encode("".join(prompt))
    raise EngineError.invalid_body(
        "prompt", "Input should be a string, a list of strings or a list of token ids"
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _embedding(ids: list[int], dims: int = 16) -> list[float]:
    """A deterministic vector: equal inputs give equal embeddings."""
    return [((sum(ids) * (i + 1) * 2654435761) % 1000) / 1000.0 for i in range(dims)]
