"""In-process stand-in for the Hugging Face Hub HTTP API, for tests.

Serves what ``huggingface_hub.snapshot_download`` (2.4) asks for, for model repos added from local
folders, on the running event loop (the client runs in a thread, so a test just awaits the download)::

    async with HfMirror() as hub:
        sha = hub.add_repo("org/adapter", folder)            # branch "main"
        hub.add_repo("org/adapter", other_folder, revision="v2")
        snapshot_download("org/adapter", endpoint=hub.endpoint, local_dir=...)

Endpoints, as the client calls them:

    GET  /api/models/{org}/{name}/revision/{revision}     model info: ``id``, ``sha`` and ``siblings``
    GET  /api/models/{org}/{name}/tree/{revision}         the listing (``recursive=true``), in one page
    HEAD /{org}/{name}/resolve/{revision}/{path}          ``ETag``, ``X-Repo-Commit``, ``Content-Length``
    GET  /{org}/{name}/resolve/{revision}/{path}          the bytes, honouring ``Range``

A revision is a branch added with ``add_repo`` or the commit sha of one. Failures are 404s with the
``X-Error-Code`` the real Hub sends (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``): that
header, not the status, is what the client turns into its exception types.

Not served: LFS and Xet storage (every file is a plain git blob, its ETag the blob's git sha1), tree
pagination and subfolder listings, repo ids without an organisation, private or gated repos (tokens
are recorded, not checked), datasets and spaces, and ``/api/agent-harnesses``: the client's user-agent
telemetry, which it sends to the endpoint read at import; tests set ``HF_HUB_DISABLE_TELEMETRY``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web

__all__ = ["HfMirror", "RecordedRequest"]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # with the query string
    authorization: str | None


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, bytes]  # repo path -> content


def _git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()


def _not_found(code: str, message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        headers={"X-Error-Code": code, "X-Error-Message": message}, text=f'{{"error": "{message}"}}'
    )


class HfMirror:
    """The Hub API for a few repos, on 127.0.0.1; ``endpoint`` is its base URL once started."""

    def __init__(self) -> None:
        self.endpoint = ""
        #: Every request, in order.
        self.requests: list[RecordedRequest] = []
        self._repos: dict[str, dict[str, _Commit]] = {}  # repo id -> branch -> commit
        self._runner: web.AppRunner | None = None

    def add_repo(self, repo_id: str, folder: Path, *, revision: str = "main") -> str:
        """Serve the files under ``folder`` as branch ``revision`` of ``repo_id``; return its commit sha."""
        files = {
            path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        listing = "".join(f"{name}\0{_git_blob_sha(data)}\n" for name, data in files.items())
        sha = hashlib.sha1(f"{repo_id}\0{revision}\0{listing}".encode(), usedforsecurity=False).hexdigest()
        self._repos.setdefault(repo_id, {})[revision] = _Commit(sha, files)
        return sha

    async def __aenter__(self) -> HfMirror:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self._model_info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self._tree)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve)  # HEAD too
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: web.Handler) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(request.method, request.path_qs, request.headers.get("Authorization"))
        )
        return await handler(request)

    def _commit(self, request: web.Request) -> tuple[str, _Commit]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        branches = self._repos.get(repo_id)
        if branches is None:
            raise _not_found("RepoNotFound", "Repository not found")
        revision = request.match_info["revision"]
        commit = branches.get(revision) or next((c for c in branches.values() if c.sha == revision), None)
        if commit is None:
            raise _not_found("RevisionNotFound", f"Invalid rev id: {revision}")
        return repo_id, commit

    async def _model_info(self, request: web.Request) -> web.Response:
        repo_id, commit = self._commit(request)
        return web.json_response(
            {
                "_id": commit.sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha,
                "lastModified": "2024-01-01T00:00:00.000Z",
                "private": False,
                "gated": False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in commit.files],
            }
        )

    async def _tree(self, request: web.Request) -> web.Response:
        _, commit = self._commit(request)
        recursive = request.query.get("recursive", "false").lower() in ("true", "1")
        entries: dict[str, dict[str, object]] = {}
        for path, data in commit.files.items():
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                entries.setdefault(
                    folder, {"type": "directory", "oid": _git_blob_sha(folder.encode()), "size": 0}
                )
            entries[path] = {"type": "file", "oid": _git_blob_sha(data), "size": len(data)}
        listing = [
            {**entry, "path": path} for path, entry in sorted(entries.items()) if recursive or "/" not in path
        ]
        return web.json_response(listing)

    async def _resolve(self, request: web.Request) -> web.Response:
        _, commit = self._commit(request)
        data = commit.files.get(request.match_info["path"])
        if data is None:
            raise _not_found("EntryNotFound", f"{request.match_info['path']} does not exist on {commit.sha}")
        headers = {
            "ETag": f'"{_git_blob_sha(data)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if match is None:
            return web.Response(body=data, headers=headers)
        start = int(match[1])
        end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        if start > end:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return web.Response(status=206, body=data[start : end + 1], headers=headers)
