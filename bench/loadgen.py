"""An open-loop HTTP/1.1 load generator: requests leave on schedule, not when replies come back.

Latency is measured from each request's scheduled send time, so a slow server
cannot hide its queueing (no coordinated omission). Connections are kept alive
and reused; a new one is opened whenever every open connection is busy.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Result:
    rate: float
    duration: float
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    def summary(self) -> dict[str, float]:
        return {
            "rate": self.rate,
            "completed": self.completed,
            "errors": self.errors,
            "p50_ms": self.percentile(50) * 1000,
            "p90_ms": self.percentile(90) * 1000,
            "p99_ms": self.percentile(99) * 1000,
            "max_ms": max(self.latencies, default=float("nan")) * 1000,
        }


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, payload: bytes) -> int:
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.readexactly(length)
        return status


def build_request(url: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_loop(
    urls: Sequence[str], body: bytes, rate: float, duration: float, headers: dict[str, str] | None = None
) -> Result:
    """Send ``rate`` requests per second for ``duration`` seconds, round-robin over ``urls``."""
    targets = [
        (urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80, build_request(u, body, headers))
        for u in urls
    ]
    idle: dict[int, list[_Connection]] = {i: [] for i in range(len(targets))}
    result = Result(rate, duration)
    pending: set[asyncio.Task[None]] = set()

    async def one(index: int, scheduled: float) -> None:
        host, port, payload = targets[index]
        pool = idle[index]
        try:
            conn = pool.pop() if pool else _Connection(*await asyncio.open_connection(host, port))
            status = await conn.request(payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            return
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 200:
            result.latencies.append(time.perf_counter() - scheduled)
        else:
            result.errors += 1
        pool.append(conn)

    start = time.perf_counter() + 0.05
    total = int(rate * duration)
    for n, index in zip(range(total), itertools.cycle(range(len(targets))), strict=False):
        scheduled = start + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(index, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    for pool in idle.values():
        for conn in pool:
            conn.writer.close()
    return result
