"""Fetching LoRA adapter artifacts onto local disk, before the engine is asked to load them.

The engine loads an adapter from a local directory that holds ``adapter_config.json`` and the weights.
``fetch_artifact`` produces such a directory from a local path (used in place), an HTTP(S) archive, an S3
prefix or a Hugging Face Hub repository (the last three fetched into ``cache_dir``).

Callers of the adapter API are not trusted with the sidecar's network position or filesystem: an
``ArtifactPolicy`` says which local directories and which remote schemes and hosts they may use, and
refuses non-public addresses by default, checked on every socket opened (after DNS, for redirects too).
Errors say what went wrong without what only the sidecar can see (directory contents, addresses,
connection-level detail that would tell open ports from closed ones); the detail goes to the log.

One sidecar process owns a ``cache_dir``; within it, fetches of one name are serialized. Layout:

    cache_dir/<name>/                 complete adapters; only ever appear by an atomic rename
    cache_dir/.tmp/<name>/<random>/   staging of a fetch in progress; swept when the next fetch of it starts
    cache_dir/.partial/<name>/<key>   an HTTP archive being downloaded, kept across failures so that the next
                                      attempt continues it with a Range request; ``<key>.json`` holds the
                                      validator sent as If-Range and the checksums the server declared
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import gzip
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import SplitResult, unquote, urljoin, urlsplit, urlunsplit

import aiohttp
from aiohappyeyeballs import AddrInfoType
from multidict import CIMultiDictProxy

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
#: Storage schemes people use for models that this module does not speak: a clearer error than "bad URL".
UNSUPPORTED_SCHEMES = frozenset(
    {"gs", "gcs", "az", "abfs", "abfss", "wasb", "wasbs", "ftp", "ftps", "sftp", "oci"}
)

_TMP = ".tmp"
_PARTIAL = ".partial"
_CHUNK = 1 << 20
#: No total limit: adapters can be gigabytes. A stalled connection fails after a minute without data.
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MD5_HEX = re.compile(r"[0-9a-f]{32}")
#: ``Digest`` header algorithm tokens (RFC 3230) -> hashlib names.
_DIGEST_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512", "md5": "md5"}
#: S3 server-side encryption modes whose ETag is not the MD5 of the content.
_ETAG_NOT_MD5_ENCRYPTION = frozenset({"aws:kms", "aws:kms:dsse"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Each hop is checked against the policy like the URL itself.
_MAX_REDIRECTS = 5
#: IANA's global unicast block: the rest of IPv6 is local, multicast, reserved or IPv4 in disguise.
_IPV6_UNICAST = ipaddress.IPv6Network("2000::/3")
#: NAT64 (RFC 6052): the gateway connects to the IPv4 address in the last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CONNECTION_FAILED = "could not fetch the artifact (connection failed)"
_NOT_PUBLIC = "refused to connect to an address that is not public"

ArtifactErrorKind = Literal["bad_url", "not_found", "checksum", "transfer", "unsupported", "forbidden"]
#: (hashlib algorithm, expected hex digest, where the expectation came from)
_Checksum = tuple[str, str, str]


class ArtifactError(Exception):
    """Why an artifact could not be fetched; ``kind`` is one of: "bad_url", "not_found", "checksum",
    "transfer", "unsupported", "forbidden" (the policy refuses it)."""

    kind: ArtifactErrorKind

    def __init__(self, kind: ArtifactErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class ArtifactPolicy:
    """What a caller of the adapter API may make the sidecar read or fetch."""

    #: URL schemes accepted for remote artifacts (subset of "http", "https", "s3", "hf").
    schemes: frozenset[str] = frozenset({"https", "s3", "hf"})
    #: Host names remote artifacts may come from (exact, or "*.example.com" for subdomains); empty: any host.
    hosts: frozenset[str] = frozenset()
    #: Allow addresses that are private, loopback, link-local, multicast, reserved or unspecified (IPv4 and
    #: IPv6, IPv4-mapped IPv6 included). Off by default: the sidecar runs inside the cluster network.
    allow_private_networks: bool = False
    #: Local directories an adapter may be loaded from in place (local paths and file:// URLs); empty: no
    #: local paths.
    local_roots: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True)
class _HttpSource:
    url: str
    archive: str  # the matched entry of ARCHIVE_SUFFIXES


@dataclass(frozen=True, slots=True)
class _S3Source:
    bucket: str
    prefix: str  # "" (whole bucket) or ending in "/", so that "a/b" does not also pick up "a/bc/..."

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True, slots=True)
class _HubSource:
    repo_id: str
    revision: str | None


async def fetch_artifact(
    url: str,
    cache_dir: Path,
    *,
    name: str,
    credentials: Mapping[str, str] | None = None,
    policy: ArtifactPolicy,
) -> Path:
    """Return a local directory holding the adapter named ``name`` from ``url``, if ``policy`` allows it.

    A local path (or ``file://`` URL) is returned resolved, when it lies inside one of the policy's
    ``local_roots``. Anything remote is fetched once into ``cache_dir/<name>`` and served from there by
    later calls, whatever their ``url`` (still checked against the policy). ``credentials``:
    ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``endpoint_url`` and
    ``region`` for s3://, ``token`` for hf://; the environment fills in what is missing.

    Raises ``ArtifactError``; ``ValueError`` when ``name`` cannot be a directory name, and ``OSError``
    when ``cache_dir`` itself fails (not writable, disk full).
    """
    source = _parse_url(url)
    if isinstance(source, Path):
        return await asyncio.to_thread(_local_adapter, source, url, policy.local_roots)
    _check_name(name)
    credentials = credentials or {}
    await _authorize(source, url, credentials, policy)
    target = cache_dir / name
    async with _name_lock(cache_dir, name):
        if await asyncio.to_thread(_is_complete, target):
            return target
        staging = await asyncio.to_thread(_new_staging, cache_dir, name)
        try:
            root = await _fetch_remote(source, staging, cache_dir / _PARTIAL / name, credentials, policy)
            await asyncio.to_thread(_require_adapter, root, url)
            await asyncio.to_thread(_install, root, target, staging / "replaced")
        finally:
            await asyncio.to_thread(shutil.rmtree, staging.parent, True)
    return target


def _parse_url(url: str) -> Path | _HttpSource | _S3Source | _HubSource:
    if url.startswith("/"):
        return Path(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ArtifactError(
            "bad_url", f"{url!r} is neither an absolute path nor a file://, http(s)://, s3:// or hf:// URL"
        )
    scheme = scheme.lower()
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ArtifactError(
                "bad_url", f"{url!r}: a file URL names an absolute path, as in file:///abs/path"
            )
        return Path(unquote(parts.path))
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError as err:
            raise ArtifactError("bad_url", f"{url!r}: {err}") from err
        if not host:
            raise ArtifactError("bad_url", f"{url!r} has no host")
        path = parts.path.lower()
        archive = next((suffix for suffix in ARCHIVE_SUFFIXES if path.endswith(suffix)), None)
        if archive is None:
            raise ArtifactError(
                "unsupported",
                f"{url!r} does not name an archive ({', '.join(ARCHIVE_SUFFIXES)}):"
                " an adapter is a directory, so single files are not supported",
            )
        return _HttpSource(url, archive)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ArtifactError("bad_url", f"{url!r} has no bucket: expected s3://bucket/prefix")
        return _S3Source(bucket, prefix if not prefix or prefix.endswith("/") else prefix + "/")
    if scheme in ("hf", "huggingface"):
        repo_id, at, revision = rest.rstrip("/").partition("@")
        if not _REPO_ID.fullmatch(repo_id) or (at and not revision):
            raise ArtifactError(
                "bad_url", f"{url!r}: expected {scheme}://org/repo or {scheme}://org/repo@revision"
            )
        return _HubSource(repo_id, revision or None)
    if scheme in UNSUPPORTED_SCHEMES:
        raise ArtifactError(
            "unsupported", f"{url!r}: {scheme}:// is not supported; use file://, http(s)://, s3:// or hf://"
        )
    raise ArtifactError("bad_url", f"{url!r}: unknown scheme {scheme!r}")


def _check_name(name: str) -> None:
    # Dot-names are reserved for the cache's own areas (.tmp, .partial).
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 255:
        raise ValueError(f"adapter name {name!r} cannot be used as a directory name")


# ---------------------------------------------------------------------------------------------
# policy: which local paths, schemes, hosts and addresses a caller may use
# ---------------------------------------------------------------------------------------------


def _local_adapter(path: Path, url: str, roots: tuple[Path, ...]) -> Path:
    """``path`` resolved, when that lies inside one of ``roots`` and holds an adapter.

    Resolving symlinks and ``..`` first keeps a link inside a root from leading out of it, and the engine
    is given the resolved path. The refusal reads the same whether or not the path exists.
    """
    try:
        resolved = path.resolve()
        inside = any(resolved.is_relative_to(root.resolve()) for root in roots)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        inside = False
    if not inside:
        raise ArtifactError("forbidden", f"{url}: not inside a directory adapters may be loaded from")
    _require_adapter(resolved, url)
    return resolved


async def _authorize(
    source: _HttpSource | _S3Source | _HubSource,
    url: str,
    credentials: Mapping[str, str],
    policy: ArtifactPolicy,
) -> None:
    """Refuse what ``policy`` does not let a caller fetch, before any connection is made. Addresses of
    http(s) hosts are checked later, per connection (see ``_AddressGuard``)."""
    if isinstance(source, _HttpSource):
        reason = _url_refusal(urlsplit(source.url), policy)
    else:
        reason = _scheme_refusal("s3" if isinstance(source, _S3Source) else "hf", policy)
    if reason:
        raise ArtifactError("forbidden", f"{url}: {reason}")
    # Without a caller's endpoint_url, S3 is AWS or the operator's AWS_ENDPOINT_URL(_S3), and the Hub is
    # the operator's HF_ENDPOINT: trusted, and outside ``hosts``.
    if isinstance(source, _S3Source) and (endpoint := credentials.get("endpoint_url")):
        await _check_endpoint(source, endpoint, policy)


def _scheme_refusal(scheme: str, policy: ArtifactPolicy) -> str | None:
    if scheme in policy.schemes:
        return None
    accepted = ", ".join(f"{accepted}://" for accepted in sorted(policy.schemes)) or "none"
    return f"{scheme}:// is not accepted here (accepted: {accepted})"


def _url_refusal(parts: SplitResult, policy: ArtifactPolicy) -> str | None:
    """Why ``policy`` refuses an http(s) URL by its scheme or host, or None."""
    host, scheme = parts.hostname, parts.scheme.lower()
    if scheme not in ("http", "https"):
        return "not an http(s) URL"
    if reason := _scheme_refusal(scheme, policy):
        return reason
    if not host:
        return "no host"
    if policy.hosts and not any(_host_matches(host, pattern) for pattern in policy.hosts):
        return f"host {host} is not among the allowed hosts"
    return None


def _host_matches(host: str, pattern: str) -> bool:
    host, pattern = host.lower().rstrip("."), pattern.lower().rstrip(".")
    return host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern


async def _check_endpoint(source: _S3Source, endpoint: str, policy: ArtifactPolicy) -> None:
    """A caller's S3 ``endpoint_url`` must pass the checks an http(s) artifact URL does.

    Its addresses are checked here, but boto3 resolves the name again when it connects: a name whose
    answer changes in between (DNS rebinding) can still lead to a non-public address, unless
    ``policy.hosts`` limits endpoints to trusted names.
    """
    try:
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ArtifactError("bad_url", f"{source}: endpoint_url is not a valid URL") from None
    if reason := _url_refusal(parts, policy):
        raise ArtifactError("forbidden", f"{source}: endpoint_url: {reason}")
    if policy.allow_private_networks:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as err:
        log.warning("%s: endpoint_url %s does not resolve: %s", source, endpoint, err)
        raise ArtifactError("transfer", f"{source}: {_CONNECTION_FAILED}") from err
    refused = sorted({info[4][0] for info in infos if not _is_public(info[4][0])})
    if refused:
        log.warning("%s: endpoint_url %s resolves to non-public %s", source, endpoint, ", ".join(refused))
        raise ArtifactError("forbidden", f"{source}: endpoint_url: {_NOT_PUBLIC}")


def _is_public(address: str) -> bool:
    """Whether ``address`` (the host of a socket address) is public unicast. IPv6 forms that carry an IPv4
    address (IPv4-mapped, NAT64, 6to4) are judged by that address."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF) if ip in _NAT64 else None
        embedded = ip.ipv4_mapped or nat64 or ip.sixtofour
        if embedded is not None:
            ip = embedded
        elif ip not in _IPV6_UNICAST:
            return False
    # is_global leaves out private, loopback, link-local, shared (100.64/10), reserved and unspecified
    # space, but not (before Python 3.13) IPv4 multicast.
    return ip.is_global and not ip.is_multicast


class _AddressGuard:
    """aiohttp's socket factory: refuses a socket to a non-public address.

    It sees the address each connection is about to use, after DNS (so a rebinding answer is caught) and
    for IP-literal hosts too, which bypass the resolver; redirects open their connections through it.
    """

    def __init__(self) -> None:
        #: Set when a connection was refused: the fetch then fails as "forbidden", not "transfer".
        self.refused = False

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        if not _is_public(sockaddr[0]):
            self.refused = True
            log.warning("refused a connection to %s: not a public address", sockaddr[0])
            raise PermissionError(errno.EACCES, "not a public address")
        return socket.socket(family, type_, proto)


#: One lock per (cache_dir, name) while someone holds or waits for it; idle locks drop out.
_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()


def _name_lock(cache_dir: Path, name: str) -> asyncio.Lock:
    key = (os.path.abspath(cache_dir), name)
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = asyncio.Lock()
    return lock


def _is_complete(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def _new_staging(cache_dir: Path, name: str) -> Path:
    """A fresh staging directory for ``name``, after removing what a crashed or cancelled fetch left."""
    parent = cache_dir / _TMP / name
    shutil.rmtree(parent, ignore_errors=True)
    parent.mkdir(parents=True, exist_ok=True)
    # Unique, because the thread of a cancelled hub download may still be writing into its old one.
    return Path(tempfile.mkdtemp(dir=parent))


def _require_adapter(root: Path, url: str) -> None:
    if not root.is_dir():
        raise ArtifactError("not_found", f"{url}: does not exist or is not a directory")
    if not _is_complete(root):
        raise ArtifactError("not_found", f"{url} has no {ADAPTER_CONFIG} at its root")


def _install(root: Path, target: Path, replaced: Path) -> None:
    """Rename ``root`` to ``target`` in one step; an incomplete leftover ``target`` is moved aside first."""
    try:
        root.rename(target)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _is_complete(target):  # another process sharing the cache got there first
            return
        target.rename(replaced)
        root.rename(target)


async def _fetch_remote(
    source: _HttpSource | _S3Source | _HubSource,
    staging: Path,
    partial_dir: Path,
    credentials: Mapping[str, str],
    policy: ArtifactPolicy,
) -> Path:
    """Fetch ``source`` under ``staging``; return the directory that should become the adapter."""
    if isinstance(source, _HttpSource):
        return await _fetch_http(source, staging / "content", partial_dir, policy)
    if isinstance(source, _S3Source):
        stop = threading.Event()
        try:
            return await asyncio.to_thread(_s3_download, source, staging / "content", credentials, stop)
        finally:
            stop.set()  # a cancelled fetch: make the thread quit between chunks
    return await asyncio.to_thread(_hub_download, source, staging, credentials.get("token"))


# ---------------------------------------------------------------------------------------------
# http(s): resumable, checksummed archive download, then safe extraction
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Http:
    """GETs through ``session`` that follow redirects only to URLs ``policy`` accepts."""

    session: aiohttp.ClientSession
    policy: ArtifactPolicy

    @asynccontextmanager
    async def get(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        target = url
        for _ in range(_MAX_REDIRECTS + 1):
            async with self.session.get(target, headers=headers, allow_redirects=False) as resp:
                location = resp.headers.get("Location")
                if resp.status not in _REDIRECT_STATUSES or not location:
                    yield resp
                    return
            try:
                target = urljoin(target, location)
                reason = _url_refusal(urlsplit(target), self.policy)
            except ValueError as err:
                reason = str(err)
            if reason:
                # Where it redirects to is the server's business: logged, not told.
                log.warning("%s: refused a redirect to %s: %s", url, target, reason)
                raise ArtifactError("forbidden", f"{url}: redirected to a URL that is not allowed")
        raise ArtifactError("transfer", f"{url}: more than {_MAX_REDIRECTS} redirects")


async def _fetch_http(source: _HttpSource, dest: Path, partial_dir: Path, policy: ArtifactPolicy) -> Path:
    key = hashlib.sha256(source.url.encode()).hexdigest()[:32]
    partial = partial_dir / key
    meta_path = partial_dir / f"{key}.json"
    guard = None if policy.allow_private_networks else _AddressGuard()
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=guard), timeout=_HTTP_TIMEOUT, auto_decompress=False
        ) as session:
            http = _Http(session, policy)
            expected = await _companion_checksums(http, source.url)
            expected += await _download(http, source.url, partial, meta_path)
    except (aiohttp.ClientError, TimeoutError) as err:
        if guard is not None and guard.refused:
            raise ArtifactError("forbidden", f"{source.url}: {_NOT_PUBLIC}") from err
        # One message for every failure: telling refused, reset and garbled apart would let callers map
        # which ports answer. The partial file stays: the next attempt continues it.
        log.warning("%s: %s: %s", source.url, type(err).__name__, err)
        raise ArtifactError("transfer", f"{source.url}: {_CONNECTION_FAILED}") from err
    actual = await asyncio.to_thread(_hash_file, partial, {algorithm for algorithm, _, _ in expected})
    for algorithm, want, origin in expected:
        if actual[algorithm] != want:
            await asyncio.to_thread(_discard, partial, meta_path)
            raise ArtifactError(
                "checksum", f"{source.url}: {algorithm} is {actual[algorithm]}, but {origin} says {want}"
            )
    try:
        root = await asyncio.to_thread(_extract, partial, source.archive, dest, source.url)
    finally:
        # Extracted, or unusable as downloaded: either way no later attempt should continue this file.
        await asyncio.to_thread(shutil.rmtree, partial_dir, True)
    return root


def _http_status_error(kind: ArtifactErrorKind, url: str, resp: aiohttp.ClientResponse) -> ArtifactError:
    # Not the reason phrase or body: the server's own words stay in the log.
    log.warning("%s: HTTP %d %s", url, resp.status, resp.reason)
    return ArtifactError(kind, f"{url}: could not fetch the artifact (HTTP {resp.status})")


async def _companion_checksums(http: _Http, url: str) -> list[_Checksum]:
    """The checksum in ``<url>.sha256`` (``sha256sum`` output), when the server has that file."""
    parts = urlsplit(url)
    companion = urlunsplit(parts._replace(path=parts.path + ".sha256"))
    async with http.get(companion, headers={"Accept-Encoding": "identity"}) as resp:
        if resp.status >= 500:
            raise _http_status_error("transfer", companion, resp)
        if resp.status != 200:
            return []
        body = b""
        while len(body) < 4096 and (chunk := await resp.content.read(4096 - len(body))):
            body += chunk
    digest = (body.split() or [b""])[0].decode("ascii", "replace").lower()
    if not _SHA256_HEX.fullmatch(digest):
        raise ArtifactError("checksum", f"{companion} does not start with a sha256 hex digest")
    return [("sha256", digest, companion)]


async def _download(http: _Http, url: str, partial: Path, meta_path: Path) -> list[_Checksum]:
    """Bring ``partial`` up to the whole of ``url``, continuing from its current size when the server
    honours Range for the same entity; return the checksums the server declared for the entity."""
    meta, offset = await asyncio.to_thread(_load_partial, partial, meta_path)
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    async with http.get(url, headers=headers) as resp:
        if resp.status == 416 and offset:
            if _content_range(resp.headers.get("Content-Range", ""))[1] == offset:
                return _stored_checksums(meta)  # downloaded whole before a crash, never extracted
            await asyncio.to_thread(_discard, partial, meta_path)
            raise ArtifactError("transfer", f"{url}: the partial download no longer fits; next try restarts")
        if resp.status in (404, 410):
            raise _http_status_error("not_found", url, resp)
        if resp.status == 206 and offset:
            if _content_range(resp.headers.get("Content-Range", ""))[0] != offset:
                await asyncio.to_thread(_discard, partial, meta_path)
                raise ArtifactError("transfer", f"{url}: the server answered Range with other bytes")
            mode = "ab"
        elif resp.status == 200:  # a first request, or the server ignored Range / the entity changed
            meta = {"validator": _validator(resp.headers), "checksums": _header_checksums(resp.headers, url)}
            await asyncio.to_thread(_write_meta, meta_path, meta)
            mode = "wb"
        else:
            raise _http_status_error("transfer", url, resp)
        file = await asyncio.to_thread(partial.open, mode)
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                await asyncio.to_thread(file.write, chunk)
        finally:
            await asyncio.to_thread(file.close)
    return _stored_checksums(meta)


def _load_partial(partial: Path, meta_path: Path) -> tuple[dict[str, Any], int]:
    """What an earlier attempt left: its metadata and how many bytes it got (nothing without metadata)."""
    try:
        return json.loads(meta_path.read_text()), partial.stat().st_size
    except (OSError, ValueError):
        return {}, 0


def _write_meta(meta_path: Path, meta: dict[str, Any]) -> None:
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta))


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _stored_checksums(meta: dict[str, Any]) -> list[_Checksum]:
    return [(algorithm, digest, origin) for algorithm, digest, origin in meta.get("checksums", ())]


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total length) of a ``Content-Range: bytes first-last/total`` or ``bytes */total``."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if match is None:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _validator(headers: Mapping[str, str]) -> str | None:
    """What to send as If-Range so that a resumed request only continues the same entity."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range takes strong validators only
        return etag
    return headers.get("Last-Modified")


def _header_checksums(headers: CIMultiDictProxy[str], url: str) -> list[_Checksum]:
    """Checksums of the whole entity declared by a 200 response's headers."""
    found: list[_Checksum] = []
    if value := headers.get("x-checksum-sha256"):
        digest = value.strip().lower()
        if not _SHA256_HEX.fullmatch(digest):
            raise ArtifactError("checksum", f"{url}: malformed x-checksum-sha256 header {value!r}")
        found.append(("sha256", digest, "the x-checksum-sha256 header"))
    for value in headers.getall("Digest", ()):
        for item in value.split(","):
            token, _, encoded = item.strip().partition("=")
            if algorithm := _DIGEST_ALGORITHMS.get(token.lower()):
                found.append((algorithm, _base64_hex(encoded, "Digest", url), "the Digest header"))
    # Content-MD5 covers the bytes of this response, so it checks the whole entity only on a 200.
    if value := headers.get("Content-MD5"):
        found.append(("md5", _base64_hex(value, "Content-MD5", url), "the Content-MD5 header"))
    return found


def _base64_hex(value: str, header: str, url: str) -> str:
    try:
        return base64.b64decode(value.strip(), validate=True).hex()
    except binascii.Error as err:
        raise ArtifactError("checksum", f"{url}: malformed {header} header {value!r}") from err


def _hash_file(path: Path, algorithms: set[str]) -> dict[str, str]:
    hashers = {algorithm: hashlib.new(algorithm, usedforsecurity=False) for algorithm in algorithms}
    if hashers:
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                for hasher in hashers.values():
                    hasher.update(chunk)
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}


def _extract(archive: Path, suffix: str, dest: Path, url: str) -> Path:
    """Unpack ``archive`` into ``dest``; return the adapter root: ``dest``, or the archive's single folder."""
    dest.mkdir()
    try:
        if suffix == ".zip":
            _unzip(archive, dest, url)
        else:
            _untar(archive, dest, url)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ArtifactError("transfer", f"{url}: not a readable {suffix} archive: {err}") from err
    entries = list(dest.iterdir())
    if not _is_complete(dest) and len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _untar(archive: Path, dest: Path, url: str) -> None:
    with tarfile.open(archive) as tar:
        for member in tar:
            target = dest / _safe_relative(member.name, url)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise ArtifactError(
                    "unsupported", f"{url}: {member.name!r} is a link or device; adapters hold plain files"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, target.open("wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out, _CHUNK)


def _unzip(archive: Path, dest: Path, url: str) -> None:
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            target = dest / _safe_relative(info.filename, url)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArtifactError(
                    "unsupported", f"{url}: {info.filename!r} is a link; adapters hold plain files"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)


def _safe_relative(name: str, origin: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArtifactError(
            "unsupported", f"{origin}: refusing {name!r}: it would land outside the adapter directory"
        )
    return path


# ---------------------------------------------------------------------------------------------
# s3: every object under the prefix, each checked against its ETag when that is an MD5
# ---------------------------------------------------------------------------------------------


def _s3_download(
    source: _S3Source, dest: Path, credentials: Mapping[str, str], stop: threading.Event
) -> Path:
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError as err:
        raise ArtifactError("unsupported", f"{source}: s3:// needs boto3, which is not installed") from err
    session = boto3.session.Session(
        aws_access_key_id=credentials.get("aws_access_key_id"),
        aws_secret_access_key=credentials.get("aws_secret_access_key"),
        aws_session_token=credentials.get("aws_session_token"),
        region_name=credentials.get("region"),
    )
    # Without endpoint_url, boto3 reads AWS_ENDPOINT_URL(_S3) itself. A caller's endpoint is addressed
    # path-style: virtual-hosted style would connect to "<bucket>.<endpoint host>", a host name the caller
    # picks through the bucket name, past the endpoint checks.
    endpoint = credentials.get("endpoint_url")
    config = Config(retries={"mode": "standard"}, s3={"addressing_style": "path"} if endpoint else None)
    try:
        client = session.client("s3", endpoint_url=endpoint, config=config)
    except ValueError as err:  # an endpoint_url or region botocore cannot use (both the caller's)
        raise ArtifactError("bad_url", f"{source}: {err}") from err
    fetched = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=source.bucket, Prefix=source.prefix
        ):
            for entry in page.get("Contents", ()):
                key = entry["Key"]
                if key.endswith("/"):  # a "folder" marker object
                    continue
                target = dest / _safe_relative(key[len(source.prefix) :], str(source))
                _s3_get(client, source, key, target, stop)
                fetched += 1
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        kind: ArtifactErrorKind = "not_found" if code in ("NoSuchBucket", "NoSuchKey") else "transfer"
        raise ArtifactError(kind, f"{source}: {err}") from err
    except (BotoConnectionError, HTTPClientError) as err:
        # Their text tells refused, reset and timed-out connections apart, and names the endpoint.
        log.warning("%s: %s", source, err)
        raise ArtifactError("transfer", f"{source}: {_CONNECTION_FAILED}") from err
    except BotoCoreError as err:  # credentials missing, parameters invalid
        raise ArtifactError("transfer", f"{source}: {err}") from err
    if not fetched:
        raise ArtifactError("not_found", f"{source}: no objects under this prefix")
    return dest


def _s3_get(client: Any, source: _S3Source, key: str, target: Path, stop: threading.Event) -> None:
    response = client.get_object(Bucket=source.bucket, Key=key)
    md5 = hashlib.md5(usedforsecurity=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        for chunk in response["Body"].iter_chunks(_CHUNK):
            if stop.is_set():
                raise ArtifactError("transfer", f"{source}: cancelled")
            out.write(chunk)
            md5.update(chunk)
    # Multipart ETags ("<md5>-<parts>") and those of KMS or customer-key encrypted objects are not MD5s.
    etag = response.get("ETag", "").strip('"')
    encrypted = (
        response.get("ServerSideEncryption") in _ETAG_NOT_MD5_ENCRYPTION or "SSECustomerAlgorithm" in response
    )
    if _MD5_HEX.fullmatch(etag) and not encrypted and md5.hexdigest() != etag:
        raise ArtifactError(
            "checksum", f"s3://{source.bucket}/{key}: md5 is {md5.hexdigest()}, ETag says {etag}"
        )


# ---------------------------------------------------------------------------------------------
# hf: a snapshot of the repository at the revision
# ---------------------------------------------------------------------------------------------


def _hub_download(source: _HubSource, staging: Path, token: str | None) -> Path:
    url = f"hf://{source.repo_id}" + (f"@{source.revision}" if source.revision else "")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:
        raise ArtifactError("unsupported", f"{url}: hf:// needs huggingface_hub, not installed") from err
    local_dir = staging / "snapshot"
    try:
        snapshot_download(
            source.repo_id,
            revision=source.revision,
            local_dir=local_dir,
            # Refs and blobs would otherwise land in the user's shared hub cache.
            cache_dir=staging / "hub-cache",
            token=token,
            # huggingface_hub reads HF_ENDPOINT once, at import; read it per call.
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    # The client's messages name the endpoint, which may be an internal mirror: they go to the log.
    except GatedRepoError as err:
        log.warning("%s: %s", url, err)
        raise ArtifactError("transfer", f"{url}: gated repository, no access with this token") from err
    except RepositoryNotFoundError as err:
        log.warning("%s: %s", url, err)
        raise ArtifactError("not_found", f"{url}: repository not found") from err
    except RevisionNotFoundError as err:
        log.warning("%s: %s", url, err)
        raise ArtifactError("not_found", f"{url}: revision not found") from err
    except HFValidationError as err:
        raise ArtifactError("bad_url", f"{url}: {err}") from err
    except Exception as err:  # the hub client raises httpx errors, OSErrors and its own, unrelated, types
        log.warning("%s: %s: %s", url, type(err).__name__, err)
        raise ArtifactError(
            "transfer", f"{url}: could not fetch the artifact (details in the sidecar's log)"
        ) from err
    shutil.rmtree(local_dir / ".cache", ignore_errors=True)  # the hub client's download bookkeeping
    return local_dir
