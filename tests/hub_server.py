"""A local Hugging Face Hub-compatible HTTP server, serving dataset repositories from a directory.

`huggingface_hub` (HfApi, HfFileSystem, hf_hub_download) and `datasets` (streaming included) work against it as against
huggingface.co when HF_ENDPOINT is its `url` (both read HF_ENDPOINT at import time: run them in a subprocess).
The repo `org/name` is the folder `root/org/name` (`root/name` for a canonical name); its files are served as they are
on disk, hidden files and folders excepted. Its sha hashes the manifest (path, size, mtime_ns) of its files.

Routes, as the libraries call them: GET /api/datasets/{id}[/revision/{rev}], GET /api/datasets/{id}/tree/{rev}[/{path}]
(paginated with a `Link` header), POST /api/datasets/{id}/paths-info/{rev}, GET|HEAD /datasets/{id}/resolve/{rev}/{path}
(Range → 206). Errors carry the `X-Error-Code` / `X-Error-Message` headers huggingface_hub types its errors from.

Modes (`modes[repo_id]`, or `mode` for every repo): "missing" (404 RepoNotFound), "private" (401 RepoNotFound without
`Authorization: Bearer <token>`), "gated" (as on the Hub, the repo's info, tree and README.md stay public; its other
files answer 401 GatedRepo without a token, 403 GatedRepo with a wrong one), "error" (500 on every request), "hang" (no
answer until the server stops or `hang_seconds` pass; then the connection is closed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import re
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import yaml  # PyYAML: a dependency of huggingface_hub and datasets

API_ROUTES = {"revision", "tree", "paths-info"}
CHUNK = 64 * 1024


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Hang(Exception):
    """The request gets no answer."""


class HubServer:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.token = "hf_test_token"
        self.modes: dict[str, str] = {}
        self.mode: str | None = None
        self.hang_seconds = 60.0
        self.hang_on: str | None = None  # requests whose path holds this hang, whatever the repo's mode
        self.page_size = 1000  # entries per tree page (as the Hub: 1000, and at most 50 with expand=true)
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path?query, headers with lower-case names)
        self.bytes_sent: dict[str, int] = {}  # "repo_id/path_in_repo" -> bytes of the file written to the sockets
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._blob_ids: dict[tuple[Path, int, int], str] = {}
        self._httpd = _Server(self)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()  # releases the hanging requests
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def repo_dir(self, repo_id: str) -> Path | None:
        parts = repo_id.split("/")
        if len(parts) > 2 or any(not part or part.startswith(".") for part in parts):
            return None
        path = self.root.joinpath(*parts)
        return path if path.is_dir() else None

    def files(self, repo_id: str) -> list[str]:
        """The repo's files: sorted paths relative to its folder, without the hidden files and folders."""
        repo = self.repo_dir(repo_id)
        paths = (path.relative_to(repo).as_posix() for path in repo.rglob("*") if path.is_file()) if repo else ()
        return sorted(path for path in paths if not any(part.startswith(".") for part in path.split("/")))

    def revision(self, repo_id: str) -> str:
        repo, digest = self.repo_dir(repo_id), hashlib.sha1(repo_id.encode())
        for path in self.files(repo_id):
            stat = (cast(Path, repo) / path).stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def blob_id(self, path: Path) -> str:
        """The file's git blob sha1: the Hub's `oid` and ETag of a (non-LFS) file."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._blob_ids:
            digest = hashlib.sha1(f"blob {stat.st_size}\0".encode())
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self._blob_ids[key] = digest.hexdigest()
        return self._blob_ids[key]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub, self.connections = hub, set[socket.socket]()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.hub._lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.hub._lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Also ends the kept-alive connections (server_close joins their threads), as a stopping server does."""
        with self.hub._lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed
                connection.shutdown(socket.SHUT_RDWR)
        super().server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        hub = self.server.hub
        with hub._lock:
            hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # read it all: keep the connection usable
        if hub.hang_on is not None and hub.hang_on in self.path:
            hub._stopping.wait(hub.hang_seconds)
            self.close_connection = True
            return
        url = urlsplit(self.path)
        segments, query = url.path.split("/")[1:], parse_qs(url.query)
        try:
            if segments[:2] == ["api", "datasets"] and len(segments) > 2:
                self._api(*_split_repo(segments[2:], API_ROUTES), query, body)
            elif segments[:1] == ["datasets"] and len(segments) > 2:
                repo_id, rest = _split_repo(segments[1:], {"resolve"})
                if rest[:1] != ["resolve"] or len(rest) < 3:
                    raise HubError(404, None, "Not Found")
                path = unquote("/".join(rest[2:]))
                self._check_access(repo_id, path)
                self._resolve(repo_id, self._check_revision(repo_id, rest[1]), path)
            else:
                raise HubError(404, None, "Not Found")
        except _Hang:
            self.close_connection = True
        except HubError as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._send(e.status, json.dumps({"error": e.message}).encode(), "application/json", headers)

    do_HEAD = do_POST = do_GET

    def _check_access(self, repo_id: str, file: str | None) -> None:
        """Applies the repo's mode to a request for a file, or to an API call (`file` None)."""
        hub = self.server.hub
        mode, authorization = hub.modes.get(repo_id, hub.mode), self.headers.get("Authorization")
        if mode == "hang":
            hub._stopping.wait(hub.hang_seconds)
            raise _Hang
        if mode == "error":
            raise HubError(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
        if mode == "missing" or hub.repo_dir(repo_id) is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if mode == "private" and authorization != f"Bearer {hub.token}":
            raise HubError(401, "RepoNotFound", "Repository not found")
        if mode == "gated" and file not in (None, "README.md") and authorization != f"Bearer {hub.token}":
            status, reason = (
                (401, "You must have access to it and be authenticated to access it. Please log in.")
                if authorization is None
                else (403, f"You are not in the authorized list. Visit https://huggingface.co/datasets/{repo_id}.")
            )
            raise HubError(status, "GatedRepo", f"Access to dataset {repo_id} is restricted. {reason}")

    def _check_revision(self, repo_id: str, revision: str) -> str:
        sha = self.server.hub.revision(repo_id)
        if unquote(revision) not in ("main", sha):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        return sha

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub = self.server.hub
        self._check_access(repo_id, None)
        route, rest = (rest[0], rest[1:]) if rest else ("revision", ["main"])
        if route not in API_ROUTES or not rest or (route == "revision" and len(rest) > 1):
            raise HubError(404, None, "Not Found")
        if (route == "paths-info") != (self.command == "POST"):
            raise HubError(405, None, "Method Not Allowed")
        sha, repo = self._check_revision(repo_id, rest[0]), cast(Path, hub.repo_dir(repo_id))
        if route == "revision":
            return self._json(_info(hub, repo_id, sha, query))
        if route == "paths-info":  # a form (paths=a&paths=b&expand=false), or JSON
            form = json.loads(body) if "json" in self.headers.get("Content-Type", "") else parse_qs(body.decode())
            expand = form.get("expand") in (True, ["true"])
            infos = (_entry(hub, repo, sha, path.strip("/"), expand) for path in form.get("paths", []))
            return self._json([info for info in infos if info])
        path, expand = unquote("/".join(rest[1:])).strip("/"), query.get("expand") == ["true"]
        if not (_safe_path(repo, path) if path else repo).is_dir():
            raise HubError(404, "EntryNotFound", f"{path} does not exist on main", {"X-Repo-Commit": sha})
        recursive, prefix, names = query.get("recursive") == ["true"], path + "/" if path else "", set[str]()
        for file in hub.files(repo_id):
            if file.startswith(prefix):  # its child folder (or itself); recursive: all its folders and itself
                parts = file[len(prefix) :].split("/")
                names.update(prefix + "/".join(parts[:i]) for i in range(1, (len(parts) if recursive else 1) + 1))
        entries = [_entry(hub, repo, sha, name, expand) for name in sorted(names)]
        page_size, cursor = min(hub.page_size, 50) if expand else hub.page_size, int(query.get("cursor", ["0"])[0])
        headers = {}
        if cursor + page_size < len(entries):
            next_query = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={cursor + page_size}"
            headers["Link"] = f'<{hub.url}{urlsplit(self.path).path}?{next_query}>; rel="next"'
        self._json(entries[cursor : cursor + page_size], headers)

    def _resolve(self, repo_id: str, sha: str, path: str) -> None:
        hub = self.server.hub
        file = _safe_path(cast(Path, hub.repo_dir(repo_id)), path)
        if not file.is_file():
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        size, status = file.stat().st_size, 200
        headers = {"ETag": f'"{hub.blob_id(file)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        start, end = 0, size - 1
        if match := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip()):
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last or end), end)
            else:  # the last bytes
                start = max(size - int(last or 0), 0)
            if start > end or not (first or last):
                raise HubError(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self._send(status, None, content_type, {**headers, "Content-Length": str(end - start + 1)})
        if self.command == "HEAD":
            return
        key, remaining = f"{repo_id}/{path}", end - start + 1
        with file.open("rb") as f:
            f.seek(start)
            while remaining > 0 and (chunk := f.read(min(CHUNK, remaining))):
                try:
                    self.wfile.write(chunk)
                except OSError:  # the client went away (e.g. it had read what it needed)
                    self.close_connection = True
                    return
                remaining -= len(chunk)
                with hub._lock:
                    hub.bytes_sent[key] = hub.bytes_sent.get(key, 0) + len(chunk)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(data).encode(), "application/json; charset=utf-8", headers or {})

    def _send(self, status: int, body: bytes | None, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body is not None and self.command != "HEAD":
            self.wfile.write(body)


def _split_repo(segments: list[str], routes: set[str]) -> tuple[str, list[str]]:
    """The repo id and the rest of the URL path: `name/<route>/...` is the canonical repo `name`, else `org/name`."""
    size = 1 if len(segments) == 1 or (len(segments) > 2 and segments[1] in routes) else 2
    return "/".join(unquote(segment) for segment in segments[:size]), segments[size:]


def _safe_path(repo: Path, path: str) -> Path:
    """The repo's file or folder at `path`; 404 if the path escapes the repo or is hidden."""
    parts, target = path.split("/"), repo.joinpath(*path.split("/"))
    if any(not part or part.startswith(".") for part in parts) or not target.resolve().is_relative_to(repo.resolve()):
        raise HubError(404, "EntryNotFound", "Entry not found")
    return target


def _entry(hub: HubServer, repo: Path, sha: str, path: str, expand: bool) -> dict[str, Any] | None:
    """A tree / paths-info entry, as the Hub answers it; None for a missing path."""
    try:
        target = _safe_path(repo, path)
    except HubError:
        return None
    if target.is_file():
        entry: dict[str, Any] = {"type": "file", "oid": hub.blob_id(target), "size": target.stat().st_size}
    elif target.is_dir():
        entry = {"type": "directory", "oid": hashlib.sha1(f"{sha}:{path}".encode()).hexdigest(), "size": 0}
    else:
        return None
    if expand:
        entry["lastCommit"] = {"id": sha, "title": "Upload", "date": _iso(target.stat().st_mtime_ns)}
    return {**entry, "path": path}


def _info(hub: HubServer, repo_id: str, sha: str, query: dict[str, list[str]]) -> dict[str, Any]:
    """The repo's info (its `siblings` with sizes if ?blobs=true; only the ?expand= properties if some are given)."""
    repo, mode = cast(Path, hub.repo_dir(repo_id)), hub.modes.get(repo_id, hub.mode)
    stats = {path: (repo / path).stat() for path in hub.files(repo_id)}
    readme = (repo / "README.md").read_text() if "README.md" in stats else ""
    card = yaml.safe_load(match.group(1)) if (match := re.match(r"---\n(.*?)\n---", readme, re.S)) else None
    blobs = query.get("blobs", [""])[0].lower() == "true"
    modified = _iso(max((stat.st_mtime_ns for stat in stats.values()), default=repo.stat().st_mtime_ns))
    info = {
        "_id": sha[:24],
        "id": repo_id,
        "author": repo_id.split("/")[0] if "/" in repo_id else None,
        "sha": sha,
        "lastModified": modified,
        "createdAt": modified,
        "private": mode == "private",
        "gated": "auto" if mode == "gated" else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "cardData": card if isinstance(card, dict) else None,
        "siblings": [
            {"rfilename": path, **({"size": stat.st_size, "blobId": hub.blob_id(repo / path)} if blobs else {})}
            for path, stat in stats.items()
        ],
        "usedStorage": sum(stat.st_size for stat in stats.values()),
    }
    if expand := query.get("expand"):
        info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
    return {key: value for key, value in info.items() if value is not None}


def _iso(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
