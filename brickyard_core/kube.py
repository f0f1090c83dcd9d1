"""Kubernetes plumbing shared by the gateway's discovery and the controllers.

The official ``kubernetes`` client is synchronous. ``ListWatch`` runs the
list-then-watch loop of one resource in a daemon thread and hands every result
to the event loop with ``call_soon_threadsafe``, so consumers only ever touch
their state on the loop. Responses are read as raw JSON
(``_preload_content=False``): turning objects into the client's typed models
costs far more than the few fields anyone reads.

The loop: list (the complete current set, with its resourceVersion), then watch
from that resourceVersion; a watch that times out is renewed from the last
resourceVersion seen (bookmarks included); 410 Gone (history compacted) means
re-list; any other failure is retried with exponential backoff. A resource the
server does not serve (404 on the list: a CRD not installed) is reported once to
``on_absent`` and polled for at a slower pace, so installing the CRD later
needs no restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

Obj = dict[str, Any]
#: An official client list method bound to its path arguments (``functools.partial(CoreV1Api(c).
#: list_namespaced_pod, "ns", label_selector=...)``): called with the list/watch keyword arguments.
ListCall = Callable[..., Any]

_BACKOFF_START = 1.0
_BACKOFF_MAX = 30.0


def api_client_from_environment() -> Any:
    """An ``ApiClient`` from the in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    from kubernetes import client, config  # optional dependency, imported where used

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def api_status(exc: BaseException) -> int | None:
    """The HTTP status of a client ``ApiException`` (None for anything else, 0 for no response)."""
    from kubernetes.client.exceptions import ApiException

    return exc.status if isinstance(exc, ApiException) else None


class ListWatch:
    """List, then watch one resource from a daemon thread; callbacks run on the event loop.

    ``connect`` is called in the thread (again after a failure), so loading a kubeconfig or
    building the client is retried like any other error. ``on_list(items)`` receives the complete
    current set after every (re-)list; ``on_event(type, object)`` each ADDED / MODIFIED / DELETED.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], ListCall],
        *,
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        on_absent: Callable[[], None] | None = None,
        watch_timeout_seconds: int = 300,
        absent_retry_seconds: float = 30.0,
    ) -> None:
        self.name = name
        self.connect = connect
        self.on_list = on_list
        self.on_event = on_event
        self.on_absent = on_absent
        self.watch_timeout_seconds = watch_timeout_seconds
        self.absent_retry_seconds = absent_retry_seconds
        self._stop = threading.Event()
        self._response: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        """Run until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        thread = threading.Thread(target=self._run_thread, name=f"k8s-watch-{self.name}", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()
            response = self._response
            if response is not None:
                with contextlib.suppress(Exception):
                    response.close()  # unblocks a watch waiting for the next event

    # -- the thread ------------------------------------------------------------------------

    def _run_thread(self) -> None:
        backoff = _BACKOFF_START
        absent = False
        call: ListCall | None = None
        while not self._stop.is_set():
            try:
                if call is None:
                    call = self.connect()
                version = self._list(call)
                backoff, absent = _BACKOFF_START, False
                while not self._stop.is_set():
                    version = self._watch(call, version)
                    if version is None:
                        break  # history expired (410): re-list
            except Exception as exc:
                if self._stop.is_set():
                    return
                if api_status(exc) == 404:
                    if not absent and self.on_absent is not None:
                        self._post(self.on_absent)
                    absent = True
                    self._stop.wait(self.absent_retry_seconds)
                    continue
                log.warning("%s watch failed, retrying in %.0f s: %s", self.name, backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _list(self, call: ListCall) -> str:
        response = call(_preload_content=False, _request_timeout=30)
        data = json.loads(response.data)
        items = data.get("items") or []
        self._post(lambda: self.on_list(items))
        return data["metadata"]["resourceVersion"]

    def _watch(self, call: ListCall, version: str) -> str | None:
        """Apply watch events from ``version``; the next version, or None on 410 Gone."""
        self._response = response = call(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_seconds,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout_seconds + 30),
        )
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.info("%s watch expired at resourceVersion %s; re-listing", self.name, version)
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = (obj.get("metadata") or {}).get("resourceVersion", version)
                if kind != "BOOKMARK":
                    self._post(lambda kind=kind, obj=obj: self.on_event(kind, obj))
        finally:
            self._response = None
            response.close()
        return version

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
