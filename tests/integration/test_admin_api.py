"""The admin API and the gateway's users mirror against a real Redis: routes, pub/sub, outages, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import test_utils, web

from brickyard.stack import REPO_ROOT, Stack, free_port
from brickyard_core.credentials import redis_client
from gateway_plugins.admin import admin_app
from gateway_plugins.tenancy.users import User, UserDirectory, UserStore

TOKEN = "admin-token-for-tests"
#: A database of its own, emptied before each test, so the session's shared Redis keeps its other data.
DB = 7
KEY = re.compile(r"sk-by-[A-Za-z0-9_-]{43}")

Client = test_utils.TestClient[web.Request, web.Application]


@pytest.fixture
async def redis_url(redis_port: int) -> str:
    url = f"redis://127.0.0.1:{redis_port}/{DB}"
    client = redis_client(url)
    await client.flushdb()
    await client.aclose()
    return url


@contextlib.asynccontextmanager
async def serving(redis_url: str) -> AsyncIterator[Client]:
    store = UserStore(redis_url)
    client = test_utils.TestClient(test_utils.TestServer(admin_app(store, TOKEN)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await store.aclose()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Client]:
    async with serving(redis_url) as client:
        yield client


@contextlib.asynccontextmanager
async def following(redis_url: str, resync_seconds: float = 3600.0) -> AsyncIterator[UserDirectory]:
    """A running directory; by default it never resyncs, so what it learns came by pub/sub."""
    directory = UserDirectory(redis_url, resync_seconds=resync_seconds)
    task = asyncio.create_task(directory.run())
    try:
        await until(lambda: directory.loaded)
        yield directory
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def call(
    client: Client, method: str, path: str, body: object = None, *, token: str | None = TOKEN
) -> tuple[int, Any]:
    """Status and decoded JSON body (None when empty); ``body`` bytes are sent as they are."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    async with client.request(method, path, data=data, headers=headers) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw) if raw else None


def error(status: int, body: Any) -> tuple[int, str, str | None, str]:
    """(status, type, param, code) of an OpenAI-style error, checking its shape on the way."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return status, body["error"]["type"], body["error"]["param"], body["error"]["code"]


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer"])
async def test_every_route_needs_the_admin_token(admin: Client, header: str | None) -> None:
    routes = [
        ("GET", "/admin/users"),
        ("POST", "/admin/users"),
        ("GET", "/admin/users/alice"),
        ("PATCH", "/admin/users/alice"),
        ("DELETE", "/admin/users/alice"),
        ("POST", "/admin/users/alice/keys"),
        ("DELETE", "/admin/users/alice/keys/0123456789ab"),
        ("GET", "/not/a/route"),
    ]
    headers = {"Authorization": header} if header is not None else {}
    for method, path in routes:
        async with admin.request(method, path, data=b'{"name": "alice"}', headers=headers) as response:
            body = await response.json()
            assert error(response.status, body) == (401, "authentication_error", None, "invalid_admin_token")
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert await call(admin, "GET", "/admin/users") == (200, {"object": "list", "data": []})


async def test_user_crud(admin: Client) -> None:
    status, alice = await call(admin, "POST", "/admin/users", {"name": "alice", "rpm": 60})
    assert status == 201
    assert alice == {"name": "alice", "rpm": 60, "tpm": None, "created": alice["created"], "keys": []}
    assert alice["created"] > 1.6e9
    assert await call(admin, "GET", "/admin/users/alice") == (200, alice)
    assert (await call(admin, "POST", "/admin/users", {"name": "bob@example.com", "tpm": 0}))[0] == 201

    status, listed = await call(admin, "GET", "/admin/users")
    assert status == 200
    assert [user["name"] for user in listed["data"]] == ["alice", "bob@example.com"]

    status, patched = await call(admin, "PATCH", "/admin/users/alice", {"tpm": 1000})
    assert (status, patched["rpm"], patched["tpm"]) == (200, 60, 1000)
    status, patched = await call(admin, "PATCH", "/admin/users/alice", {"rpm": None})  # null: the default
    assert (status, patched["rpm"], patched["tpm"]) == (200, None, 1000)
    assert patched["created"] == alice["created"]

    assert await call(admin, "DELETE", "/admin/users/alice") == (204, None)
    assert error(*await call(admin, "GET", "/admin/users/alice"))[::3] == (404, "user_not_found")
    status, listed = await call(admin, "GET", "/admin/users")
    assert [user["name"] for user in listed["data"]] == ["bob@example.com"]


@pytest.mark.parametrize(
    ("method", "body", "param", "code"),
    [
        ("POST", b"{", None, "invalid_json"),
        ("POST", b"", None, "invalid_json"),
        ("POST", b'["alice"]', None, "invalid_body"),
        ("POST", {}, "name", "missing_required_parameter"),
        ("POST", {"name": "has space"}, "name", "invalid_value"),
        ("POST", {"name": "x" * 129}, "name", "invalid_value"),
        ("POST", {"name": 7}, "name", "invalid_value"),
        ("POST", {"name": "carol", "rpm": -1}, "rpm", "invalid_value"),
        ("POST", {"name": "carol", "rpm": 1.5}, "rpm", "invalid_value"),
        ("POST", {"name": "carol", "rpm": True}, "rpm", "invalid_value"),
        ("POST", {"name": "carol", "tpm": "100"}, "tpm", "invalid_value"),
        ("POST", {"name": "carol", "api_key_hashes": ["0" * 64]}, "api_key_hashes", "unknown_parameter"),
        ("POST", {"name": "carol", "limit": 3}, "limit", "unknown_parameter"),
        ("PATCH", b"nope", None, "invalid_json"),
        ("PATCH", b"3", None, "invalid_body"),
        ("PATCH", {}, None, "missing_required_parameter"),
        ("PATCH", {"rpm": -1}, "rpm", "invalid_value"),
        ("PATCH", {"rpm": 5, "tpm": "lots"}, "tpm", "invalid_value"),
        ("PATCH", {"name": "renamed"}, "name", "unknown_parameter"),
    ],
)
async def test_bad_bodies(admin: Client, method: str, body: object, param: str | None, code: str) -> None:
    await call(admin, "POST", "/admin/users", {"name": "alice", "rpm": 1})
    path = "/admin/users" if method == "POST" else "/admin/users/alice"
    assert error(*await call(admin, method, path, body)) == (400, "invalid_request_error", param, code)
    listed = (await call(admin, "GET", "/admin/users"))[1]
    assert [(user["name"], user["rpm"]) for user in listed["data"]] == [("alice", 1)]  # nothing changed


async def test_not_found_conflict_and_unknown_routes(admin: Client) -> None:
    for method, path in [
        ("GET", "/admin/users/ghost"),
        ("PATCH", "/admin/users/ghost"),
        ("DELETE", "/admin/users/ghost"),
        ("POST", "/admin/users/ghost/keys"),
        ("DELETE", "/admin/users/ghost/keys/0123456789ab"),
    ]:
        body = {"rpm": 1} if method == "PATCH" else None
        assert error(*await call(admin, method, path, body)) == (
            404,
            "invalid_request_error",
            None,
            "user_not_found",
        )
    assert (await call(admin, "POST", "/admin/users", {"name": "alice"}))[0] == 201
    assert error(*await call(admin, "POST", "/admin/users", {"name": "alice", "rpm": 5})) == (
        409,
        "invalid_request_error",
        "name",
        "user_exists",
    )
    for key in ("0123456789ab", "not-a-key-id"):
        status, body = await call(admin, "DELETE", f"/admin/users/alice/keys/{key}")
        assert error(status, body)[::3] == (404, "key_not_found")
    assert error(*await call(admin, "GET", "/admin/elsewhere"))[::3] == (404, "not_found")
    async with admin.request("PUT", "/admin/users", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert error(response.status, await response.json())[:2] == (405, "invalid_request_error")
        assert "POST" in response.headers["Allow"]


async def test_redis_down_answers_503() -> None:
    async with serving(f"redis://127.0.0.1:{free_port()}/0") as admin:
        for method, path, body in [
            ("GET", "/admin/users", None),
            ("POST", "/admin/users", {"name": "alice"}),
            ("POST", "/admin/users/alice/keys", None),
        ]:
            status, answer = await call(admin, method, path, body)
            assert error(status, answer)[:2] == (503, "overloaded_error")
            assert answer["error"]["code"] == "store_unavailable"
            assert "cannot reach Redis" in answer["error"]["message"]


async def test_keys_and_changes_reach_the_gateway(admin: Client, redis_url: str) -> None:
    raw = redis_client(redis_url)
    async with following(redis_url) as directory:
        assert directory.users_count == 0
        await call(admin, "POST", "/admin/users", {"name": "alice", "rpm": 5})
        await until(lambda: directory.get("alice") is not None)
        assert directory.get("alice") == User("alice", rpm=5, created=directory.get("alice").created)

        status, created = await call(admin, "POST", "/admin/users/alice/keys")
        assert status == 201
        assert set(created) == {"id", "key"}
        key = created["key"]
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert KEY.fullmatch(key)
        assert created["id"] == digest[:12]
        await until(lambda: directory.authenticate(key) is not None)
        assert directory.authenticate(key).name == "alice"
        assert directory.authenticate(key[:-1]) is None
        assert directory.authenticate("") is None

        # Only digests are stored, and the API shows only their ids.
        async with admin.get("/admin/users/alice", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            text = await response.text()
        assert orjson.loads(text)["keys"] == [{"id": digest[:12]}]
        assert digest not in text
        assert key not in text
        assert await raw.get(f"brickyard:apikey:{digest}") == b"alice"
        assert key.encode() not in await raw.get("brickyard:user:alice")

        await call(admin, "PATCH", "/admin/users/alice", {"rpm": 9, "tpm": 900})
        await until(lambda: directory.get("alice").rpm == 9)
        assert (directory.authenticate(key).rpm, directory.authenticate(key).tpm) == (9, 900)

        second = (await call(admin, "POST", "/admin/users/alice/keys"))[1]["key"]
        await until(lambda: directory.authenticate(second) is not None)
        assert await call(admin, "DELETE", f"/admin/users/alice/keys/{created['id']}") == (204, None)
        await until(lambda: directory.authenticate(key) is None)
        assert directory.authenticate(second).name == "alice"
        assert await raw.get(f"brickyard:apikey:{digest}") is None

        assert await call(admin, "DELETE", "/admin/users/alice") == (204, None)
        await until(lambda: directory.get("alice") is None)
        assert directory.authenticate(second) is None
        assert directory.users_count == 0
        assert [k async for k in raw.scan_iter(match="brickyard:*")] == []
    await raw.aclose()


async def test_concurrent_writers_lose_nothing(admin: Client, redis_url: str) -> None:
    await call(admin, "POST", "/admin/users", {"name": "alice"})
    async with following(redis_url) as directory:
        answers = await asyncio.gather(
            *(call(admin, "POST", "/admin/users/alice/keys") for _ in range(20)),
            call(admin, "PATCH", "/admin/users/alice", {"rpm": 7}),
            call(admin, "PATCH", "/admin/users/alice", {"tpm": 70}),
        )
        assert [status for status, _ in answers] == [201] * 20 + [200, 200]
        keys = [body["key"] for _, body in answers[:20]]
        alice = (await call(admin, "GET", "/admin/users/alice"))[1]
        assert (alice["rpm"], alice["tpm"]) == (7, 70)
        assert sorted(k["id"] for k in alice["keys"]) == sorted(body["id"] for _, body in answers[:20])
        await until(lambda: all(directory.authenticate(key) is not None for key in keys))
    raw = redis_client(redis_url)
    assert len([k async for k in raw.scan_iter(match="brickyard:apikey:*")]) == 20
    await raw.aclose()


async def test_directory_serves_its_last_view_through_an_outage(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    port = await asyncio.to_thread(stack.start_redis, name="redis-users")
    url = f"redis://127.0.0.1:{port}/0"
    store = UserStore(url)
    await store.create(User("alice", rpm=3))
    key = await store.create_key("alice")
    caplog.set_level(logging.INFO, logger="gateway_plugins.tenancy.users")
    try:
        async with following(url, resync_seconds=0.2) as directory:
            assert directory.authenticate(key).name == "alice"
            await asyncio.to_thread(stack.stop_child, stack.child("redis-users"))
            await until(lambda: directory.redis_errors >= 3, timeout=10)
            assert directory.authenticate(key).name == "alice"
            assert directory.get("alice").rpm == 3
            outages = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
            assert len(outages) == 1  # once per outage, however many attempts fail

            # The restarted Redis is empty (no persistence); a record written there without its message
            # is found by the resync, and the mirror follows Redis.
            await asyncio.to_thread(stack.start_redis, port, name="redis-users")
            raw = redis_client(url)
            await raw.set("brickyard:user:carol", User("carol", tpm=30).to_json())
            await raw.aclose()
            await until(lambda: directory.get("carol") is not None, timeout=10)
            assert directory.get("carol").tpm == 30
            assert directory.get("alice") is None
            assert any("Redis available again" in r.getMessage() for r in caplog.records)
    finally:
        await store.aclose()
        for child in [c for c in stack.children if c.name == "redis-users"]:
            await asyncio.to_thread(stack.stop_child, child)


async def brickyard_users(*args: str, env: dict[str, str]) -> tuple[int, Any, str]:
    """Run ``python -m brickyard users ...``: exit status, JSON on stdout (None when empty), stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "brickyard",
        "users",
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    return process.returncode or 0, orjson.loads(out) if out.strip() else None, err.decode()


async def test_cli_end_to_end(admin: Client) -> None:
    env = {"BRICKYARD_ADMIN_URL": str(admin.make_url("")), "BRICKYARD_ADMIN_TOKEN": TOKEN}
    status, alice, _ = await brickyard_users("create", "alice", "--rpm", "5", env=env)
    assert (status, alice["name"], alice["rpm"], alice["tpm"], alice["keys"]) == (0, "alice", 5, None, [])

    status, created, _ = await brickyard_users("create-key", "alice", env=env)
    assert status == 0
    assert KEY.fullmatch(created["key"])

    status, alice, _ = await brickyard_users("update", "alice", "--rpm", "default", "--tpm", "100", env=env)
    assert (status, alice["rpm"], alice["tpm"], alice["keys"]) == (0, None, 100, [{"id": created["id"]}])

    status, listed, _ = await brickyard_users("list", env=env)
    assert (status, [user["name"] for user in listed["data"]]) == (0, ["alice"])

    assert (await brickyard_users("revoke-key", "alice", created["id"], env=env))[:2] == (0, None)
    assert (await brickyard_users("delete", "alice", env=env))[:2] == (0, None)

    status, out, err = await brickyard_users("get", "alice", env=env)
    assert (status, out) == (1, None)
    assert "no user named 'alice'" in err
    status, out, err = await brickyard_users("list", env={**env, "BRICKYARD_ADMIN_TOKEN": "wrong"})
    assert (status, out) == (1, None)
    assert "Incorrect admin token" in err
