"""``brickyard secrets ensure`` against the Kubernetes API stand-in: created once, then kept, completed and
copied, and safe against writers racing it."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator
from typing import Any

import pytest

from brickyard import cli
from brickyard_core.kube.client import ApiError, KubeClient, Obj, Resource
from controllers import secrets
from controllers.secrets import Outcome, ensure
from tests.support.kube_api import KubeApiServer

SOURCE = "brickyard-system"
NAME = "brickyard-credentials"
KEYS = ("redis-password", "sidecar-token")


@pytest.fixture
def client(kube: KubeApiServer) -> Iterator[KubeClient]:
    api_client = kube.api_client()
    yield KubeClient(api_client)
    api_client.close()


async def run(
    client: KubeClient, keys: tuple[str, ...] = KEYS, copy_to: tuple[str, ...] = ()
) -> list[Outcome]:
    return [outcome async for outcome in ensure(client, SOURCE, NAME, keys, copy_to)]


def values(kube: KubeApiServer, namespace: str = SOURCE) -> dict[str, str]:
    secret = kube.get("v1", "Secret", namespace, NAME)
    assert secret is not None, f"no Secret {namespace}/{NAME}"
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def make_secret(kube: KubeApiServer, namespace: str, **data: str) -> Obj:
    return kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": NAME, "namespace": namespace},
            "stringData": data,
        }
    )


async def test_first_run_creates_random_values(kube: KubeApiServer, client: KubeClient) -> None:
    assert await run(client) == [Outcome(SOURCE, NAME, "created", KEYS)]
    created = values(kube)
    assert created.keys() == set(KEYS)
    # secrets.token_urlsafe(32): 43 URL-safe characters, one draw per key.
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", v) for v in created.values())
    assert len(set(created.values())) == len(KEYS)
    assert kube.get("v1", "Secret", SOURCE, NAME)["type"] == "Opaque"


async def test_second_run_keeps_the_values(kube: KubeApiServer, client: KubeClient) -> None:
    await run(client)
    before = kube.get("v1", "Secret", SOURCE, NAME)
    assert await run(client) == [Outcome(SOURCE, NAME, "unchanged")]
    after = kube.get("v1", "Secret", SOURCE, NAME)
    assert after["data"] == before["data"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], "no write"


async def test_a_missing_key_is_added_and_existing_ones_are_kept(
    kube: KubeApiServer, client: KubeClient
) -> None:
    make_secret(kube, SOURCE, **{"redis-password": "chosen-by-the-operator", "other": "kept"})
    assert await run(client) == [Outcome(SOURCE, NAME, "updated", ("sidecar-token",))]
    now = values(kube)
    assert now["redis-password"] == "chosen-by-the-operator"
    assert now["other"] == "kept"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", now["sidecar-token"])


async def test_copies_the_keys_and_updates_only_those_that_differ(
    kube: KubeApiServer, client: KubeClient
) -> None:
    assert await run(client, copy_to=("default", "engines", SOURCE, "default")) == [
        Outcome(SOURCE, NAME, "created", KEYS),
        Outcome("default", NAME, "created", KEYS),
        Outcome("engines", NAME, "created", KEYS),
    ]
    source = values(kube)
    assert values(kube, "default") == values(kube, "engines") == source
    # A copy drifts (a stale key, an extra one): only the stale key is rewritten, the extra one stays.
    kube.patch("v1", "Secret", "engines", NAME, {"stringData": {"sidecar-token": "stale", "extra": "x"}})
    assert await run(client, copy_to=("default", "engines")) == [
        Outcome(SOURCE, NAME, "unchanged"),
        Outcome("default", NAME, "unchanged"),
        Outcome("engines", NAME, "updated", ("sidecar-token",)),
    ]
    assert values(kube, "engines") == {**source, "extra": "x"}


async def test_copies_only_the_named_keys(kube: KubeApiServer, client: KubeClient) -> None:
    make_secret(kube, SOURCE, unrelated="stays-here")
    await run(client, copy_to=("default",))
    assert values(kube, "default").keys() == set(KEYS)


class RacingClient(KubeClient):
    """A client that lets another writer act on the Secret just before each of its own writes."""

    def __init__(self, api_client: Any, before_write: Any) -> None:
        super().__init__(api_client)
        self.before_write = before_write
        self.writes: list[str] = []

    async def create(self, resource: Resource, namespace: str | None, obj: Obj) -> Obj:
        self.writes.append("create")
        self.before_write("create")
        return await super().create(resource, namespace, obj)

    async def replace(self, resource: Resource, obj: Obj, *, subresource: str | None = None) -> Obj:
        self.writes.append("replace")
        self.before_write("replace")
        return await super().replace(resource, obj, subresource=subresource)


async def test_a_secret_created_concurrently_wins(kube: KubeApiServer) -> None:
    def other_job_creates(verb: str) -> None:
        if verb == "create" and kube.get("v1", "Secret", SOURCE, NAME) is None:
            make_secret(kube, SOURCE, **{"redis-password": "theirs"})

    api_client = kube.api_client()
    try:
        client = RacingClient(api_client, other_job_creates)
        # Our create meets 409; we read theirs, keep its value and add only the key it lacks.
        assert await run(client) == [Outcome(SOURCE, NAME, "updated", ("sidecar-token",))]
    finally:
        api_client.close()
    assert values(kube)["redis-password"] == "theirs"


async def test_a_secret_changed_between_read_and_write_is_read_again(kube: KubeApiServer) -> None:
    make_secret(kube, SOURCE, **{"redis-password": "mine"})
    raced = []

    def other_job_adds_the_token(verb: str) -> None:
        if verb == "replace" and not raced:
            raced.append(verb)
            kube.patch("v1", "Secret", SOURCE, NAME, {"stringData": {"sidecar-token": "theirs"}})

    api_client = kube.api_client()
    try:
        client = RacingClient(api_client, other_job_adds_the_token)
        # Our update is stale (409): the second read finds nothing left to do.
        assert await run(client) == [Outcome(SOURCE, NAME, "unchanged")]
    finally:
        api_client.close()
    assert values(kube) == {"redis-password": "mine", "sidecar-token": "theirs"}


async def test_concurrent_runs_agree_on_one_set_of_values(kube: KubeApiServer, client: KubeClient) -> None:
    results = await asyncio.gather(*(run(client, copy_to=("default",)) for _ in range(6)))
    actions = sorted(outcomes[0].action for outcomes in results)
    assert actions == ["created"] + ["unchanged"] * 5
    assert values(kube) == values(kube, "default")


async def test_gives_up_on_a_secret_that_keeps_changing(kube: KubeApiServer) -> None:
    make_secret(kube, SOURCE, other="x")

    def always_first(verb: str) -> None:
        if verb == "replace":
            kube.patch("v1", "Secret", SOURCE, NAME, {"stringData": {"other": str(len(client.writes))}})

    api_client = kube.api_client()
    try:
        client = RacingClient(api_client, always_first)
        with pytest.raises(ApiError, match="kept changing"):
            await run(client)
    finally:
        api_client.close()
    assert client.writes.count("replace") == secrets.ATTEMPTS
    assert values(kube).keys() == {"other"}


def test_the_command_prints_names_never_values(
    kube: KubeApiServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(secrets, "api_client_from_environment", kube.api_client)
    argv = ["secrets", "ensure", "--namespace", SOURCE, "--key", KEYS[0], "--key", KEYS[1]]
    cli.main([*argv, "--copy-to", "default"])
    cli.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"secret {SOURCE}/{NAME}: created ({', '.join(KEYS)})",
        f"secret default/{NAME}: created ({', '.join(KEYS)})",
        f"secret {SOURCE}/{NAME}: unchanged",
    ]
    assert not [v for v in values(kube).values() if v in "\n".join(lines)]
