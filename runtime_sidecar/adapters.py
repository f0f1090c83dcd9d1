"""LoRA adapters on the engine, managed through the sidecar: fetch the artifact, load, verify, unload.

Loading is idempotent (an adapter the engine already serves is a success),
and every failure is a clear ``AdapterError`` carrying the HTTP status to
answer with: a bad request (400), a missing artifact (404), a full engine
(409), a corrupt download (422), an engine that refuses (502) or does not
answer (503).

Every read of the engine's adapter list is reported to ``on_listed`` (the
publisher puts it in each record, which is how gateways learn where an adapter
is routable): the read that verifies a load or an unload, and ``watch``'s
periodic one, which catches adapters loaded or lost behind the sidecar's back
(straight at the engine, or by an engine restart).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp

from runtime_sidecar.artifacts import ArtifactError, ArtifactPolicy, fetch_artifact
from runtime_sidecar.config import SidecarSettings

log = logging.getLogger(__name__)

#: HTTP status for each way an artifact can fail to arrive.
_ARTIFACT_STATUS = {
    "bad_url": 400,
    "unsupported": 400,
    "forbidden": 403,
    "not_found": 404,
    "checksum": 422,
    "transfer": 502,
}
#: Adapter names: a model name for the engine and a directory name in the cache, so nothing a path could
#: use (no ``/``, no leading dot, hence no ``..``).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


class AdapterError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AdapterManager:
    def __init__(
        self,
        settings: SidecarSettings,
        session: aiohttp.ClientSession,
        engine_max_loras: Callable[[], int],
        on_listed: Callable[[tuple[str, ...]], None],
    ) -> None:
        self.settings = settings
        self.session = session
        self.engine_max_loras = engine_max_loras
        self.on_listed = on_listed
        self.cache_dir = Path(settings.adapter_dir)
        artifacts = settings.artifacts
        self.policy = ArtifactPolicy(
            schemes=frozenset(artifacts.schemes),
            hosts=frozenset(artifacts.hosts),
            allow_private_networks=artifacts.allow_private_networks,
            local_roots=tuple(map(Path, artifacts.local_roots)),
        )
        #: One lock per adapter name while someone holds or waits for it (idle ones drop out).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def models(self) -> dict:
        """The engine's ``/v1/models`` (base model and loaded adapters)."""
        return await self._engine("GET", "/v1/models")

    async def loaded(self) -> tuple[str, ...]:
        """Adapters the engine serves now (model cards with a parent: the base model has none)."""
        names = tuple(card["id"] for card in (await self.models()).get("data", []) if card.get("parent"))
        self.on_listed(names)
        return names

    async def watch(self) -> None:
        """Re-read the engine's adapters every ``adapters_refresh_seconds`` until cancelled."""
        failing = False
        while True:
            try:
                async with asyncio.timeout(self.settings.scrape_timeout_seconds):
                    await self.loaded()
            except (AdapterError, TimeoutError, ValueError) as exc:  # ValueError: not JSON
                if not failing:  # the metrics scrape reports the engine's health; say it once here
                    log.warning("cannot list the engine's adapters, keeping the last list: %s", exc)
                failing = True
            else:
                failing = False
            await asyncio.sleep(self.settings.adapters_refresh_seconds)

    async def load(
        self,
        name: str,
        *,
        artifact_url: str | None = None,
        lora_path: str | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> dict:
        _check_name(name)
        if bool(artifact_url) == bool(lora_path):
            raise AdapterError(400, "invalid_request", "give exactly one of artifact_url and lora_path")
        async with self._lock(name):
            loaded = await self.loaded()
            if name in loaded:
                return {"lora_name": name, "status": "already_loaded"}
            capacity = self.settings.max_adapters or self.engine_max_loras()
            if capacity and len(loaded) >= capacity:
                raise AdapterError(
                    409,
                    "adapter_capacity_exceeded",
                    f"the engine already holds {len(loaded)} adapters (max {capacity}); unload one first",
                )
            source = artifact_url or lora_path or ""
            try:
                path = await fetch_artifact(
                    source, self.cache_dir, name=name, credentials=credentials, policy=self.policy
                )
            except ArtifactError as exc:
                raise AdapterError(
                    _ARTIFACT_STATUS.get(exc.kind, 502), f"artifact_{exc.kind}", str(exc)
                ) from exc
            await self._engine("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            if name not in await self.loaded():
                raise AdapterError(502, "engine_refused", f"the engine accepted {name} but does not list it")
            log.info("adapter loaded", extra={"adapter": name, "path": str(path)})
            return {"lora_name": name, "status": "loaded", "path": str(path)}

    async def unload(self, name: str, *, cleanup_local: bool = False) -> dict:
        _check_name(name)
        async with self._lock(name):
            if name in await self.loaded():
                await self._engine("POST", "/v1/unload_lora_adapter", {"lora_name": name})
                await self.loaded()
                status = "unloaded"
            else:
                status = "not_loaded"
            local = self.cache_dir / name  # a checked name: one directory inside the cache
            if cleanup_local and local.is_dir() and not local.is_symlink():
                await asyncio.to_thread(shutil.rmtree, local)
            log.info("adapter unloaded", extra={"adapter": name, "status": status, "cleanup": cleanup_local})
            return {"lora_name": name, "status": status}

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _engine(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.settings.engine_url}{path}"
        try:
            async with self.session.request(method, url, json=body) as response:
                text = await response.text()
                if response.status >= 400:
                    raise AdapterError(
                        502, "engine_refused", f"the engine answered {response.status}: {text}"
                    )
                return await response.json(content_type=None) if path == "/v1/models" else {"message": text}
        except aiohttp.ClientError as exc:
            raise AdapterError(503, "engine_unavailable", f"the engine did not answer: {exc}") from exc


def _check_name(name: str) -> None:
    if not name:
        raise AdapterError(400, "invalid_request", "lora_name is required")
    if not _NAME.fullmatch(name):
        raise AdapterError(
            400,
            "invalid_request",
            "lora_name must be 1-253 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
