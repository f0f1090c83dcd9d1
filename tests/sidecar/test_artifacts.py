"""Tests of adapter artifact fetching, against real servers: an aiohttp origin, moto's S3 server and a
Hugging Face Hub stand-in; and of the policy that keeps callers from reaching what they should not."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web

from runtime_sidecar import artifacts
from runtime_sidecar.artifacts import ArtifactError, ArtifactPolicy, fetch_artifact

from .hf_mirror import HfMirror

ADAPTER = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}).encode(),
    "adapter_model.safetensors": os.urandom(200_000),
    "tokenizer/special_tokens_map.json": b"{}",
}


#: What the tests' servers need: they listen on 127.0.0.1, over plain http.
OPEN = ArtifactPolicy(schemes=frozenset({"http", "https", "s3", "hf"}), allow_private_networks=True)


async def fetch(
    url: str,
    cache: Path,
    *,
    name: str,
    credentials: dict[str, str] | None = None,
    policy: ArtifactPolicy = OPEN,
) -> Path:
    return await fetch_artifact(url, cache, name=name, credentials=credentials, policy=policy)


def assert_adapter(path: Path, files: dict[str, bytes] = ADAPTER) -> None:
    found = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert found == files


def files_named(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def tar_bytes(files: dict[str, bytes], *, top: str = "", mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], *, top: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in files.items():
            zipped.writestr(f"{top}{name}", data)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# local paths and URL parsing
# ---------------------------------------------------------------------------------------------


def local(*roots: Path) -> ArtifactPolicy:
    return ArtifactPolicy(local_roots=roots)


async def test_local_path_is_used_in_place(tmp_path: Path) -> None:
    root = tmp_path  # resolved already, as pytest makes it
    adapter = write_tree(root / "my adapter", ADAPTER)
    (root / "link").symlink_to(adapter)  # a link that stays inside the root is fine
    cache = root / "cache"
    policy = local(root / "elsewhere", root)
    for url in (
        str(adapter),
        f"file://{str(adapter).replace(' ', '%20')}",
        f"file://localhost{adapter}",
        f"{root}/elsewhere/../my adapter",
        str(root / "link"),
    ):
        assert await fetch(url, cache, name="a", policy=policy) == adapter  # resolved
    assert not cache.exists()


async def test_local_path_errors(tmp_path: Path) -> None:
    weights_only = write_tree(tmp_path / "weights-only", {"adapter_model.safetensors": b"w"})
    with pytest.raises(ArtifactError, match=r"has no adapter_config\.json at its root$") as err:
        await fetch(str(weights_only), tmp_path / "cache", name="a", policy=local(tmp_path))
    assert err.value.kind == "not_found"
    with pytest.raises(ArtifactError) as err:
        await fetch(f"file://{tmp_path}/missing", tmp_path / "cache", name="a", policy=local(tmp_path))
    assert err.value.kind == "not_found"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("gs://bucket/adapter", "unsupported"),
        ("ftp://host/adapter.tar.gz", "unsupported"),
        ("http://host/adapter.safetensors", "unsupported"),
        ("https://host/adapters/", "unsupported"),
        ("relative/path", "bad_url"),
        ("", "bad_url"),
        ("not a url at all", "bad_url"),
        ("foo://x/y", "bad_url"),
        ("http:///adapter.tar.gz", "bad_url"),
        ("http://[::1/adapter.tar.gz", "bad_url"),
        ("file://otherhost/abs/path", "bad_url"),
        ("s3:///prefix", "bad_url"),
        ("hf://", "bad_url"),
        ("hf://org/repo@", "bad_url"),
        ("hf://a/b/c", "bad_url"),
    ],
)
async def test_bad_and_unsupported_urls(tmp_path: Path, url: str, kind: str) -> None:
    with pytest.raises(ArtifactError) as err:
        await fetch(url, tmp_path / "cache", name="a")
    assert err.value.kind == kind
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["", ".tmp", "..", "a/b", "a\\b"])
async def test_name_must_be_a_directory_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="directory name"):
        await fetch("s3://bucket/adapter", tmp_path, name=name)


# ---------------------------------------------------------------------------------------------
# http(s)
# ---------------------------------------------------------------------------------------------


@dataclass
class Served:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True  # honour Range (and If-Range)
    cut_after: int | None = None  # the next GET sends this many bytes, then drops the connection
    redirect: str | None = None  # answer 302 with this Location instead

    @property
    def etag(self) -> str:
        return f'"{hashlib.sha256(self.body).hexdigest()[:16]}"'


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    if_range: str | None


class Origin:
    """A static file server for archives: Range with If-Range on the ETag, extra headers per file,
    redirects, and a connection dropped midway through a chosen response."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.files: dict[str, Served] = {}
        self.seen: list[Seen] = []
        self.port = 0
        self.base = ""
        self._runner: web.AppRunner | None = None

    def serve(self, path: str, body: bytes, **options: Any) -> str:
        self.files[path] = Served(body, **options)
        return self.base + path

    def gets(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == path]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(request.method, request.path, request.headers.get("Range"), request.headers.get("If-Range"))
        )
        served = self.files.get(request.path)
        if served is None:
            raise web.HTTPNotFound()
        if served.redirect is not None:
            # Sent as is (HTTPFound would parse it), so that a malformed Location can be tested too.
            return web.Response(status=302, headers={"Location": served.redirect})
        body, status = served.body, 200
        headers = {"ETag": served.etag, "Accept-Ranges": "bytes", **served.headers}
        requested = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if requested and served.ranges and request.headers.get("If-Range", served.etag) == served.etag:
            start = int(requested[1])
            if start >= len(body):
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            body, status = body[start:], 206
        if served.cut_after is None:
            return web.Response(status=status, body=body, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: served.cut_after])
        served.cut_after = None
        # aiohttp's client drops bytes still buffered when it learns the connection broke: let it
        # consume them first, so that the resumed request starts at a known offset.
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.close()
        return response


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    await server.start()
    yield server
    await server.close()


@pytest.mark.parametrize(
    ("suffix", "archive"),
    [
        (".tar.gz", tar_bytes(ADAPTER)),
        (".tgz", tar_bytes(ADAPTER, top="my-adapter/")),
        (".tar", tar_bytes(ADAPTER, mode="w")),
        (".zip", zip_bytes(ADAPTER)),
        (".zip", zip_bytes(ADAPTER, top="my-adapter/")),
    ],
)
async def test_http_archives(tmp_path: Path, origin: Origin, suffix: str, archive: bytes) -> None:
    url = origin.serve(f"/adapters/a{suffix}", archive)
    path = await fetch(url, tmp_path, name="a")
    assert path == tmp_path / "a"
    assert_adapter(path)
    assert [p for area in (".tmp", ".partial") for p in (tmp_path / area).iterdir()] == []  # cleaned up


def _checksum_headers(source: str, data: bytes) -> dict[str, str]:
    sha256, md5 = hashlib.sha256(data), hashlib.md5(data)
    return {
        "x-checksum-sha256": {"x-checksum-sha256": sha256.hexdigest()},
        "digest": {
            "Digest": f"md5={base64.b64encode(md5.digest()).decode()}, "
            f"sha-256={base64.b64encode(sha256.digest()).decode()}"
        },
        "content-md5": {"Content-MD5": base64.b64encode(md5.digest()).decode()},
    }[source]


@pytest.mark.parametrize("source", ["companion", "x-checksum-sha256", "digest", "content-md5"])
@pytest.mark.parametrize("right", [True, False])
async def test_http_checksums(tmp_path: Path, origin: Origin, source: str, right: bool) -> None:
    archive = tar_bytes(ADAPTER)
    declared = archive if right else archive + b"tampered"
    if source == "companion":
        origin.serve("/a.tar.gz.sha256", f"{hashlib.sha256(declared).hexdigest()}  a.tar.gz\n".encode())
        url = origin.serve("/a.tar.gz", archive)
    else:
        url = origin.serve("/a.tar.gz", archive, headers=_checksum_headers(source, declared))
    if right:
        assert_adapter(await fetch(url, tmp_path, name="a"))
        return
    with pytest.raises(ArtifactError, match="says") as err:
        await fetch(url, tmp_path, name="a")
    assert err.value.kind == "checksum"
    assert not (tmp_path / "a").exists()
    # The bad download is not kept for resuming: the next attempt starts from scratch.
    origin.files["/a.tar.gz"].headers.clear()
    origin.files.pop("/a.tar.gz.sha256", None)
    assert_adapter(await fetch(url, tmp_path, name="a"))
    assert origin.gets("/a.tar.gz")[-1].range is None


async def test_http_resumes_after_a_dropped_connection(tmp_path: Path, origin: Origin) -> None:
    archive = tar_bytes(ADAPTER)
    sha256 = base64.b64encode(hashlib.sha256(archive).digest()).decode()
    url = origin.serve("/a.tar.gz", archive, headers={"Digest": f"sha-256={sha256}"}, cut_after=50_000)
    with pytest.raises(ArtifactError) as err:
        await fetch(url, tmp_path, name="a")
    assert err.value.kind == "transfer"
    assert not (tmp_path / "a").exists()

    assert_adapter(await fetch(url, tmp_path, name="a"))
    first, second = origin.gets("/a.tar.gz")
    assert first.range is None
    assert second.range == "bytes=50000-"
    assert second.if_range == origin.files["/a.tar.gz"].etag


async def test_http_restarts_when_range_is_ignored(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.zip", zip_bytes(ADAPTER), ranges=False, cut_after=50_000)
    with pytest.raises(ArtifactError):
        await fetch(url, tmp_path, name="a")
    assert_adapter(await fetch(url, tmp_path, name="a"))
    assert origin.gets("/a.zip")[1].range == "bytes=50000-"  # asked for, answered with the whole file


async def test_http_restarts_when_the_archive_changed(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve(
        "/a.tar.gz",
        tar_bytes({"adapter_config.json": b"{}", "old.bin": os.urandom(99_000)}),
        cut_after=50_000,
    )
    with pytest.raises(ArtifactError):
        await fetch(url, tmp_path, name="a")
    origin.serve("/a.tar.gz", tar_bytes(ADAPTER))  # If-Range no longer matches: the server sends it all
    assert_adapter(await fetch(url, tmp_path, name="a"))


async def test_http_completed_download_is_not_fetched_again(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tgz", tar_bytes(ADAPTER))
    first = await fetch(url, tmp_path, name="a")
    requests = len(origin.seen)
    assert await fetch(url, tmp_path, name="a") == first
    assert len(origin.seen) == requests
    assert_adapter(first)


async def test_http_concurrent_fetches_of_one_name(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", tar_bytes(ADAPTER))
    paths = await asyncio.gather(*(fetch(url, tmp_path, name="a") for _ in range(4)))
    assert paths == [tmp_path / "a"] * 4
    assert len(origin.gets("/a.tar.gz")) == 1
    assert_adapter(tmp_path / "a")


async def test_http_not_found(tmp_path: Path, origin: Origin) -> None:
    with pytest.raises(ArtifactError) as err:
        await fetch(f"{origin.base}/missing.tar.gz", tmp_path, name="a")
    assert err.value.kind == "not_found"
    assert not (tmp_path / "a").exists()


async def test_http_archive_without_adapter_config(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", tar_bytes({"weights.bin": b"w", "README.md": b"r"}))
    with pytest.raises(ArtifactError, match=r"has no adapter_config\.json at its root$") as err:
        await fetch(url, tmp_path, name="a")
    assert err.value.kind == "not_found"
    assert not (tmp_path / "a").exists()


async def test_http_unreadable_archive(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", b"<html>not an archive</html>")
    with pytest.raises(ArtifactError, match="not a readable") as err:
        await fetch(url, tmp_path, name="a")
    assert err.value.kind == "transfer"


def _symlink_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("suffix", "build"),
    [
        (".tar.gz", lambda outside: tar_bytes({**ADAPTER, "../evil.txt": b"x"})),
        (".tar.gz", lambda outside: tar_bytes({**ADAPTER, str(outside): b"x"})),
        (".zip", lambda outside: zip_bytes({"sub/../../evil.txt": b"x", **ADAPTER})),
        (".tar.gz", lambda outside: _symlink_tar()),
    ],
    ids=["tar-dotdot", "tar-absolute", "zip-dotdot", "tar-symlink"],
)
async def test_http_malicious_archives(tmp_path: Path, origin: Origin, suffix: str, build: Any) -> None:
    cache = tmp_path / "deep" / "cache"
    outside = tmp_path / "evil.txt"
    url = origin.serve(f"/a{suffix}", build(outside))
    with pytest.raises(ArtifactError, match=r"refusing|link") as err:
        await fetch(url, cache, name="a")
    assert err.value.kind == "unsupported"
    assert not (cache / "a").exists()
    assert files_named(tmp_path, "evil.txt") == []


# ---------------------------------------------------------------------------------------------
# s3, against moto's server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


S3_CREDENTIALS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region": "us-east-1"}


@pytest.fixture
def s3(moto_endpoint: str) -> Iterator[Any]:
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="adapters")
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="adapters"):
        for entry in page.get("Contents", ()):
            client.delete_object(Bucket="adapters", Key=entry["Key"])
    client.delete_bucket(Bucket="adapters")


def _put_tree(s3: Any, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        s3.put_object(Bucket="adapters", Key=f"{prefix}{name}", Body=data)


async def test_s3_prefix(tmp_path: Path, s3: Any, moto_endpoint: str) -> None:
    _put_tree(s3, "lora/a/", ADAPTER)
    s3.put_object(Bucket="adapters", Key="lora/a/", Body=b"")  # a console-made "folder"
    _put_tree(s3, "lora/ab/", {"adapter_config.json": b"{}"})  # shares the string prefix "lora/a"
    credentials = {**S3_CREDENTIALS, "endpoint_url": moto_endpoint}
    for url, name in (("s3://adapters/lora/a", "a"), ("s3://adapters/lora/a/", "a2")):
        path = await fetch(url, tmp_path, name=name, credentials=credentials)
        assert path == tmp_path / name
        assert_adapter(path)


async def test_s3_multipart_object_and_environment_credentials(
    tmp_path: Path, s3: Any, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A multipart ETag ("<md5 of md5s>-2") is not the object's MD5 and must not fail the fetch.
    big = os.urandom(5 * 1024 * 1024 + 10)
    upload = s3.create_multipart_upload(Bucket="adapters", Key="m/adapter_model.safetensors")
    parts = [
        {
            "PartNumber": number,
            "ETag": s3.upload_part(
                Bucket="adapters",
                Key="m/adapter_model.safetensors",
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=chunk,
            )["ETag"],
        }
        for number, chunk in ((1, big[: 5 * 1024 * 1024]), (2, big[5 * 1024 * 1024 :]))
    ]
    s3.complete_multipart_upload(
        Bucket="adapters",
        Key="m/adapter_model.safetensors",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    s3.put_object(Bucket="adapters", Key="m/adapter_config.json", Body=b"{}")
    assert s3.head_object(Bucket="adapters", Key="m/adapter_model.safetensors")["ETag"].endswith('-2"')
    for variable, value in (
        ("AWS_ENDPOINT_URL", moto_endpoint),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(variable, value)
    path = await fetch("s3://adapters/m", tmp_path, name="m")
    assert_adapter(path, {"adapter_model.safetensors": big, "adapter_config.json": b"{}"})


@pytest.mark.parametrize(
    ("url", "match"),
    [("s3://no-such-bucket/a", "does not exist"), ("s3://adapters/empty/", "no objects")],
)
async def test_s3_not_found(tmp_path: Path, s3: Any, moto_endpoint: str, url: str, match: str) -> None:
    _put_tree(s3, "other/", ADAPTER)
    credentials = {**S3_CREDENTIALS, "endpoint_url": moto_endpoint}
    with pytest.raises(ArtifactError, match=match) as err:
        await fetch(url, tmp_path, name="a", credentials=credentials)
    assert err.value.kind == "not_found"
    assert not (tmp_path / "a").exists()


async def test_s3_key_escaping_the_prefix(tmp_path: Path, s3: Any, moto_endpoint: str) -> None:
    _put_tree(s3, "x/", {**ADAPTER, "../../evil.txt": b"x"})
    credentials = {**S3_CREDENTIALS, "endpoint_url": moto_endpoint}
    with pytest.raises(ArtifactError, match="refusing") as err:
        await fetch("s3://adapters/x", tmp_path / "cache", name="a", credentials=credentials)
    assert err.value.kind == "unsupported"
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "cache" / "a").exists()


# ---------------------------------------------------------------------------------------------
# hf, against the Hub stand-in
# ---------------------------------------------------------------------------------------------


@pytest.fixture
async def hub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HfMirror]:
    # Imported (so its import-time constants are read) before HF_ENDPOINT is set: fetch_artifact must
    # pick the endpoint up per call.
    from huggingface_hub import constants

    async with HfMirror() as mirror:
        monkeypatch.setenv("HF_ENDPOINT", mirror.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # Otherwise the client's user-agent telemetry asks the real Hub for its agent registry.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield mirror


async def test_hf_snapshot(tmp_path: Path, hub: HfMirror) -> None:
    hub.add_repo("org/adapter", write_tree(tmp_path / "main", ADAPTER))
    cache = tmp_path / "cache"
    path = await fetch("hf://org/adapter", cache, name="a", credentials={"token": "hf_x"})
    assert path == cache / "a"
    assert_adapter(path)  # and none of the client's bookkeeping (.cache/huggingface)
    assert all(seen.authorization == "Bearer hf_x" for seen in hub.requests)
    assert ("GET", "/api/models/org/adapter/revision/main") in [(s.method, s.path) for s in hub.requests]

    requests = len(hub.requests)
    assert await fetch("hf://org/adapter", cache, name="a") == path
    assert len(hub.requests) == requests


async def test_hf_revisions(tmp_path: Path, hub: HfMirror) -> None:
    v2 = {**ADAPTER, "adapter_config.json": b'{"r": 16}'}
    main_sha = hub.add_repo("org/adapter", write_tree(tmp_path / "main", ADAPTER))
    hub.add_repo("org/adapter", write_tree(tmp_path / "v2", v2), revision="v2")
    cache = tmp_path / "cache"
    assert_adapter(await fetch("hf://org/adapter@v2", cache, name="v2"), v2)
    assert_adapter(await fetch(f"huggingface://org/adapter@{main_sha}", cache, name="m"))


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("hf://org/missing", "repository not found$"),
        ("hf://org/adapter@nope", "revision not found$"),
        ("hf://org/weights-only", "has no adapter_config.json at its root$"),
    ],
)
async def test_hf_not_found(tmp_path: Path, hub: HfMirror, url: str, match: str) -> None:
    hub.add_repo("org/adapter", write_tree(tmp_path / "main", ADAPTER))
    hub.add_repo("org/weights-only", write_tree(tmp_path / "w", {"adapter_model.safetensors": b"w"}))
    with pytest.raises(ArtifactError, match=match) as err:
        await fetch(url, tmp_path / "cache", name="a")
    assert err.value.kind == "not_found"
    assert not (tmp_path / "cache" / "a").exists()


# ---------------------------------------------------------------------------------------------
# the policy: what callers may not make the sidecar read or reach
# ---------------------------------------------------------------------------------------------

#: The default policy plus plain http, so that what refuses the exploits below is the address check.
PUBLIC_HTTP = ArtifactPolicy(schemes=frozenset({"http", "https", "s3", "hf"}))


async def test_local_paths_outside_the_roots_are_refused_alike(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "root", {"inside/adapter_config.json": b"{}"})
    outside = write_tree(tmp_path / "outside", ADAPTER)
    (root / "escape").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    for url, policy in (
        ("/etc", local(root)),  # its listing used to come back in the error
        ("/no/such/path", local(root)),  # reads the same as one that exists
        (str(outside), local(root)),
        (f"{root}/../outside", local(root)),
        (f"file://{root}/%2E%2E/outside", local(root)),
        (str(root / "escape"), local(root)),  # a symlink inside the root that leads out of it
        (str(root / "loop"), local(root)),  # cannot be resolved
        (str(root / "inside"), ArtifactPolicy()),  # no local roots: no local paths
    ):
        with pytest.raises(ArtifactError) as err:
            await fetch(url, tmp_path / "cache", name="a", policy=policy)
        assert (err.value.kind, str(err.value)) == (
            "forbidden",
            f"{url}: not inside a directory adapters may be loaded from",
        )


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",  # a name: refused after DNS
        "0.0.0.0",  # connects to the local host
        "[::]",  # so does this
        "[::ffff:127.0.0.1]",
        "[::1]",
        "10.0.0.1",
        "169.254.169.254",  # cloud metadata
        "[fd00::1]",
    ],
)
async def test_non_public_addresses_are_refused_before_connecting(
    tmp_path: Path, origin: Origin, host: str
) -> None:
    origin.serve("/a.tar.gz", tar_bytes(ADAPTER))
    url = f"http://{host}:{origin.port}/a.tar.gz"
    with pytest.raises(ArtifactError) as err:
        await fetch(url, tmp_path, name="a", policy=PUBLIC_HTTP)
    assert (err.value.kind, str(err.value)) == (
        "forbidden",
        f"{url}: refused to connect to an address that is not public",
    )
    assert origin.seen == []
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),  # NAT64 to 8.8.8.8
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.251", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%lo", False),
        ("fd00::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("2001:db8::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("64:ff9b::a00:1", False),  # NAT64 to 10.0.0.1
        ("64:ff9b:1::a00:1", False),  # local-use NAT64
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("localhost", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert artifacts._is_public(address) is public


def test_address_guard_refuses_sockets_to_non_public_addresses() -> None:
    guard = artifacts._AddressGuard()
    with guard((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("8.8.8.8", 443))) as sock:
        assert sock.family == socket.AF_INET
    assert not guard.refused
    with pytest.raises(PermissionError):
        guard((socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", 80, 0, 0)))
    assert guard.refused


@pytest.mark.parametrize("path", ["/a.tar.gz", "/a.tar.gz.sha256"])
async def test_redirect_to_a_non_public_address_is_refused(
    tmp_path: Path, origin: Origin, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # Stand-ins: the origin's 127.0.0.1 counts as public, 127.0.0.2 (where it redirects) does not.
    monkeypatch.setattr(artifacts, "_is_public", lambda address: address == "127.0.0.1")
    internal = Origin("127.0.0.2")
    await internal.start()
    try:
        origin.serve("/a.tar.gz", tar_bytes(ADAPTER))
        origin.serve(path, b"", redirect=internal.serve("/secret.tar.gz", b"secret"))
        with pytest.raises(ArtifactError) as err:
            await fetch(f"{origin.base}/a.tar.gz", tmp_path, name="a", policy=PUBLIC_HTTP)
    finally:
        await internal.close()
    assert err.value.kind == "forbidden"
    assert "127.0.0.2" not in str(err.value)
    assert origin.gets(path)
    assert internal.seen == []


@pytest.mark.parametrize(
    "location",
    [
        "http://localhost:{port}/b.tar.gz",  # host not allowed
        "https://127.0.0.1:{port}/b.tar.gz",  # scheme not accepted
        "ftp://127.0.0.1:{port}/b.tar.gz",
        "file:///etc/passwd",
        "http://[::1:{port}/b.tar.gz",  # unparsable
    ],
)
async def test_redirect_outside_the_policy_is_refused(tmp_path: Path, origin: Origin, location: str) -> None:
    policy = ArtifactPolicy(
        schemes=frozenset({"http"}), hosts=frozenset({"127.0.0.1"}), allow_private_networks=True
    )
    origin.serve("/b.tar.gz", tar_bytes(ADAPTER))
    url = origin.serve("/a.tar.gz", b"", redirect=location.format(port=origin.port))
    with pytest.raises(ArtifactError) as err:
        await fetch(url, tmp_path, name="a", policy=policy)
    assert (err.value.kind, str(err.value)) == (
        "forbidden",
        f"{url}: redirected to a URL that is not allowed",
    )
    assert origin.gets("/b.tar.gz") == []


async def test_redirects_within_the_policy_are_followed(tmp_path: Path, origin: Origin) -> None:
    origin.serve("/b.tar.gz", tar_bytes(ADAPTER))
    url = origin.serve("/a.tar.gz", b"", redirect="/b.tar.gz")
    assert_adapter(await fetch(url, tmp_path, name="a"))
    url = origin.serve("/loop.tar.gz", b"", redirect="/loop.tar.gz")
    with pytest.raises(ArtifactError, match="more than 5 redirects") as err:
        await fetch(url, tmp_path, name="b")
    assert err.value.kind == "transfer"


@pytest.mark.parametrize(
    ("url", "policy", "reason"),
    [
        (
            "http://example.com/a.tar.gz",
            ArtifactPolicy(),
            "http:// is not accepted here (accepted: hf://, https://, s3://)",
        ),
        (
            "s3://bucket/a",
            ArtifactPolicy(schemes=frozenset({"https"})),
            "s3:// is not accepted here (accepted: https://)",
        ),
        (
            "huggingface://org/repo",
            ArtifactPolicy(schemes=frozenset()),
            "hf:// is not accepted here (accepted: none)",
        ),
        (
            "https://evil.example.org/a.tar.gz",
            ArtifactPolicy(hosts=frozenset({"*.example.com", "example.org"})),
            "host evil.example.org is not among the allowed hosts",
        ),
    ],
)
async def test_urls_outside_the_policy_are_refused(
    tmp_path: Path, url: str, policy: ArtifactPolicy, reason: str
) -> None:
    with pytest.raises(ArtifactError) as err:
        await fetch(url, tmp_path, name="a", policy=policy)
    assert (err.value.kind, str(err.value)) == ("forbidden", f"{url}: {reason}")


@pytest.mark.parametrize(
    ("host", "pattern", "matches"),
    [
        ("example.com", "example.com", True),
        ("Example.COM.", "example.com", True),
        ("a.example.com", "*.example.com", True),
        ("a.b.example.com", "*.Example.com", True),
        ("example.com", "*.example.com", False),
        ("badexample.com", "*.example.com", False),
        ("example.com.evil.org", "example.com", False),
        ("a.example.com", "example.com", False),
    ],
)
def test_host_patterns(host: str, pattern: str, matches: bool) -> None:
    assert artifacts._host_matches(host, pattern) is matches


async def test_allowed_hosts_are_fetched_from(tmp_path: Path, origin: Origin) -> None:
    policy = ArtifactPolicy(
        schemes=frozenset({"http"}), hosts=frozenset({"localhost"}), allow_private_networks=True
    )
    origin.serve("/a.tar.gz", tar_bytes(ADAPTER))
    assert_adapter(await fetch(f"http://localhost:{origin.port}/a.tar.gz", tmp_path, name="a", policy=policy))


async def test_the_policy_applies_to_cached_names_too(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", tar_bytes(ADAPTER))
    await fetch(url, tmp_path, name="a")
    with pytest.raises(ArtifactError) as err:
        await fetch(url, tmp_path, name="a", policy=ArtifactPolicy())
    assert err.value.kind == "forbidden"


@pytest.mark.parametrize(
    ("endpoint", "policy", "reason"),
    [
        ("http://127.0.0.1:{port}", PUBLIC_HTTP, "refused to connect to an address that is not public"),
        ("http://localhost:{port}", PUBLIC_HTTP, "refused to connect to an address that is not public"),
        (
            "http://127.0.0.1:{port}",
            ArtifactPolicy(allow_private_networks=True),
            "http:// is not accepted here (accepted: hf://, https://, s3://)",
        ),
        (
            "http://127.0.0.1:{port}",
            ArtifactPolicy(
                schemes=OPEN.schemes, hosts=frozenset({"s3.example.com"}), allow_private_networks=True
            ),
            "host 127.0.0.1 is not among the allowed hosts",
        ),
        ("ftp://127.0.0.1:{port}", OPEN, "not an http(s) URL"),
    ],
)
async def test_s3_endpoint_outside_the_policy_is_refused(
    tmp_path: Path, origin: Origin, endpoint: str, policy: ArtifactPolicy, reason: str
) -> None:
    credentials = {**S3_CREDENTIALS, "endpoint_url": endpoint.format(port=origin.port)}
    with pytest.raises(ArtifactError) as err:
        await fetch("s3://adapters/a", tmp_path, name="a", credentials=credentials, policy=policy)
    assert (err.value.kind, str(err.value)) == ("forbidden", f"s3://adapters/a/: endpoint_url: {reason}")
    assert origin.seen == []


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "http://under_score:9000"])
async def test_s3_malformed_endpoint(tmp_path: Path, endpoint: str) -> None:
    credentials = {**S3_CREDENTIALS, "endpoint_url": endpoint}
    with pytest.raises(ArtifactError) as err:
        await fetch("s3://adapters/a", tmp_path, name="a", credentials=credentials)
    assert err.value.kind == "bad_url"


async def test_connection_failures_read_alike(tmp_path: Path) -> None:
    """A closed port, a port that answers in another protocol and one that hangs up all give one
    message: otherwise errors would map which ports are open."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    servers = [await asyncio.start_server(handler, "127.0.0.1", 0) for handler in (banner, hang_up)]
    ports = [_free_port()] + [server.sockets[0].getsockname()[1] for server in servers]
    messages = set()
    try:
        for port in ports:
            url = f"http://127.0.0.1:{port}/a.tar.gz"
            with pytest.raises(ArtifactError) as err:
                await fetch(url, tmp_path, name="a")
            assert err.value.kind == "transfer"
            messages.add(str(err.value).replace(url, "<url>"))
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    assert messages == {"<url>: could not fetch the artifact (connection failed)"}
