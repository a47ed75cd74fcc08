"""A loopback HTTP server that serves weights files the way a hub does (Range requests, Content-Length), and can
misbehave on purpose: cut the connection, ignore Range, corrupt the body, stall, go slow, answer with errors."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ornis.weights.manifest import PretrainedWeights, WeightsFile


class WeightsServer(ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with Range support; can cut the connection after ``cut_after`` bytes
    (once), ignore Range headers, corrupt the body, slow down, and answer the next requests with the error statuses
    in ``fail_with``; counts bytes sent and records requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.ignore_range = False
        self.corrupt = False
        self.delay_per_chunk = 0.0
        self.stall_once = 0.0  # seconds to go silent after the first chunk, once (a stalled connection)
        self.fail_with: list[int] = []  # HTTP error statuses to answer the next requests with, one each, in order
        self.bytes_sent = 0
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: WeightsServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.path, rng))
        with srv.lock:
            status = srv.fail_with.pop(0) if srv.fail_with else None
        if status is not None:
            self.send_error(status)
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if srv.corrupt:
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        limit = len(body)
        with srv.lock:
            if srv.cut_after is not None:
                limit, srv.cut_after = min(limit, srv.cut_after), None
        sent = 0
        try:
            while sent < limit:
                chunk = body[sent : min(sent + 65536, limit)]
                self.wfile.write(chunk)
                sent += len(chunk)
                with srv.lock:
                    srv.bytes_sent += len(chunk)
                if srv.delay_per_chunk:
                    time.sleep(srv.delay_per_chunk)
                with srv.lock:
                    stall, srv.stall_once = srv.stall_once, 0.0
                if stall:
                    time.sleep(stall)
        except (BrokenPipeError, ConnectionResetError):
            return
        if limit < len(body):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


@contextmanager
def running_server(files: dict[str, bytes] | None = None) -> Iterator[WeightsServer]:
    """A ``WeightsServer`` serving ``files`` (URL path -> bytes) on a background thread, shut down afterwards."""
    srv = WeightsServer()
    srv.files.update(files or {})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def weights_entry(name: str, network: str, data: bytes, *, num_classes: int, base_url: str) -> PretrainedWeights:
    """A manifest entry for test weights ``data`` of architecture ``network`` at 32x32, published under
    ``base_url``; its tag is what follows the architecture in ``name``."""
    return PretrainedWeights(
        name=name,
        network=network,
        tag=name.removeprefix(network + "_"),
        resolution=(32, 32),
        task="image_classification",
        description="random weights for tests",
        files=(WeightsFile("pt", len(data) / 1e6, hashlib.sha256(data).hexdigest()),),
        num_classes=num_classes,
        base_url=base_url,
    )
