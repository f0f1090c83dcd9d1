"""The shipped Envoy configs' hardening, enforced by a real Envoy: slow and idle clients are cut off,
connections are capped, header names with underscores are dropped, and a slow answer still arrives.

Each test starts an Envoy from envoy/<contract>.yaml, in front of the contract's gateway and an emulated
engine, with one limit tightened (seconds instead of the shipped values, three connections instead of
thousands) so that it trips quickly; test_envoy_configs.py checks the shipped values. The misbehaving
clients are raw sockets: HTTP libraries do not trickle on purpose.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from brickyard.stack import LOOPBACK, Engine, GatewayPorts, Stack, free_port, render_envoy_config
from tests.conftest import MODEL
from tests.integration.test_envoy_configs import (
    CONNECTION_LIMIT,
    DOWNSTREAM_CONNECTIONS,
    http_connection_manager,
    network_filter,
    resource_monitor,
)

pytestmark = pytest.mark.slow

#: Seconds between the bytes of a trickling client: not a divisor of the tightened timeouts, so that Envoy's
#: timer fires while the client waits for an answer rather than while it writes.
TRICKLE_INTERVAL = 0.75
#: How long a test waits for Envoy to cut a connection: generous, the machine may be loaded.
CUT_LIMIT = 10.0
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
#: The emulated engine answers this late: longer than the tightened request_timeout.
ENGINE_DELAY_MS = 3000


@dataclass(frozen=True)
class Envoy:
    port: int
    admin: int

    def connect(self) -> socket.socket:
        return socket.create_connection((LOOPBACK, self.port), timeout=CUT_LIMIT)

    def stats(self) -> dict[str, int]:
        """Counters and gauges from the admin endpoint (histograms left out)."""
        text = httpx.get(f"http://{LOOPBACK}:{self.admin}/stats", timeout=10).text
        pairs = (line.split(": ", 1) for line in text.splitlines())
        return {name: int(value) for name, value in pairs if value.isdigit()}

    def wait_stat(self, name: str, value: int) -> None:
        deadline = time.monotonic() + CUT_LIMIT
        while self.stats().get(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}: {self.stats().get(name)}"
            time.sleep(0.05)


StartEnvoy = Callable[[dict[str, Any]], Envoy]


@pytest.fixture(scope="module")
def hardening_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("hardening")) as running:
        yield running


@pytest.fixture(scope="module")
def slow_engine(hardening_stack: Stack) -> Engine:
    """An engine that sends nothing, not even headers, for ENGINE_DELAY_MS (non-streamed answers)."""
    return hardening_stack.start_engine(
        "slow-engine", MODEL, None, "--profile", "instant", "--ttft-ms", str(ENGINE_DELAY_MS)
    )


@pytest.fixture(scope="module", params=["aibrix", "epp"])
def contract(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def gateway(hardening_stack: Stack, slow_engine: Engine, contract: str) -> Iterator[GatewayPorts]:
    """The contract's gateway: on the request path of every test, and in EPP on the response path of Envoy's
    own replies too (a 408 reaches the client through it)."""
    endpoints = hardening_stack.write_endpoints(
        [slow_engine], MODEL, hardening_stack.workdir / f"endpoints-{contract}.yaml"
    )
    name = f"gateway-{contract}"
    yield hardening_stack.start_gateway(contract, endpoints, name=name)
    hardening_stack.stop_child(hardening_stack.child(name))


@pytest.fixture
def config(contract: str, gateway: GatewayPorts, slow_engine: Engine) -> dict[str, Any]:
    """The shipped config on free ports, for a test to tighten before it starts Envoy."""
    return render_envoy_config(
        contract,
        listen_port=free_port(),
        admin_port=free_port(),
        gateway_port=gateway.grpc,
        engines=[slow_engine.address],
    )


@pytest.fixture
def start_envoy(
    hardening_stack: Stack, contract: str, request: pytest.FixtureRequest
) -> Iterator[StartEnvoy]:
    """Starts Envoy with a rendered config; every Envoy it started stops with the test."""
    names: list[str] = []

    def start(config: dict[str, Any]) -> Envoy:
        names.append(f"envoy-{request.node.name}-{len(names)}")
        # The ports, the gateway and the engines come from the config.
        port, admin = hardening_stack.start_envoy(contract, 0, (), name=names[-1], config=config)
        return Envoy(port, admin)

    yield start
    for name in names:
        hardening_stack.stop_child(hardening_stack.child(name))


def until_cut(sock: socket.socket, chunks: Iterator[bytes]) -> tuple[float, bytes]:
    """Send one of ``chunks`` every TRICKLE_INTERVAL until Envoy answers or closes the connection.

    Returns the seconds that took and what Envoy sent before closing (nothing if it just closed)."""
    started = time.monotonic()
    sock.settimeout(TRICKLE_INTERVAL)
    while time.monotonic() - started < CUT_LIMIT:
        try:
            sock.sendall(next(chunks))
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            answer = b""
        elapsed = time.monotonic() - started
        if answer:
            answer += read_to_end(sock)
        return elapsed, answer
    raise AssertionError(f"Envoy kept a trickling connection open for {CUT_LIMIT:.0f} s")


def read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(CUT_LIMIT)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


def status(answer: bytes) -> int | None:
    """The status code of a raw HTTP/1.1 answer; None for no answer."""
    return int(answer.split(b" ", 2)[1]) if answer else None


def test_slow_request_headers_are_cut_off(config: dict[str, Any], start_envoy: StartEnvoy) -> None:
    http_connection_manager(config)["request_headers_timeout"] = "1s"
    envoy = start_envoy(config)
    with envoy.connect() as sock:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        # The request line, then a header that never ends: one byte at a time.
        elapsed, answer = until_cut(sock, itertools.chain([head, b"x-trickle: "], itertools.repeat(b"a")))
    assert 0.9 < elapsed < CUT_LIMIT, elapsed
    assert status(answer) == 408, answer
    assert envoy.stats()["http.openai.downstream_rq_header_timeout"] == 1


def test_slow_request_body_is_cut_off(config: dict[str, Any], start_envoy: StartEnvoy) -> None:
    http_connection_manager(config)["request_timeout"] = "2s"
    envoy = start_envoy(config)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(CHAT)}\r\n\r\n"
    ).encode()
    with envoy.connect() as sock:
        # Complete headers, then the body one byte at a time: it would take a minute to arrive.
        elapsed, answer = until_cut(sock, itertools.chain([head], (bytes([b]) for b in CHAT)))
    assert 1.9 < elapsed < CUT_LIMIT, elapsed
    assert status(answer) == 408, answer
    assert envoy.stats()["http.openai.downstream_rq_timeout"] == 1


def test_request_timeout_does_not_limit_a_slow_answer(
    config: dict[str, Any], start_envoy: StartEnvoy
) -> None:
    """The request is complete at once; the engine then answers after ENGINE_DELAY_MS, three times the
    request timeout, sending nothing before: Envoy disarmed the timer when the request was in."""
    http_connection_manager(config)["request_timeout"] = "1s"
    envoy = start_envoy(config)
    started = time.monotonic()
    reply = httpx.post(
        f"http://{LOOPBACK}:{envoy.port}/v1/chat/completions",
        content=CHAT,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert time.monotonic() - started > ENGINE_DELAY_MS / 1000
    assert envoy.stats()["http.openai.downstream_rq_timeout"] == 0


def test_idle_client_connection_is_closed(config: dict[str, Any], start_envoy: StartEnvoy) -> None:
    http_connection_manager(config)["common_http_protocol_options"]["idle_timeout"] = "1s"
    envoy = start_envoy(config)
    with envoy.connect() as sock:  # sends nothing
        elapsed, answer = until_cut(sock, itertools.repeat(b""))
    assert 0.9 < elapsed < CUT_LIMIT, elapsed
    assert answer == b""
    assert envoy.stats()["http.openai.downstream_cx_idle_timeout"] == 1


def _limit_listener(config: dict[str, Any], limit: int) -> None:
    network_filter(config, CONNECTION_LIMIT)["max_connections"] = limit


def _limit_process(config: dict[str, Any], limit: int) -> None:
    resource_monitor(config, DOWNSTREAM_CONNECTIONS)["max_active_downstream_connections"] = limit


@pytest.mark.parametrize(
    ("limit", "rejected_stat"),
    [
        pytest.param(_limit_listener, "connection_limit.openai.limited_connections", id="listener"),
        pytest.param(_limit_process, "listener.{address}.downstream_global_cx_overflow", id="global"),
    ],
)
def test_connections_past_the_limit_are_closed(
    config: dict[str, Any],
    limit: Callable[[dict[str, Any], int], None],
    rejected_stat: str,
    start_envoy: StartEnvoy,
) -> None:
    limit(config, 3)
    envoy = start_envoy(config)
    address = f"{LOOPBACK}_{envoy.port}"
    with ExitStack() as held:
        first = [held.enter_context(envoy.connect()) for _ in range(3)]
        envoy.wait_stat(f"listener.{address}.downstream_cx_active", 3)
        with envoy.connect() as extra:  # sends nothing: Envoy closes it
            elapsed, answer = until_cut(extra, itertools.repeat(b""))
        assert answer == b""
        assert elapsed < CUT_LIMIT / 2  # closed at once, not by a timeout
        assert envoy.stats()[rejected_stat.format(address=address)] == 1
        for sock in first:  # the connections within the limit still carry requests
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_header_names_with_underscores_are_dropped(config: dict[str, Any], start_envoy: StartEnvoy) -> None:
    """The request goes on (the gateway answers it), without the header."""
    envoy = start_envoy(config)
    reply = httpx.get(f"http://{LOOPBACK}:{envoy.port}/v1/models", headers={"target_pod": "10.0.0.1:8000"})
    assert reply.status_code == 200, reply.text
    assert envoy.stats()["http1.dropped_headers_with_underscores"] == 1


def test_http2_clients_are_told_the_stream_limit(config: dict[str, Any], start_envoy: StartEnvoy) -> None:
    envoy = start_envoy(config)
    with envoy.connect() as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, b""))  # preface, empty SETTINGS
        kind, payload = _read_frame(sock)
    assert kind == 4  # the server's first frame is its SETTINGS
    settings = dict(struct.iter_unpack("!HI", payload))
    assert settings[3] == 100  # SETTINGS_MAX_CONCURRENT_STREAMS


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + struct.pack("!BBI", kind, 0, 0) + payload


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 9)
    length = int.from_bytes(header[:3], "big")
    return header[3], _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "Envoy closed the connection"
        data += chunk
    return data
