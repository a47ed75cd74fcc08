"""A loopback Hugging Face hub: answers ``{prefix}/{org}/{repo}/resolve/{revision}/{file}`` with the headers
``huggingface_hub.hf_hub_download`` reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``X-Error-Code``;
``Location``, ``X-Linked-Etag`` and ``X-Linked-Size`` when large files live on a separate CDN, as on huggingface.co),
Range requests, and a bearer token for a private repository; no Xet headers, so the client uses plain HTTP. Any
``prefix`` is accepted, so one server is the hub and its mirrors alike.

It misbehaves on purpose: cut a body once, stall once, ignore Range, corrupt the bytes (under the right ETag, as a
lying mirror would), go slow, answer with error statuses; it counts the body bytes sent and records each request.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ornis.weights.manifest import PretrainedWeights, WeightsFile

ORGANISATION = "birder-project"
CHUNK = 65536
_RESOLVE = re.compile(r"^(?P<prefix>.*?)/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>[^?]+)")


@dataclass(frozen=True)
class Request:
    """One request the hub received."""

    method: str
    path: str
    range: str | None
    authorization: str | None


class LoopbackHub(ThreadingHTTPServer):
    """Serves ``repos`` (repo id -> file name -> bytes) at revision ``main``; see the module's docstring."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes, served at /cdn/<sha256>
        self.cdn_url: str | None = None  # redirect resolve requests there (a LoopbackHub sharing ``blobs``)
        self.token: str | None = None  # every repository is private: this bearer token is required
        self.cut_after: int | None = None  # close the next body after this many bytes, once
        self.stall_after: int | None = None  # go silent for ``stall_s`` after this many bytes of a body, once
        self.stall_s = 0.0
        self.ignore_range = False
        self.corrupt = False
        self.delay_per_chunk = 0.0
        self.fail_with: list[int] = []  # HTTP error statuses to answer the next requests with, one each, in order
        self.bytes_sent = 0
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The hub's endpoint."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def publish(self, repo_id: str, filename: str, data: bytes) -> None:
        """Put ``data`` in repository ``repo_id`` as ``filename``."""
        self.repos.setdefault(repo_id, {})[filename] = data
        self.blobs[hashlib.sha256(data).hexdigest()] = data

    def gets(self) -> list[tuple[str, str | None]]:
        """The GET requests so far, as (path, Range header)."""
        return [(r.path, r.range) for r in self.requests if r.method == "GET"]


def commit_of(repo_id: str) -> str:
    """The (made-up, stable) commit hash of ``repo_id``'s ``main``."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append(
                Request(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
            status = srv.fail_with.pop(0) if srv.fail_with else None
        if status is not None:
            return self._error(status, body)
        if self.path.startswith("/cdn/"):
            data = srv.blobs.get(self.path.removeprefix("/cdn/").split("?")[0])
            return self._error(404, body) if data is None else self._send(data, body, {})
        m = _RESOLVE.match(self.path)
        if m is None:
            return self._error(404, body)
        repo, commit = m["repo"], commit_of(m["repo"])
        if srv.token is not None and self.headers.get("Authorization") != f"Bearer {srv.token}":
            return self._error(401, body, "RepoNotFound")  # what the hub answers for a private repo
        if repo not in srv.repos:
            return self._error(404, body, "RepoNotFound")
        if m["revision"] not in ("main", commit):
            return self._error(404, body, "RevisionNotFound")
        data = srv.repos[repo].get(m["file"])
        if data is None:
            return self._error(404, body, "EntryNotFound", {"X-Repo-Commit": commit})
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{sha}"'}
        if srv.cdn_url is not None:
            headers.update({"Location": f"{srv.cdn_url}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"'})
            headers["X-Linked-Size"] = str(len(data))
            return self._redirect(headers)
        headers["Content-Disposition"] = f'attachment; filename="{m["file"]}"'
        self._send(data, body, headers)

    def _error(self, status: int, body: bool, code: str | None = None, headers: dict | None = None) -> None:
        text = f"{status} {code or 'error'}".encode()
        self.send_response(status)
        for k, v in {**({"X-Error-Code": code} if code else {}), **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(text) if body else 0))
        self.end_headers()
        if body:
            self.wfile.write(text)

    def _redirect(self, headers: dict) -> None:
        self.send_response(302)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data: bytes, body: bool, headers: dict) -> None:
        srv = self.server
        if srv.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        rng = self.headers.get("Range") if body and not srv.ignore_range else None
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self._stream(data[start:])

    def _stream(self, payload: bytes) -> None:
        srv = self.server
        with srv.lock:
            limit = len(payload) if srv.cut_after is None else min(len(payload), srv.cut_after)
            srv.cut_after = None
        sent = 0
        try:
            while sent < limit:
                chunk = payload[sent : min(sent + CHUNK, limit)]
                self.wfile.write(chunk)
                sent += len(chunk)
                with srv.lock:
                    srv.bytes_sent += len(chunk)
                    stall = srv.stall_after is not None and sent >= srv.stall_after
                    if stall:
                        srv.stall_after = None
                if stall:
                    self.wfile.flush()
                    time.sleep(srv.stall_s)
                if srv.delay_per_chunk:
                    time.sleep(srv.delay_per_chunk)
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(payload):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


@contextmanager
def running_hub() -> Iterator[LoopbackHub]:
    """A ``LoopbackHub`` on a background thread, shut down afterwards."""
    srv = LoopbackHub()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def weights_entry(name: str, network: str, data: bytes, *, num_classes: int, endpoint: str) -> PretrainedWeights:
    """A manifest entry for test weights ``data`` of architecture ``network`` at 32x32, published on the hub at
    ``endpoint`` as ``birder-project/<name>``; its tag is what follows the architecture in ``name``."""
    return PretrainedWeights(
        name=name,
        network=network,
        tag=name.removeprefix(network + "_"),
        resolution=(32, 32),
        task="image_classification",
        description="random weights for tests",
        files=(WeightsFile("pt", len(data) / 1e6, hashlib.sha256(data).hexdigest()),),
        num_classes=num_classes,
        base_url=f"{endpoint}/{ORGANISATION}/{name}/resolve/main",
    )


def resolve_path(name: str, file_format: str = "pt", prefix: str = "") -> str:
    """The request path of published weights ``name`` on the hub (under a mirror's ``prefix``)."""
    return f"{prefix}/{ORGANISATION}/{name}/resolve/main/{name}.{file_format}"
