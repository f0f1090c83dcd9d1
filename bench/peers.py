"""Peer routers for the routing benchmark: sglang-router and vllm-router on loopback, offline.

    python -m bench.peers [--install]     # is the peers' virtualenv usable? (--install: build it first)

Both are Rust routers from PyPI. They live in their own virtualenv (``.peers/`` at the repository root)
so that their pins (fastapi, pydantic, aiohttp ...) never touch the project's environment, and they are
pinned to the versions whose flags and worker calls this module was checked against:

* sglang-router 0.3.2 (``sglang-router launch``). At worker registration it probes each URL for gRPC
  (an HTTP/2 preface; the emulator logs it as a bad request) and asks ``/server_info``,
  ``/get_server_info``, ``/model_info`` and ``/get_model_info`` (404 from vLLM and the emulator, so the
  model stays ``unknown``: harmless, requests of any model are routed). Health: ``GET /health``.
  ``cache_aware`` keeps a character radix tree of the request text and needs nothing more from workers;
  ``power_of_two`` polls ``GET /get_load`` every ``--worker-startup-check-interval`` seconds (default
  30) and reads only SGLang's list ``[{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}]``,
  comparing the summed ``num_tokens``; any other answer counts as load -1, i.e. random choice.
* vllm-router 0.1.17. Waits for ``GET /health`` of every worker before it listens. ``cache_aware``
  tokenizes each request by calling ``POST /v1/completions/render`` or ``/v1/chat/completions/render``
  on every worker (it reads ``token_ids`` from an object or a one-element list; without them it falls
  back to ``POST /tokenize``) and keeps a token radix tree. Its ``power_of_two`` (not benchmarked) reads
  ``{"load": N}`` from ``GET /get_load``.

The two disagree on ``/get_load``, so ``start_peer`` tells each emulated engine which shape to serve
(``POST /emulator/load_format``) before it starts a peer: engines shared by several peers in turn are
fine, two peers with different needs at the same time on the same engines are not.

Both routers re-serialize request bodies (adding their own default fields, e.g. ``ignore_eos``,
``skip_special_tokens``, ``max_completion_tokens`` for chat) and pass the engine's response headers
through (``x-emulator-pod`` shows which engine served a request).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from brickyard.stack import LOOPBACK, REPO_ROOT, Stack, StackError, free_port

log = logging.getLogger(__name__)

PEERS_VENV = REPO_ROOT / ".peers"
PACKAGES = ("sglang-router==0.3.2", "vllm-router==0.1.17")
# Modules whose import loads each router's Rust extension: proof that the wheel works on this machine.
PROBE = "import sglang_router.router, vllm_router.router"

# sglang-router loads a tokenizer for a worker's model when the worker reports a model path (real SGLang
# does, in /get_model_info; vLLM and the emulator do not): keep that, and any other Hugging Face call,
# off the network. reqwest honours HTTP(S)_PROXY, so loopback must bypass any proxy in the environment.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@dataclass(frozen=True)
class PeerSpec:
    """One router and policy, with the flags that make it run well here."""

    router: str  # "sglang-router" or "vllm-router"
    policy: str
    # The /get_load shape the engines must serve (see the module docstring): "load" or "sglang".
    load_format: str = "load"
    # Besides host, ports, workers, policy, Prometheus and logging. A 1 s worker check interval makes
    # startup quick when an engine is late, and is sglang-router's load poll period for power_of_two.
    extra: tuple[str, ...] = ("--worker-startup-check-interval", "1")

    @property
    def name(self) -> str:
        return f"{self.router}:{self.policy}"

    def argv(
        self, port: int, prometheus_port: int, engine_urls: Sequence[str], log_level: str = "warn"
    ) -> list[str]:
        """The command line; ``log_level`` is sglang's spelling (debug, info, warn, error)."""
        binary = str(PEERS_VENV / "bin" / self.router)
        common = [
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--worker-urls",
            *engine_urls,
            "--policy",
            self.policy,
            "--prometheus-host",
            LOOPBACK,
            "--prometheus-port",
            str(prometheus_port),
            *self.extra,
        ]
        if self.router == "sglang-router":
            return [binary, "launch", *common, "--log-level", log_level]
        return [binary, *common, "--log-level", "warning" if log_level == "warn" else log_level]


# On SIGTERM sglang-router waits up to --shutdown-grace-period-secs (default 180) for requests in flight.
SGLANG_EXTRA = ("--worker-startup-check-interval", "1", "--shutdown-grace-period-secs", "5")

PEERS: dict[str, PeerSpec] = {
    spec.name: spec
    for spec in (
        PeerSpec("sglang-router", "cache_aware", extra=SGLANG_EXTRA),
        PeerSpec("sglang-router", "power_of_two", load_format="sglang", extra=SGLANG_EXTRA),
        PeerSpec("vllm-router", "cache_aware"),
    )
}


def peers_available() -> bool:
    """True when ``.peers`` exists and both routers' Rust extensions import there."""
    python = PEERS_VENV / "bin" / "python"
    scripts = [PEERS_VENV / "bin" / name for name in ("sglang-router", "vllm-router")]
    if not python.exists() or not all(script.exists() for script in scripts):
        return False
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, timeout=60, check=False)
    return probe.returncode == 0


def install_peers() -> None:
    """Create ``.peers`` and install the pinned routers into it; does nothing when they already work."""
    if peers_available():
        return
    # From inside a virtualenv, ``-m venv`` builds on the base interpreter, as it should.
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    python = str(PEERS_VENV / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    if not peers_available():
        raise RuntimeError(f"installed {', '.join(PACKAGES)} into {PEERS_VENV}, but they do not import")


def start_peer(
    stack: Stack,
    name: str,
    engine_urls: list[str],
    model: str,
    *,
    log_level: str = "warn",
    timeout: float = 60.0,
) -> str:
    """Start peer ``name`` (a key of ``PEERS``) in front of ``engine_urls``; returns its base URL.

    The router is a supervised child of ``stack`` (log: ``<workdir>/<router>-<policy>-<port>.log``,
    stopped with the stack or by ``stop_peer``). Ready means every engine is registered and healthy
    in the router and one ``/v1/completions`` request of ``model`` (one prompt word, one output token)
    got a 200 through it. ``log_level`` stays at warn by default: at info both log every request,
    which costs them CPU in a benchmark.
    """
    try:
        spec = PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}") from None
    if not engine_urls:
        raise ValueError("a peer needs at least one engine")
    for url in engine_urls:
        _set_load_format(url, spec.load_format)
    port, prometheus_port = free_port(), free_port()
    started = time.monotonic()
    stack.spawn(
        f"{spec.router}-{spec.policy}-{port}",
        spec.argv(port, prometheus_port, engine_urls, log_level),
        ready=lambda: _ready(port, len(engine_urls), model),
        timeout=timeout,
        env=OFFLINE_ENV,
    )
    log.info(
        "peer ready", extra={"peer": name, "port": port, "seconds": round(time.monotonic() - started, 3)}
    )
    return f"http://{LOOPBACK}:{port}"


def stop_peer(stack: Stack, base_url: str) -> None:
    """Stop the peer that ``start_peer`` returned ``base_url`` for (e.g. before the next peer's run)."""
    port = base_url.rstrip("/").rpartition(":")[2]
    routers = tuple(f"{spec.router}-" for spec in PEERS.values())
    for child in list(stack.children):
        if child.name.startswith(routers) and child.name.endswith(f"-{port}"):
            stack.stop_child(child)
            return
    raise ValueError(f"no peer of this stack listens on {base_url}")


def _set_load_format(engine_url: str, load_format: str) -> None:
    """Make an emulated engine answer /get_load the way this peer reads it."""
    request = urllib.request.Request(
        f"{engine_url.rstrip('/')}/emulator/load_format",
        data=json.dumps({"format": load_format}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        if load_format != "load":  # an engine that is not the emulator serves its own shape, if any
            raise StackError(f"{engine_url} cannot serve /get_load as {load_format!r}: {exc}") from exc


def _ready(port: int, workers: int, model: str) -> bool:
    """All workers registered and healthy, and one request routed end to end."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        connection.request("GET", "/readiness")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200 or json.loads(body).get("healthy_workers", 0) < workers:
            return False
        payload = json.dumps({"model": model, "prompt": "ping", "max_tokens": 1})
        connection.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help=f"build {PEERS_VENV} first (idempotent)")
    args = parser.parse_args()
    if args.install:
        install_peers()
    available = peers_available()
    print(f"peers in {PEERS_VENV}: {'available' if available else 'missing'} ({', '.join(PACKAGES)})")
    print("peers:", ", ".join(PEERS))
    sys.exit(0 if available else 1)


if __name__ == "__main__":
    main()
