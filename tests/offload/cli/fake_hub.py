"""A Hugging Face Hub cache built in a temp folder, and a local stand-in for the Hub's HTTP API, for tests of
Hub names without the network.

`add_to_cache` lays files out as huggingface_hub's cache does (models--org--name/{blobs, snapshots/<commit>,
refs/main}, snapshot files symlinked to their blobs). `FakeHub` serves folders as repositories on 127.0.0.1
(set HF_ENDPOINT to its url): the tree listing, repo info, and `resolve` downloads with HEAD and Range requests,
logging each request so a test can see what was fetched; unknown repositories answer as the Hub does
(404 RepoNotFound), and `gated` ones with 403 GatedRepo.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Put `files` (path in the repository -> a local file) in the Hub cache `cache`; returns the snapshot."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def repo_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    """Serves {repo_id: folder}; `requests` logs (method, path, Range header) of each request."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos, self.gated, self.requests = repos, gated, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request, body: bool):
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range")))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[0:2])
        if repo_id not in self.repos:
            return self.reply(request, 404, b'{"error": "Repository not found"}', body,
                              {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo_id in self.gated:
            return self.reply(request, 403, b'{"error": "gated"}', body,
                              {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted"})
        files = repo_files(self.repos[repo_id])
        rest = parts[4:] if api else parts[2:]
        if api and rest[:1] == ["tree"]:
            listing = [{"type": "file", "path": name, "size": p.stat().st_size, "oid": _sha1(p)}
                       for name, p in files.items()]
            return self.reply(request, 200, json.dumps(listing).encode(), body)
        if api:                                             # repo info (any revision)
            info = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": name} for name in files]}
            return self.reply(request, 200, json.dumps(info).encode(), body)
        if rest[:1] == ["resolve"] and "/".join(rest[2:]) in files:
            data = files["/".join(rest[2:])].read_bytes()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            ranged = request.headers.get("Range")
            if ranged:
                begin, _, end = ranged.removeprefix("bytes=").partition("-")
                end = min(int(end) if end else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {begin}-{end}/{len(data)}"
                return self.reply(request, 206, data[int(begin):end + 1], body, headers)
            return self.reply(request, 200, data, body, headers)
        return self.reply(request, 404, b'{"error": "Entry not found"}', body,
                          {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})

    @staticmethod
    def reply(request, status: int, data: bytes, body: bool, headers: dict | None = None):
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("Content-Type", "application/json" if data[:1] in (b"{", b"[") else
                            "application/octet-stream")
        request.end_headers()
        if body:
            request.wfile.write(data)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
