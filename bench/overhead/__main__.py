"""Gateway overhead benchmark: what Envoy + Brickyard add over Envoy alone and over no proxy.

    python -m bench.overhead [--rounds 3] [--duration 10] [--rates 100,400] [--max-seconds 10]
                             [--baseline REF]

Four paths to the same emulated engines, measured in interleaved rounds in one
run (the machine is shared and noisy, so compare within a run, as ratios):

    direct       client -> engine
    envoy        client -> Envoy (round robin, no ext_proc)
    obvious      client -> Envoy -> an ext_proc written the obvious way (grpc.aio, json.loads)
    aibrix       client -> Envoy -> ext_proc gateway (AIBrix contract, random strategy)
    epp          client -> Envoy -> ext_proc gateway (EPP contract, random strategy)
    limits       aibrix with tenancy: the ``user`` header's RPM/TPM checked in Redis, usage not read
    accounting   limits + the response read for its usage (headers and body through the gateway)
    prefix       aibrix with ``prefix-cache`` (prompt hashed in text blocks, the approximate index)
    prefix-exact aibrix with ``prefix-cache`` and the model's own tokenizer and chat template (the tiny
                 model of bench/real_vllm, built with the vLLM environment): every prompt rendered and
                 tokenized, token blocks hashed

``--baseline REF`` adds ``aibrix@REF`` and ``epp@REF``: the same two paths with the gateway of an
earlier commit (a git worktree), so a change to the request path is measured against the code before it
in the same run.

Open-loop load at fixed rates gives latency percentiles; ``wrk`` (closed loop,
16 connections) gives the highest rate served without errors. CPU per request
of Envoy and of the gateway comes from /proc. Writes bench/results/overhead.json
and docs/benchmarks/overhead.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop

from bench.loadgen import open_loop
from bench.procstat import total_cpu
from bench.real_vllm import vllm_python
from bench.real_vllm.tiny_model import built_model
from brickyard.stack import Engine, Stack, free_port, render_envoy_config, tcp_answers

REPO = Path(__file__).resolve().parents[2]
MODEL = "bench-model"
BODY = json.dumps(
    {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 18},
            {"role": "user", "content": "How does an LLM-aware gateway pick an engine?"},
        ],
    }
).encode()
PATHS = ("direct", "envoy", "obvious", "aibrix", "epp", "limits", "accounting", "prefix", "prefix-exact")
GATEWAYS = ("obvious", "aibrix", "epp", "limits", "accounting", "prefix", "prefix-exact")
#: Every request names a tenant; only the tenancy paths read it.
HEADERS = {"user": "bench-tenant"}


def round_robin_envoy(listen_port: int, admin_port: int, engines: list[Engine]) -> dict[str, Any]:
    """Envoy alone: the AIBrix config without ext_proc, routing round robin to a static cluster."""
    config = render_envoy_config("aibrix", listen_port=listen_port, admin_port=admin_port, gateway_port=1)
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    (manager,) = [
        f["typed_config"] for f in filters if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    manager["http_filters"] = [
        f for f in manager["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
    ]
    host = manager["route_config"]["virtual_hosts"][0]
    host.pop("response_headers_to_add", None)
    host["routes"][0]["route"]["cluster"] = "engines_rr"
    config["static_resources"]["clusters"] = [
        {
            "name": "engines_rr",
            "type": "STATIC",
            "lb_policy": "ROUND_ROBIN",
            "connect_timeout": "1s",
            "circuit_breakers": {
                "thresholds": [
                    {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
                ]
            },
            "load_assignment": {
                "cluster_name": "engines_rr",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": "127.0.0.1", "port_value": e.port}
                                    }
                                }
                            }
                            for e in engines
                        ]
                    }
                ],
            },
        }
    ]
    return config


class Bench:
    def __init__(self, stack: Stack, baseline: tuple[str, Path] | None = None) -> None:
        self.stack = stack
        self.paths = list(PATHS)
        self.engines = [
            stack.start_engine(f"engine-{i}", MODEL, None, "--profile", "instant") for i in range(3)
        ]
        endpoints = stack.write_endpoints(self.engines, MODEL, stack.workdir / "endpoints.yaml")
        self.urls: dict[str, list[str]] = {"direct": [f"{e.url}/v1/chat/completions" for e in self.engines]}
        self.pids: dict[str, list[int]] = {"direct": []}
        self.envoy_pid: dict[str, int] = {}
        self.gateway_pid: dict[str, int] = {}
        port, admin = free_port(), free_port()
        self._start_envoy("envoy", round_robin_envoy(port, admin, self.engines), port)
        obvious = free_port()
        stack.spawn(
            "obvious-extproc",
            [
                sys.executable,
                "-m",
                "bench.overhead.obvious_extproc",
                "--port",
                str(obvious),
                "--endpoints",
                str(endpoints),
            ],
            ready=lambda: tcp_answers(obvious),
        )
        self.gateway_pid["obvious"] = self.stack.pid("obvious-extproc")
        port, _ = stack.start_envoy("aibrix", obvious, self.engines, name="envoy-obvious")
        self.envoy_pid["obvious"] = self.stack.pid("envoy-obvious")
        self.urls["obvious"] = [f"http://127.0.0.1:{port}/v1/chat/completions"]
        redis_port = stack.start_redis()
        tokenizer = str(built_model(vllm_python()) / "model")
        for path, contract in (
            ("aibrix", "aibrix"),
            ("epp", "epp"),
            ("limits", "aibrix"),
            ("accounting", "aibrix"),
            ("prefix", "aibrix"),
            ("prefix-exact", "aibrix"),
        ):
            extra = ["--default-strategy", "prefix-cache" if path.startswith("prefix") else "random"]
            if path == "prefix-exact":
                config = stack.workdir / f"{path}.yaml"
                config.write_text(json.dumps({"models": {MODEL: {"tokenizer": tokenizer}}}))
                extra += ["--config", str(config)]
            if path in ("limits", "accounting"):
                config = stack.workdir / f"{path}.yaml"
                tenancy = {"enabled": True, "default_rpm": 10**9, "account_usage": path == "accounting"}
                config.write_text(json.dumps({"tenancy": tenancy}))
                extra += ["--config", str(config)]
            gateway = stack.start_gateway(
                contract,
                endpoints,
                *extra,
                name=f"gateway-{path}",
                log_level="warning",
                redis_port=redis_port if path in ("limits", "accounting") else None,
            )
            self.gateway_pid[path] = self.stack.pid(f"gateway-{path}")
            port, _ = stack.start_envoy(contract, gateway.grpc, self.engines, name=f"envoy-{path}")
            self.envoy_pid[path] = self.stack.pid(f"envoy-{path}")
            self.urls[path] = [f"http://127.0.0.1:{port}/v1/chat/completions"]
        if baseline is not None:
            self._start_baseline(*baseline, endpoints)
        for path in self.paths[1:]:
            self.pids[path] = [self.envoy_pid[path]] + (
                [self.gateway_pid[path]] if path in self.gateway_pid else []
            )

    def _start_baseline(self, ref: str, tree: Path, endpoints: Path) -> None:
        """The aibrix and epp paths again, with the gateway of the checkout ``tree`` (commit ``ref``)."""
        for contract in ("aibrix", "epp"):
            path = f"{contract}@{ref}"
            gateway = self.stack.start_gateway(
                contract,
                endpoints,
                "--default-strategy",
                "random",
                name=f"gateway-{contract}-baseline",
                log_level="warning",
                env={"PYTHONPATH": str(tree)},  # its packages before the installed ones
            )
            self.gateway_pid[path] = self.stack.pid(f"gateway-{contract}-baseline")
            port, _ = self.stack.start_envoy(
                contract, gateway.grpc, self.engines, name=f"envoy-{contract}-baseline"
            )
            self.envoy_pid[path] = self.stack.pid(f"envoy-{contract}-baseline")
            self.urls[path] = [f"http://127.0.0.1:{port}/v1/chat/completions"]
            self.paths.append(path)

    def _start_envoy(self, name: str, config: dict[str, Any], port: int) -> None:
        self.stack.start_envoy("aibrix", 0, self.engines, name=name, config=config)
        self.envoy_pid[name] = self.stack.pid(name)
        self.urls[name] = [f"http://127.0.0.1:{port}/v1/chat/completions"]

    def cpu(self, path: str) -> dict[str, float]:
        out = {"envoy": total_cpu([self.envoy_pid[path]]) if path in self.envoy_pid else 0.0}
        out["gateway"] = total_cpu([self.gateway_pid[path]]) if path in self.gateway_pid else 0.0
        return out

    def fixed_rate(self, path: str, rate: float, duration: float) -> dict[str, float]:
        before = self.cpu(path)
        result = uvloop.run(open_loop(self.urls[path], BODY, rate, duration, HEADERS))
        after = self.cpu(path)
        row = result.summary()
        for part in ("envoy", "gateway"):
            row[f"{part}_cpu_us"] = (after[part] - before[part]) / max(result.completed, 1) * 1e6
        return row

    def closed_loop(self, path: str, seconds: float, script: Path) -> dict[str, float]:
        before = self.cpu(path)
        url = self.urls[path][0] if path != "direct" else self.urls["direct"][0]
        out = subprocess.run(
            ["wrk", "-t1", "-c16", f"-d{seconds:.0f}s", "-s", str(script), url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = self.cpu(path)
        requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        socket_errors = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        errors = (int(non_2xx.group(1)) if non_2xx else 0) + (
            sum(map(int, socket_errors.groups())) if socket_errors else 0
        )
        row = {
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "errors": errors,
        }
        for part in ("envoy", "gateway"):
            row[f"{part}_cpu_us"] = (after[part] - before[part]) / max(requests, 1) * 1e6
        return row


@contextlib.contextmanager
def worktree(ref: str | None) -> Iterator[Path | None]:
    """A temporary git worktree of ``ref`` (None: nothing), removed afterwards."""
    if ref is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


def median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per fixed-rate run")
    parser.add_argument("--rates", default="100,400")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overhead.json")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "benchmarks" / "overhead.md")
    parser.add_argument("--baseline", help="also run the aibrix and epp gateways of this git commit")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    wrk = shutil.which("wrk")
    with (
        Stack(Path(tempfile.mkdtemp(prefix="bench-overhead-"))) as stack,
        tempfile.TemporaryDirectory() as tmp,
        worktree(args.baseline) as baseline,
    ):
        bench = Bench(stack, (args.baseline, baseline) if baseline else None)
        runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {} for p in bench.paths}
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items())
            + f"wrk.body = {json.dumps(BODY.decode())}\n"
        )
        for path in bench.paths:  # warm up every path (connections, caches)
            bench.fixed_rate(path, 200, 2)
        for n in range(args.rounds):
            for path in bench.paths:
                for rate in rates:
                    row = bench.fixed_rate(path, rate, args.duration)
                    runs[path].setdefault(f"rate_{rate:.0f}", []).append(row)
                    print(
                        f"round {n + 1} {path:14s} {rate:5.0f}/s p50 {row['p50_ms']:.2f} ms "
                        f"p99 {row['p99_ms']:.2f} ms gw {row['gateway_cpu_us']:.0f} us "
                        f"envoy {row['envoy_cpu_us']:.0f} us errors {row['errors']}",
                        flush=True,
                    )
                if wrk:
                    row = bench.closed_loop(path, args.max_seconds, script)
                    runs[path].setdefault("max", []).append(row)
                    print(
                        f"round {n + 1} {path:14s} max {row['rps']:.0f} req/s errors {row['errors']} "
                        f"gw {row['gateway_cpu_us']:.0f} us envoy {row['envoy_cpu_us']:.0f} us",
                        flush=True,
                    )
    results = {
        "command": "python -m bench.overhead "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in {"out", "report"}
        ),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "runs": runs,
        "median": {
            path: {kind: median_rows(rows) for kind, rows in kinds.items()} for path, kinds in runs.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(results, rates))
    print(report(results, rates))


def report(results: dict[str, Any], rates: list[float]) -> str:
    med = results["median"]
    top = f"rate_{rates[-1]:.0f}"
    lines = [
        "# Overhead benchmark",
        "",
        f"Command: `{results['command']}` ({results['date']}, {results['machine']}; medians of the rounds).",
        "Engines: 3 emulated engines (`--profile instant`: no queueing, no step time), 1 KB chat body, "
        "8 output tokens.",
        "Envoy runs one worker (`--concurrency 1`). Latency is from the scheduled send time (open loop).",
        "",
        "| path | "
        + " | ".join(f"p50 / p99 at {r:.0f}/s (ms)" for r in rates)
        + " | added p50 / p99 over Envoy at "
        + f"{rates[-1]:.0f}/s (ms) | gateway CPU/req (us) "
        "| Envoy CPU/req (us) | max req/s (wrk, 16 conns) |",
        "|---" * (5 + len(rates)) + "|",
    ]
    baselines = [p for p in med if "@" in p]
    for path in [*PATHS, *baselines]:
        cells = [path]
        for rate in rates:
            row = med[path][f"rate_{rate:.0f}"]
            cells.append(f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f}")
        row, base = med[path][top], med["envoy"][top]
        added = (
            "—"
            if path in ("direct", "envoy")
            else (f"{row['p50_ms'] - base['p50_ms']:+.2f} / {row['p99_ms'] - base['p99_ms']:+.2f}")
        )
        cells.append(added)
        cells.append(f"{row['gateway_cpu_us']:.0f}" if path in GATEWAYS or "@" in path else "—")
        cells.append(f"{row['envoy_cpu_us']:.0f}" if path != "direct" else "—")
        maximum = med[path].get("max")
        cells.append(f"{maximum['rps']:.0f} ({maximum['errors']:.0f} errors)" if maximum else "n/a (no wrk)")
        lines.append("| " + " | ".join(cells) + " |")
    if "max" in med["envoy"]:
        ratios = (f"{p} {med[p]['max']['rps'] / med['envoy']['max']['rps']:.2f}x" for p in GATEWAYS)
        lines += ["", f"Highest sustained rate relative to Envoy alone: {', '.join(ratios)}."]
    where = {
        kind: "at the maximum rate" if kind == "max" else f"at {kind.removeprefix('rate_')}/s"
        for kind in med["obvious"]
    }
    cpu = (
        f"{p} {med[p][kind]['gateway_cpu_us'] / med['obvious'][kind]['gateway_cpu_us']:.2f}x ({where[kind]})"
        for p in ("aibrix", "epp")
        for kind in med[p]
    )
    lines += ["", f"Gateway CPU per request relative to the obvious grpc.aio ext_proc: {', '.join(cpu)}."]
    cost = (
        f"{p} {med[p][top][part] - med['aibrix'][top][part]:+.0f} us {name}"
        for p in ("limits", "accounting")
        for part, name in (("gateway_cpu_us", "gateway"), ("envoy_cpu_us", "Envoy"))
    )
    lines += [
        "",
        f"Cost of tenancy per request at {rates[-1]:.0f}/s, over plain aibrix: {', '.join(cost)}; "
        "`limits` is one Redis round trip (RPM and TPM checked and counted by one Lua script), "
        "`accounting` adds the response headers and body passing through the gateway for their usage.",
    ]
    prefix_cpu = (
        f"{p} {med[p][kind]['gateway_cpu_us'] / med['aibrix'][kind]['gateway_cpu_us']:.2f}x ({where[kind]})"
        for p in ("prefix", "prefix-exact")
        for kind in med[p]
    )
    lines += [
        "",
        f"Gateway CPU per request of `prefix-cache` relative to `random` (aibrix): {', '.join(prefix_cpu)}; "
        "`prefix-exact` renders the chat template and tokenizes every prompt with the model's tokenizer.",
    ]
    for baseline in baselines:
        now = baseline.partition("@")[0]
        cpu_ratio = (
            f"{kind.removeprefix('rate_')}/s "
            f"{med[now][kind]['gateway_cpu_us'] / med[baseline][kind]['gateway_cpu_us']:.2f}x"
            for kind in med[now]
            if kind != "max"
        )
        rps_ratio = f", max req/s {med[now]['max']['rps'] / med[baseline]['max']['rps']:.2f}x"
        lines += [
            "",
            f"{now} relative to {baseline} (this tree over the baseline): gateway CPU per request "
            f"{', '.join(cpu_ratio)}{rps_ratio if 'max' in med[now] else ''}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
