"""Replay a workload against a live OpenAI endpoint, open loop, timing every streamed token.

Each request leaves at its arrival time whatever the server is doing, and is
timed from that scheduled time (no coordinated omission). Requests go to
``/v1/completions`` with the prompt text, streamed with usage, so the tokens
the engine sees are exactly the workload's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

import aiohttp
import orjson

from emulator.results import RequestOutcome
from emulator.workloads import WorkloadRequest


async def replay(
    requests: Iterable[WorkloadRequest],
    base_url: str,
    *,
    headers: Mapping[str, str] | None = None,
    concurrency_limit: int = 4096,
) -> tuple[list[RequestOutcome], float]:
    """Send every request at its arrival time; returns the results and the wall time of the run."""
    results: list[RequestOutcome] = []
    connector = aiohttp.TCPConnector(limit=concurrency_limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter() + 0.2
        tasks = []
        for request in requests:
            delay = start + request.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(
                    _one(session, base_url, request, start=start, headers=headers or {}, results=results)
                )
            )
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


async def _one(
    session: aiohttp.ClientSession,
    base_url: str,
    request: WorkloadRequest,
    *,
    start: float,
    headers: Mapping[str, str],
    results: list[RequestOutcome],
) -> None:
    scheduled = start + request.arrival
    body = {
        "model": request.model,
        "prompt": request.prompt_text,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": request.user or None,
    }
    extra = {"x-session-id": request.session} if request.session else {}
    first = last = 0.0
    tokens = prompt_tokens = 0
    pod = ""
    try:
        async with session.post(
            f"{base_url}/v1/completions",
            data=orjson.dumps(body),
            headers={**headers, **extra, "content-type": "application/json"},
        ) as response:
            pod = response.headers.get("target-pod") or response.headers.get("x-emulator-pod", "")
            if response.status != 200:
                await response.read()
                raise RuntimeError(f"status {response.status}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = orjson.loads(line[6:])
                choices = event.get("choices")
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
                if event.get("usage"):
                    prompt_tokens = event["usage"]["prompt_tokens"]
                    tokens = event["usage"]["completion_tokens"]
    except (TimeoutError, aiohttp.ClientError, RuntimeError):
        results.append(RequestOutcome(request.arrival, 0.0, 0.0, 0, 0, pod, ok=False))
        return
    results.append(
        RequestOutcome(request.arrival, first - scheduled, last - scheduled, tokens, prompt_tokens, pod)
    )
