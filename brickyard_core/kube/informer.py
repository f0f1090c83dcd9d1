"""``Informer``: the cache of one resource, kept by list/watch; the gateway's discovery and the controllers
both watch the cluster through it.

The client is synchronous, so the list/watch loop runs in a daemon thread and hands every result to the
event loop (``call_soon_threadsafe``): the cache and every handler are only ever touched on the loop.
Objects stay raw JSON (see ``brickyard_core.kube.client``).

The loop: list (the complete current set, with its resourceVersion), then watch from that
resourceVersion with bookmarks on; a watch that times out is renewed from the last resourceVersion seen;
410 Gone (history compacted) means re-list; any other failure is retried with exponential backoff. A
resource the server does not serve (404 on the list: a CRD not installed) is logged once, counts as
listed (an empty cache is the truth until it appears) and is looked for again every
``absent_retry_seconds``, so installing the CRD later needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from brickyard_core.kube.client import ApiError, KubeClient, Obj, Resource
from brickyard_core.kube.objects import object_key

log = logging.getLogger(__name__)

#: ``(old, new)`` of a change: ``(None, obj)`` added, ``(obj, obj2)`` changed, ``(obj, None)`` deleted
#: (or no longer selected).
Handler = Callable[[Obj | None, Obj | None], None]
#: The complete current set after a (re-)list.
ListHandler = Callable[[list[Obj]], None]

_BACKOFF_START = 1.0
_BACKOFF_MAX = 30.0


class Informer:
    """The cache of one resource (optionally one namespace, one label selector), kept by list/watch.

    A handler sees ``(old, new)`` of every change, a re-list included (it reports the differences it
    finds). A handler given ``on_list`` sees a (re-)list as the complete set instead, for consumers that
    rebuild an index once rather than once per object.
    """

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        watch_timeout_seconds: int = 300,
        absent_retry_seconds: float = 30.0,
    ) -> None:
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.watch_timeout_seconds = watch_timeout_seconds
        self.absent_retry_seconds = absent_retry_seconds
        self.cache: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.absent = False
        self._handlers: list[tuple[Handler, ListHandler | None]] = []
        self._stop = threading.Event()
        self._response: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add_handler(self, handler: Handler, *, on_list: ListHandler | None = None) -> None:
        self._handlers.append((handler, on_list))

    def get(self, key: str) -> Obj | None:
        return self.cache.get(key)

    def list(self, namespace: str | None = None) -> list[Obj]:
        if namespace is None:
            return list(self.cache.values())
        return [
            obj for obj in self.cache.values() if (obj.get("metadata") or {}).get("namespace") == namespace
        ]

    async def run(self) -> None:
        """List and watch until cancelled; ``synced`` is set once the first list (or absence) is in."""
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        thread = threading.Thread(
            target=self._run_thread, name=f"k8s-watch-{self.resource.plural}", daemon=True
        )
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()
            response = self._response
            if response is not None:
                with contextlib.suppress(Exception):
                    response.close()  # unblocks a watch waiting for the next event

    # -- on the loop --------------------------------------------------------------------------------------

    def _typed(self, obj: Obj) -> Obj:
        """List items of built-in kinds come without apiVersion/kind; every cached object has them."""
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        return obj

    def _listed(self, items: list[Obj]) -> None:
        old, new = self.cache, {object_key(item): self._typed(item) for item in items}
        self.cache = new
        self.absent = False
        changes = [(old[key], None) for key in old.keys() - new.keys()]
        changes += [
            (old.get(key), obj)
            for key, obj in new.items()
            if key not in old
            or old[key]["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion")
        ]
        for handler, on_list in self._handlers:
            if on_list is not None:
                self._call(on_list, list(new.values()))
            else:
                for before, after in changes:
                    self._call(handler, before, after)
        self.synced.set()

    def _event(self, kind: str, obj: Obj) -> None:
        key = object_key(obj)
        self._typed(obj)
        if kind == "DELETED":
            before = self.cache.pop(key, None) or obj
            after = None
        else:
            before, after = self.cache.get(key), obj
            self.cache[key] = obj
        for handler, _ in self._handlers:
            self._call(handler, before, after)

    def _absent(self) -> None:
        self.absent = True
        log.warning(
            "%s (%s) is not served by the API server (CRD not installed?); looking again every %g s",
            self.resource.plural,
            self.resource.api_version,
            self.absent_retry_seconds,
        )
        self.synced.set()

    def _call(self, handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("%s informer handler failed", self.resource.plural)

    # -- the thread ---------------------------------------------------------------------------------------

    def _run_thread(self) -> None:
        backoff = _BACKOFF_START
        absent = False
        while not self._stop.is_set():
            try:
                version: str | None = self._list()
                backoff, absent = _BACKOFF_START, False
                while version is not None and not self._stop.is_set():
                    version = self._watch(version)
                # None: the history expired (410), re-list
            except Exception as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, ApiError) and exc.not_found:
                    if not absent:
                        self._post(self._absent)
                    absent = True
                    self._stop.wait(self.absent_retry_seconds)
                    continue
                log.warning("%s watch failed, retrying in %.0f s: %s", self.resource.plural, backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _list(self) -> str:
        data = self.client.request(
            "GET", self.resource.path(self.namespace), query={"labelSelector": self.label_selector}
        )
        items = data.get("items") or []
        self._post(lambda: self._listed(items))
        return data["metadata"]["resourceVersion"]

    def _watch(self, version: str) -> str | None:
        """Apply watch events from ``version``; the next version, or None on 410 Gone."""
        try:
            self._response = response = self.client.stream(
                self.resource.path(self.namespace),
                query={
                    "labelSelector": self.label_selector,
                    "watch": "true",
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": self.watch_timeout_seconds,
                },
                timeout=(10, self.watch_timeout_seconds + 30),
            )
        except ApiError as exc:
            if not exc.gone:
                raise
            self._expired(version)
            return None
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        self._expired(version)
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if kind != "BOOKMARK":
                    self._post(lambda kind=kind, obj=obj: self._event(kind, obj))
        finally:
            self._response = None
            response.close()
        return version

    def _expired(self, version: str) -> None:
        log.info("%s watch expired at resourceVersion %s; re-listing", self.resource.plural, version)

    def _post(self, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us: we are stopping anyway
            self._loop.call_soon_threadsafe(callback)


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited events from a streamed urllib3 response."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending
