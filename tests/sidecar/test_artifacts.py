"""Tests of adapter artifact fetching, against real servers: an aiohttp origin, moto's S3 server and a
Hugging Face Hub stand-in."""

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

from runtime_sidecar.artifacts import ArtifactError, fetch_artifact

from .hf_mirror import HfMirror

ADAPTER = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}).encode(),
    "adapter_model.safetensors": os.urandom(200_000),
    "tokenizer/special_tokens_map.json": b"{}",
}


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


async def test_local_path_is_returned_as_is(tmp_path: Path) -> None:
    adapter = write_tree(tmp_path / "my adapter", ADAPTER)
    cache = tmp_path / "cache"
    assert await fetch_artifact(str(adapter), cache, name="a") == adapter
    assert await fetch_artifact(f"file://{str(adapter).replace(' ', '%20')}", cache, name="a") == adapter
    assert await fetch_artifact(f"file://localhost{adapter}", cache, name="a") == adapter
    assert not cache.exists()


async def test_local_path_errors(tmp_path: Path) -> None:
    write_tree(tmp_path / "weights-only", {"adapter_model.safetensors": b"w"})
    with pytest.raises(ArtifactError, match=r"it contains: adapter_model\.safetensors") as err:
        await fetch_artifact(str(tmp_path / "weights-only"), tmp_path / "cache", name="a")
    assert err.value.kind == "not_found"
    with pytest.raises(ArtifactError) as err:
        await fetch_artifact(f"file://{tmp_path}/missing", tmp_path / "cache", name="a")
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
        await fetch_artifact(url, tmp_path / "cache", name="a")
    assert err.value.kind == kind
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["", ".tmp", "..", "a/b", "a\\b"])
async def test_name_must_be_a_directory_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="directory name"):
        await fetch_artifact("s3://bucket/adapter", tmp_path, name=name)


# ---------------------------------------------------------------------------------------------
# http(s)
# ---------------------------------------------------------------------------------------------


@dataclass
class Served:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    ranges: bool = True  # honour Range (and If-Range)
    cut_after: int | None = None  # the next GET sends this many bytes, then drops the connection

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
    """A static file server for archives: Range with If-Range on the ETag, extra headers per file, and
    a connection dropped midway through a chosen response."""

    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.seen: list[Seen] = []
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
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

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
    path = await fetch_artifact(url, tmp_path, name="a")
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
        assert_adapter(await fetch_artifact(url, tmp_path, name="a"))
        return
    with pytest.raises(ArtifactError, match="says") as err:
        await fetch_artifact(url, tmp_path, name="a")
    assert err.value.kind == "checksum"
    assert not (tmp_path / "a").exists()
    # The bad download is not kept for resuming: the next attempt starts from scratch.
    origin.files["/a.tar.gz"].headers.clear()
    origin.files.pop("/a.tar.gz.sha256", None)
    assert_adapter(await fetch_artifact(url, tmp_path, name="a"))
    assert origin.gets("/a.tar.gz")[-1].range is None


async def test_http_resumes_after_a_dropped_connection(tmp_path: Path, origin: Origin) -> None:
    archive = tar_bytes(ADAPTER)
    sha256 = base64.b64encode(hashlib.sha256(archive).digest()).decode()
    url = origin.serve("/a.tar.gz", archive, headers={"Digest": f"sha-256={sha256}"}, cut_after=50_000)
    with pytest.raises(ArtifactError) as err:
        await fetch_artifact(url, tmp_path, name="a")
    assert err.value.kind == "transfer"
    assert not (tmp_path / "a").exists()

    assert_adapter(await fetch_artifact(url, tmp_path, name="a"))
    first, second = origin.gets("/a.tar.gz")
    assert first.range is None
    assert second.range == "bytes=50000-"
    assert second.if_range == origin.files["/a.tar.gz"].etag


async def test_http_restarts_when_range_is_ignored(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.zip", zip_bytes(ADAPTER), ranges=False, cut_after=50_000)
    with pytest.raises(ArtifactError):
        await fetch_artifact(url, tmp_path, name="a")
    assert_adapter(await fetch_artifact(url, tmp_path, name="a"))
    assert origin.gets("/a.zip")[1].range == "bytes=50000-"  # asked for, answered with the whole file


async def test_http_restarts_when_the_archive_changed(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve(
        "/a.tar.gz",
        tar_bytes({"adapter_config.json": b"{}", "old.bin": os.urandom(99_000)}),
        cut_after=50_000,
    )
    with pytest.raises(ArtifactError):
        await fetch_artifact(url, tmp_path, name="a")
    origin.serve("/a.tar.gz", tar_bytes(ADAPTER))  # If-Range no longer matches: the server sends it all
    assert_adapter(await fetch_artifact(url, tmp_path, name="a"))


async def test_http_completed_download_is_not_fetched_again(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tgz", tar_bytes(ADAPTER))
    first = await fetch_artifact(url, tmp_path, name="a")
    requests = len(origin.seen)
    assert await fetch_artifact(url, tmp_path, name="a") == first
    assert len(origin.seen) == requests
    assert_adapter(first)


async def test_http_concurrent_fetches_of_one_name(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", tar_bytes(ADAPTER))
    paths = await asyncio.gather(*(fetch_artifact(url, tmp_path, name="a") for _ in range(4)))
    assert paths == [tmp_path / "a"] * 4
    assert len(origin.gets("/a.tar.gz")) == 1
    assert_adapter(tmp_path / "a")


async def test_http_not_found(tmp_path: Path, origin: Origin) -> None:
    with pytest.raises(ArtifactError) as err:
        await fetch_artifact(f"{origin.base}/missing.tar.gz", tmp_path, name="a")
    assert err.value.kind == "not_found"
    assert not (tmp_path / "a").exists()


async def test_http_archive_without_adapter_config(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", tar_bytes({"weights.bin": b"w", "README.md": b"r"}))
    with pytest.raises(ArtifactError, match=r"contains: README\.md, weights\.bin") as err:
        await fetch_artifact(url, tmp_path, name="a")
    assert err.value.kind == "not_found"
    assert not (tmp_path / "a").exists()


async def test_http_unreadable_archive(tmp_path: Path, origin: Origin) -> None:
    url = origin.serve("/a.tar.gz", b"<html>not an archive</html>")
    with pytest.raises(ArtifactError, match="not a readable") as err:
        await fetch_artifact(url, tmp_path, name="a")
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
        await fetch_artifact(url, cache, name="a")
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
        ["/tmp/v/bin/moto_server", "-p", str(port), "-H", "127.0.0.1"],
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
        path = await fetch_artifact(url, tmp_path, name=name, credentials=credentials)
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
    path = await fetch_artifact("s3://adapters/m", tmp_path, name="m")
    assert_adapter(path, {"adapter_model.safetensors": big, "adapter_config.json": b"{}"})


@pytest.mark.parametrize(
    ("url", "match"),
    [("s3://no-such-bucket/a", "does not exist"), ("s3://adapters/empty/", "no objects")],
)
async def test_s3_not_found(tmp_path: Path, s3: Any, moto_endpoint: str, url: str, match: str) -> None:
    _put_tree(s3, "other/", ADAPTER)
    credentials = {**S3_CREDENTIALS, "endpoint_url": moto_endpoint}
    with pytest.raises(ArtifactError, match=match) as err:
        await fetch_artifact(url, tmp_path, name="a", credentials=credentials)
    assert err.value.kind == "not_found"
    assert not (tmp_path / "a").exists()


async def test_s3_key_escaping_the_prefix(tmp_path: Path, s3: Any, moto_endpoint: str) -> None:
    _put_tree(s3, "x/", {**ADAPTER, "../../evil.txt": b"x"})
    credentials = {**S3_CREDENTIALS, "endpoint_url": moto_endpoint}
    with pytest.raises(ArtifactError, match="refusing") as err:
        await fetch_artifact("s3://adapters/x", tmp_path / "cache", name="a", credentials=credentials)
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
    path = await fetch_artifact("hf://org/adapter", cache, name="a", credentials={"token": "hf_x"})
    assert path == cache / "a"
    assert_adapter(path)  # and none of the client's bookkeeping (.cache/huggingface)
    assert all(seen.authorization == "Bearer hf_x" for seen in hub.requests)
    assert ("GET", "/api/models/org/adapter/revision/main") in [(s.method, s.path) for s in hub.requests]

    requests = len(hub.requests)
    assert await fetch_artifact("hf://org/adapter", cache, name="a") == path
    assert len(hub.requests) == requests


async def test_hf_revisions(tmp_path: Path, hub: HfMirror) -> None:
    v2 = {**ADAPTER, "adapter_config.json": b'{"r": 16}'}
    main_sha = hub.add_repo("org/adapter", write_tree(tmp_path / "main", ADAPTER))
    hub.add_repo("org/adapter", write_tree(tmp_path / "v2", v2), revision="v2")
    cache = tmp_path / "cache"
    assert_adapter(await fetch_artifact("hf://org/adapter@v2", cache, name="v2"), v2)
    assert_adapter(await fetch_artifact(f"huggingface://org/adapter@{main_sha}", cache, name="m"))


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("hf://org/missing", "Repository Not Found"),
        ("hf://org/adapter@nope", "Revision Not Found"),
        ("hf://org/weights-only", f"contains: {'adapter_model.safetensors'}"),
    ],
)
async def test_hf_not_found(tmp_path: Path, hub: HfMirror, url: str, match: str) -> None:
    hub.add_repo("org/adapter", write_tree(tmp_path / "main", ADAPTER))
    hub.add_repo("org/weights-only", write_tree(tmp_path / "w", {"adapter_model.safetensors": b"w"}))
    with pytest.raises(ArtifactError, match=match) as err:
        await fetch_artifact(url, tmp_path / "cache", name="a")
    assert err.value.kind == "not_found"
    assert not (tmp_path / "cache" / "a").exists()
