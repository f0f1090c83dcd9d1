"""The sidecar's adapter API as a hostile caller probes it: each exploit once found is refused here, against
a real sidecar beside a real (emulated) engine, with the default artifact policy."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from brickyard.stack import Engine, Stack, free_port
from brickyard_core.credentials import SIDECAR_TOKEN_ENV
from tests.conftest import MODEL, sidecar_auth
from tests.support.adapters import adapter
from tests.support.http_server import serve_in_thread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(stack: Stack) -> Engine:
    return stack.start_engine("guarded-engine", MODEL, None, "--enable-lora")


@pytest.fixture(scope="module")
def sidecar(stack: Stack, engine: Engine) -> str:
    return f"http://127.0.0.1:{stack.start_sidecar(engine, None)}"


@pytest.fixture
def internal_service() -> Iterator[tuple[int, list[str]]]:
    """Something on the pod's network the sidecar must never be made to call; records what reaches it."""
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="secret")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    with serve_in_thread(app) as port:
        yield port, seen


def call(sidecar: str, action: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        f"{sidecar}/v1/lora_adapter/{action}",
        json=body,
        headers=sidecar_auth() if headers is None else headers,
        timeout=30,
    )


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["type"], body["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic c2lkZWNhcg=="},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "wrong", "basic", "empty"],
)
def test_the_adapter_api_needs_the_token(sidecar: str, headers: dict[str, str], tmp_path: Path) -> None:
    victim = adapter(tmp_path, "victim")
    for method, path, body in [
        ("POST", "/v1/lora_adapter/load", {"lora_name": "victim", "lora_path": str(victim)}),
        ("POST", "/v1/lora_adapter/unload", {"lora_name": "victim"}),
        ("GET", "/v1/models", None),
    ]:
        response = httpx.request(method, f"{sidecar}{path}", json=body, headers=headers)
        assert (response.status_code, response.json()["error"]["type"]) == (401, "unauthorized"), path
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/healthz", "/ready", "/metrics"):  # read-only, for probes and Prometheus
        assert httpx.get(f"{sidecar}{path}").status_code == 200, path
    assert httpx.get(f"{sidecar}/v1/models", headers=sidecar_auth()).status_code == 200


@pytest.mark.parametrize(
    "name", ["{victim}", "../victim", "x/../../victim", "..", ".tmp", "a b", "a\x00b", ""]
)
def test_unload_deletes_nothing_outside_the_cache(
    sidecar: str, stack: Stack, name: str, tmp_path: Path
) -> None:
    """``lora_name`` once became a path: an absolute one replaced the cache directory, and
    ``cleanup_local`` removed it."""
    victim = adapter(tmp_path, "victim")
    (stack.workdir / "adapters").mkdir(exist_ok=True)
    os.symlink(victim, stack.workdir / "adapters" / "victim")  # a cache entry would lead out through a link
    lora_name = name.format(victim=victim)
    status, code, _ = error(call(sidecar, "unload", {"lora_name": lora_name, "cleanup_local": True}))
    assert (status, code) == (400, "invalid_request")
    assert (victim / "adapter_config.json").is_file()
    linked = call(sidecar, "unload", {"lora_name": "victim", "cleanup_local": True})
    assert linked.json()["status"] == "not_loaded"
    assert (victim / "adapter_config.json").is_file()
    (stack.workdir / "adapters" / "victim").unlink()


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:{port}/adapter.tar.gz",
        "https://localhost:{port}/adapter.tar.gz",
        "https://[::ffff:127.0.0.1]:{port}/adapter.tar.gz",
        "https://169.254.169.254/latest/adapter.tar.gz",
        "https://10.0.0.1/adapter.tar.gz",
        "http://127.0.0.1:{port}/adapter.tar.gz",  # and http is not an accepted scheme by default
        "s3://bucket/adapter/",  # with a caller-supplied endpoint on loopback (below)
    ],
)
def test_artifact_urls_cannot_reach_internal_addresses(
    sidecar: str, internal_service: tuple[int, list[str]], url: str
) -> None:
    port, seen = internal_service
    body: dict[str, object] = {"lora_name": "ssrf", "artifact_url": url.format(port=port)}
    if url.startswith("s3://"):
        body["credentials"] = {"endpoint_url": f"http://127.0.0.1:{port}", "aws_access_key_id": "x"}
    status, code, message = error(call(sidecar, "load", body))
    assert (status, code) == (403, "artifact_forbidden"), message
    assert seen == []


@pytest.fixture
def ssh_like_service() -> Iterator[int]:
    """An open port that speaks something else than HTTP: it greets, then hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                connection, _ = listener.accept()
                with connection:
                    connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_connection_failures_all_read_the_same(stack: Stack, engine: Engine, ssh_like_service: int) -> None:
    """With private addresses allowed (an in-cluster store), an error still must not tell a closed port
    from an open one that does not speak HTTP: no port scanning through the sidecar's messages."""
    flags = ("--artifact-scheme", "http", "--allow-private-networks")
    sidecar = f"http://127.0.0.1:{stack.start_sidecar(engine, None, *flags, name='scan-sidecar')}"
    messages = set()
    for target in (ssh_like_service, free_port()):
        url = f"http://127.0.0.1:{target}/a.tar.gz"
        status, code, message = error(call(sidecar, "load", {"lora_name": "scan", "artifact_url": url}))
        assert (status, code) == (502, "artifact_transfer")
        messages.add(message.replace(str(target), "PORT"))
    assert len(messages) == 1, messages


def test_local_paths_outside_the_roots_are_refused_without_a_listing(sidecar: str) -> None:
    """``lora_path: /etc`` once answered with a listing of /etc and let the engine load any path."""
    answers = [
        error(call(sidecar, "load", {"lora_name": "etc", "lora_path": p})) for p in ("/etc", "/no/such")
    ]
    assert {(status, code) for status, code, _ in answers} == {(403, "artifact_forbidden")}
    for _, _, message in answers:
        assert "passwd" not in message and "hosts" not in message
    # Same words for a path that exists and one that does not: nothing to learn about the file system.
    assert answers[0][2].replace("/etc", "P") == answers[1][2].replace("/no/such", "P")


def test_a_missing_adapter_inside_a_root_is_404(sidecar: str, tmp_path: Path) -> None:
    status, code, _ = error(
        call(sidecar, "load", {"lora_name": "ghost", "lora_path": str(tmp_path / "ghost")})
    )
    assert (status, code) == (404, "artifact_not_found")


def test_the_api_will_not_listen_on_the_network_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != SIDECAR_TOKEN_ENV}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "brickyard", "sidecar", "--listen-host", "0.0.0.0"),
            *("--port", str(free_port()), "--no-redis", "--engine-url", "http://127.0.0.1:9"),
            *("--adapter-dir", str(tmp_path)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "token" in result.stderr and "0.0.0.0" in result.stderr


def test_metrics_on_their_own_port_serve_nothing_else(stack: Stack, engine: Engine) -> None:
    metrics_port = free_port()
    port = stack.start_sidecar(engine, None, "--metrics-port", str(metrics_port), name="metrics-sidecar")
    api = f"http://127.0.0.1:{port}"
    metrics = f"http://127.0.0.1:{metrics_port}"
    assert "brickyard_engine_healthy" in httpx.get(f"{metrics}/metrics").text
    assert httpx.get(f"{metrics}/ready").status_code == 200
    assert httpx.get(f"{metrics}/v1/models", headers=sidecar_auth()).status_code == 404
    assert call(metrics, "unload", {"lora_name": "a"}).status_code == 404
    assert httpx.get(f"{api}/metrics").status_code == 404
    assert httpx.get(f"{api}/v1/models", headers=sidecar_auth()).status_code == 200
