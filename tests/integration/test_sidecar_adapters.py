"""The sidecar's adapter API against a real emulated engine: load, verify, unload, and every refusal."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from brickyard.stack import Engine, Stack
from tests.conftest import MODEL, sidecar_auth
from tests.support.adapters import adapter
from tests.support.http_server import serve_in_thread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_engine(stack: Stack) -> Engine:
    return stack.start_engine("lora-engine", MODEL, None, "--enable-lora", "--max-loras", "2")


@pytest.fixture(scope="module")
def sidecar(stack: Stack, lora_engine: Engine) -> str:
    # The archive server is on loopback: a private address this sidecar must be allowed to fetch from.
    port = stack.start_sidecar(
        lora_engine, None, "--max-adapters", "2", "--artifact-scheme", "http", "--allow-private-networks"
    )
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def archive_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serves adapter archives over HTTP, as an artifact store would."""
    buffer = io.BytesIO()
    source = adapter(tmp_path_factory.mktemp("archives"), "summarizer")
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname="summarizer")
    archive = buffer.getvalue()

    async def summarizer(_: web.Request) -> web.Response:
        return web.Response(body=archive)

    app = web.Application()
    app.router.add_get("/adapters/summarizer.tar.gz", summarizer)
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


def engine_models(engine: Engine) -> list[str]:
    return [card["id"] for card in httpx.get(f"{engine.url}/v1/models").json()["data"]]


def call(sidecar: str, action: str, body: object) -> httpx.Response:
    return httpx.post(f"{sidecar}/v1/lora_adapter/{action}", json=body, headers=sidecar_auth(), timeout=30)


def test_load_from_a_local_path_is_idempotent_and_unloads(
    sidecar: str, lora_engine: Engine, tmp_path: Path
) -> None:
    path = adapter(tmp_path, "sql")
    first = call(sidecar, "load", {"lora_name": "sql", "lora_path": str(path)})
    assert (first.status_code, first.json()["status"]) == (200, "loaded")
    assert "sql" in engine_models(lora_engine)
    again = call(sidecar, "load", {"lora_name": "sql", "lora_path": str(path)})
    assert (again.status_code, again.json()["status"]) == (200, "already_loaded")
    cards = httpx.get(f"{sidecar}/v1/models", headers=sidecar_auth()).json()["data"]
    assert next(m for m in cards if m["id"] == "sql")["parent"] == MODEL
    done = call(sidecar, "unload", {"lora_name": "sql"})
    assert (done.status_code, done.json()["status"]) == (200, "unloaded")
    assert "sql" not in engine_models(lora_engine)
    twice = call(sidecar, "unload", {"lora_name": "sql"})
    assert (twice.status_code, twice.json()["status"]) == (200, "not_loaded")
    assert path.is_dir()  # a local path is the caller's: never deleted


def test_load_from_http_then_unload_with_cleanup(
    sidecar: str, lora_engine: Engine, archive_server: str, stack: Stack
) -> None:
    loaded = call(
        sidecar,
        "load",
        {"lora_name": "summarizer", "artifact_url": f"{archive_server}/adapters/summarizer.tar.gz"},
    )
    assert loaded.status_code == 200, loaded.text
    local = Path(loaded.json()["path"])
    assert (local / "adapter_config.json").is_file()
    assert local.parent == stack.workdir / "adapters"
    assert "summarizer" in engine_models(lora_engine)
    unloaded = call(sidecar, "unload", {"lora_name": "summarizer", "cleanup_local": True})
    assert unloaded.status_code == 200
    assert not local.exists()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"lora_path": "/tmp/x"}, 400, "invalid_request"),
        ({"lora_name": "a"}, 400, "invalid_request"),
        ({"lora_name": "a", "lora_path": "/tmp/x", "artifact_url": "http://x/a.tgz"}, 400, "invalid_request"),
        ({"lora_name": "a", "artifact_url": "ftp://example/a.tgz"}, 400, "artifact_unsupported"),
        ({"lora_name": "a", "artifact_url": "not a url"}, 400, "artifact_bad_url"),
        ({"lora_name": "a", "lora_path": "/no/such/adapter"}, 403, "artifact_forbidden"),  # outside the roots
        ({"lora_name": "a", "artifact_url": "http://127.0.0.1:9/missing.tar.gz"}, 502, "artifact_transfer"),
        ({"lora_name": "a", "lora_path": "/tmp", "credentials": "secret"}, 400, "invalid_request"),
    ],
)
def test_bad_load_requests(sidecar: str, body: dict, status: int, code: str) -> None:
    response = call(sidecar, "load", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (code, status)
    assert error["message"]


def test_missing_artifact_on_a_server_is_404(sidecar: str, archive_server: str) -> None:
    response = call(sidecar, "load", {"lora_name": "ghost", "artifact_url": f"{archive_server}/ghost.tar.gz"})
    assert (response.status_code, response.json()["error"]["type"]) == (404, "artifact_not_found")


def test_invalid_json_is_400(sidecar: str) -> None:
    response = httpx.post(f"{sidecar}/v1/lora_adapter/load", content=b"{nope", headers=sidecar_auth())
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_full_engine_is_409(sidecar: str, lora_engine: Engine, tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert (
            call(sidecar, "load", {"lora_name": name, "lora_path": str(adapter(tmp_path, name))}).status_code
            == 200
        )
    refused = call(sidecar, "load", {"lora_name": "three", "lora_path": str(adapter(tmp_path, "three"))})
    assert (refused.status_code, refused.json()["error"]["type"]) == (409, "adapter_capacity_exceeded")
    assert "three" not in engine_models(lora_engine)
    for name in ("one", "two"):
        call(sidecar, "unload", {"lora_name": name})


def test_engine_refusal_is_502(stack: Stack, tmp_path: Path) -> None:
    engine = stack.start_engine("no-lora-engine", MODEL)  # started without --enable-lora
    port = stack.start_sidecar(engine, None)
    response = call(
        f"http://127.0.0.1:{port}", "load", {"lora_name": "a", "lora_path": str(adapter(tmp_path, "a"))}
    )
    assert (response.status_code, response.json()["error"]["type"]) == (502, "engine_refused")
    assert "LoRA is not enabled" in response.json()["error"]["message"]


def test_engine_down_is_503(stack: Stack, tmp_path: Path) -> None:
    engine = stack.start_engine("doomed-engine", MODEL, None, "--enable-lora")
    port = stack.start_sidecar(engine, None)
    stack.stop_child(next(c for c in stack.children if c.name == "doomed-engine"))
    response = call(
        f"http://127.0.0.1:{port}", "load", {"lora_name": "a", "lora_path": str(adapter(tmp_path, "a"))}
    )
    assert (response.status_code, response.json()["error"]["type"]) == (503, "engine_unavailable")
