"""An aiohttp application served from a thread of its own, for synchronous tests that need a real HTTP
peer (an artifact store, an engine that records what reaches it)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from aiohttp import web

from brickyard.stack import LOOPBACK, free_port


@contextlib.contextmanager
def serve_in_thread(app: web.Application) -> Iterator[int]:
    """Serve ``app`` on a free loopback port until the block ends; yields the port."""
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(app, access_log=None)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, LOOPBACK, port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the test HTTP server did not start")
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
