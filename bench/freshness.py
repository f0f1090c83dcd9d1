"""Freshness: from a change in an engine's metrics to the gateway's snapshot, with 64 pods publishing.

    python -m bench.freshness [--pods 64] [--seconds 20] [--interval 0.05] [--publisher-processes 2]

64 synthetic engines serve vLLM-format ``/metrics`` whose ``num_requests_waiting``
changes every 100-300 ms and carries the time of its last change (ms). Real
sidecar publishers (``runtime_sidecar.publisher.MetricsPublisher``, split over a
few processes) scrape them every ``--interval`` and publish to a real
redis-server. In the observer process, the gateway's ``PodMetricsStore``
(subscription) and, side by side, a reader polling ``MGET`` every interval
note when each change reaches them. Writes bench/results/freshness.json and
docs/benchmarks/freshness.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from bench.procstat import cpu_seconds
from brickyard.stack import Stack, free_port
from brickyard_core.podmetrics import POD_KEY_PREFIX, decode_record
from emulator.results import percentile
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.pod_metrics_store import PodMetricsStore
from runtime_sidecar.config import SidecarSettings
from runtime_sidecar.publisher import MetricsPublisher

REPO = Path(__file__).resolve().parents[1]
METRICS = """# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} 0.5
"""


def now_ms() -> int:
    return int(time.time() * 1000) % 1_000_000_000


def engines_and_publishers(first: int, count: int, redis_url: str, interval: float, seconds: float) -> None:
    """One process: ``count`` synthetic engines and their sidecar publishers."""

    async def main() -> None:
        changed = {i: now_ms() for i in range(first, first + count)}

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=METRICS.format(waiting=changed[int(request.match_info["pod"])]))

        async def change(pod: int) -> None:
            while True:
                await asyncio.sleep(random.uniform(0.1, 0.3))
                changed[pod] = now_ms()

        app = web.Application()
        app.router.add_get("/e/{pod}/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        redis = aioredis.from_url(redis_url)
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(change(i)) for i in changed]
            for pod in changed:
                settings = SidecarSettings(
                    engine_url=f"http://127.0.0.1:{port}/e/{pod}",
                    pod=f"pod-{pod}",
                    namespace="bench",
                    interval_seconds=interval,
                    engine="vllm",
                )
                tasks.append(asyncio.create_task(MetricsPublisher(settings, session, redis).run()))
            await asyncio.sleep(seconds)
            for task in tasks:
                task.cancel()
        await runner.cleanup()

    asyncio.run(main())


class TimedStore(PodMetricsStore):
    """The gateway's store, noting how old each change is when it lands in the snapshot."""

    latencies: list[float]

    def _apply(self, data: bytes) -> None:
        namespace, name, _ = decode_record(data)
        state = self.registry.state(namespace, name)
        before = state.metrics.waiting if state is not None and state.metrics is not None else None
        super()._apply(data)
        # The first record of a pod tells nothing about freshness: its change may predate the run.
        if (
            before is not None
            and state is not None
            and state.metrics is not None
            and state.metrics.waiting != before
        ):
            self.latencies.append((now_ms() - state.metrics.waiting) % 1_000_000_000)


async def observe(pods: int, redis_url: str, interval: float, seconds: float) -> dict[str, list[float]]:
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"pod-{i}", f"10.0.0.{i}:8000", "m", namespace="bench") for i in range(pods))
    store = TimedStore(registry, redis_url, stale_seconds=5.0)
    store.latencies = []
    polled: list[float] = []
    redis = aioredis.from_url(redis_url)
    keys = [f"{POD_KEY_PREFIX}bench/pod-{i}" for i in range(pods)]

    async def poll() -> None:
        """The alternative: read every record with one MGET per interval."""
        seen: dict[str, int] = {}
        while True:
            await asyncio.sleep(interval)
            for key, data in zip(keys, await redis.mget(keys), strict=True):
                if data is None:
                    continue
                _, _, record = decode_record(data)
                previous = seen.get(key)
                if previous != record.waiting:
                    seen[key] = record.waiting
                    if previous is not None:
                        polled.append((now_ms() - record.waiting) % 1_000_000_000)

    tasks = [asyncio.create_task(store.run()), asyncio.create_task(poll())]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await redis.aclose()
    return {"subscription": store.latencies, "polling": polled}


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "changes": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--publisher-processes", type=int, default=2)
    args = parser.parse_args()
    with Stack(Path(tempfile.mkdtemp(prefix="bench-freshness-"))) as stack:
        redis_url = stack.redis_url(stack.start_redis())
        redis_pid = stack.children[0].process.pid
        share = -(-args.pods // args.publisher_processes)
        processes = [
            multiprocessing.Process(
                target=engines_and_publishers,
                args=(first, min(share, args.pods - first), redis_url, args.interval, args.seconds + 3),
            )
            for first in range(0, args.pods, share)
        ]
        for process in processes:
            process.start()
        time.sleep(2)  # publishers warm up; measure the steady state
        redis_cpu = cpu_seconds(redis_pid)
        publisher_cpu = sum(cpu_seconds(p.pid) for p in processes)  # type: ignore[arg-type]
        latencies = asyncio.run(observe(args.pods, redis_url, args.interval, args.seconds))
        publisher_cpu = sum(cpu_seconds(p.pid) for p in processes) - publisher_cpu  # type: ignore[arg-type]
        redis_cpu = cpu_seconds(redis_pid) - redis_cpu
        for process in processes:
            process.join()
    publishes = args.pods * args.seconds / args.interval
    result = {
        "command": f"python -m bench.freshness --pods {args.pods} --seconds {args.seconds:g} "
        f"--interval {args.interval:g} --publisher-processes {args.publisher_processes}",
        "date": time.strftime("%Y-%m-%d"),
        "subscription": summary(latencies["subscription"]),
        "polling": summary(latencies["polling"]),
        "publisher_cpu_us_per_record": publisher_cpu / publishes * 1e6,
        "redis_cpu_us_per_record": redis_cpu / publishes * 1e6,
    }
    (REPO / "bench" / "results" / "freshness.json").write_text(json.dumps(result, indent=1))
    (REPO / "docs" / "benchmarks" / "freshness.md").write_text(report(result, args.pods, args.interval))
    print(report(result, args.pods, args.interval))


def report(result: dict, pods: int, interval: float) -> str:
    lines = [
        "# Metrics freshness",
        "",
        f"Command: `{result['command']}` ({result['date']}, 2-core machine, everything on loopback).",
        f"{pods} synthetic engines change a metric every 100-300 ms; real sidecar publishers scrape every "
        f"{interval * 1000:.0f} ms and publish to Redis; the latency is from the change in the engine to the "
        "record in the gateway's snapshot (scrape wait, scrape, publish, delivery, decode).",
        "",
        "| reader | changes seen | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("subscription", "polling"):
        row = result[name]
        lines.append(
            f"| {name} | {row['changes']} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} "
            f"| {row['p99_ms']:.1f} | {row['max_ms']:.1f} |"
        )
    lines += [
        "",
        "Cost per published record: sidecar publisher process "
        f"{result['publisher_cpu_us_per_record']:.0f} us of CPU "
        f"(scrape, parse with the official Prometheus parser, window, one pipelined round trip; the "
        f"synthetic engines run in the same process and are included), Redis "
        f"{result['redis_cpu_us_per_record']:.0f} us.",
        "",
        "The gateway reads by subscription (`gateway_plugins/pod_metrics_store.py`): polling adds up to one "
        "polling interval to every change.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
