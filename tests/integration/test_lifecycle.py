"""Process lifecycle: graceful drain of the gateway, and `brickyard up` from start to Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from brickyard.stack import Engine, Stack, free_port
from tests.conftest import MODEL

pytestmark = pytest.mark.slow


def test_sigterm_drains_open_streams_then_exits(
    stack: Stack, engines: list[Engine], endpoints_file: Path
) -> None:
    gateway = stack.start_gateway(
        "aibrix", endpoints_file, "--config", str(_drain_config(stack.workdir)), name="gateway-drain"
    )
    port, _ = stack.start_envoy("aibrix", gateway.grpc, engines, name="envoy-drain")
    child = next(c for c in stack.children if c.name == "gateway-drain")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    # 400 tokens at 5 ms each: about 2 s of streaming, during which the gateway is told to stop.
    stream = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=400, stream=True
    )
    first = next(stream)
    assert first.choices[0].delta.role == "assistant"
    assert _health(gateway.health, "readiness") == _health(gateway.health, "liveness") == "SERVING"
    assert _health(gateway.health, "envoy.service.ext_proc.v3.ExternalProcessor") == "SERVING"
    child.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert child.process.poll() is None  # still draining: the stream holds it
    assert _health(gateway.health, "readiness") == "NOT_SERVING"  # load balancers stop sending new streams
    assert _health(gateway.health, "liveness") == "SERVING"
    rest = list(stream)
    assert len(rest) == 400  # every token arrived (the last one's chunk carries finish_reason, as in vLLM)
    assert rest[-1].choices[0].finish_reason == "length"
    assert child.process.wait(10) == 0
    after = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert after.status_code >= 500  # Envoy, with no gateway left, answers in OpenAI's shape
    assert after.json()["error"]["type"] == "api_error"
    stack.stop_child(next(c for c in stack.children if c.name == "envoy-drain"))


def _health(port: int, service: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _drain_config(workdir: Path) -> Path:
    path = workdir / "drain.yaml"
    path.write_text("drain_seconds: 15\n")
    return path


def test_brickyard_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "brickyard", "up", "--engines", "2", "--port", str(port), "--model", "m"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    stdout = process.stdout
    assert stdout is not None  # here, not in the reader thread, where a failure would fail no test
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in stdout:
            lines.append(line)
            if "Brickyard is ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(60), "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in "".join(lines)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert api.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).choices
        chunks = list(
            api.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        )
        assert chunks[-1].choices[0].finish_reason == "length"
        children = _children(process.pid)
        assert len(children) == 7  # redis, 2 engines, 2 sidecars, gateway, envoy
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, "".join(lines)
    assert not [pid for pid in children if _alive(pid)], "children outlived `brickyard up`"


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status not in {"Z", "X"}
