"""Requests the gateway answers itself, without an engine: the model list, and the paths and methods it
does not route (OpenAI-shaped 404 and 405)."""

from __future__ import annotations

import time

import orjson

from gateway_plugins.discovery.registry import PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.types import Endpoint


class Answers:
    """The gateway's own endpoints: ``GET /v1/models`` (models with a ready pod), ``GET /v1/models/{id}``."""

    def __init__(self, registry: PodRegistry) -> None:
        self.registry = registry
        self._created = int(time.time())

    def answer(self, path: str, method: str) -> bytes:
        """The JSON body of the 200 answer to ``method path``; ``GatewayError`` (404, 405) otherwise."""
        if path == Endpoint.MODELS or path.startswith(Endpoint.MODELS + "/"):
            if method != "GET":
                raise method_not_allowed(path, method, "GET")
            return self.models(path.removeprefix(Endpoint.MODELS).lstrip("/"))
        raise GatewayError(
            404,
            f"Unsupported path {path or '(none)'}. "
            f"The gateway serves {', '.join(e.value for e in Endpoint)}.",
            cause="unsupported-path",
            code="unknown_url",
        )

    def models(self, model_id: str) -> bytes:
        models = [
            {"id": name, "object": "model", "created": self._created, "owned_by": "brickyard"}
            for name in self.registry.serving_models()
        ]
        if not model_id:
            return orjson.dumps({"object": "list", "data": models})
        for model in models:
            if model["id"] == model_id:
                return orjson.dumps(model)
        raise GatewayError(
            404, f"The model `{model_id}` does not exist.", cause="model-not-found", code="model_not_found"
        )


def method_not_allowed(path: str, method: str, allowed: str) -> GatewayError:
    return GatewayError(
        405, f"{path} accepts {allowed}, not {method}.", cause="method-not-allowed", code="method_not_allowed"
    )
