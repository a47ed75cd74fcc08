"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1 (a free port), reached by the real
clients (s3fs through fsspec, pyarrow's own S3 filesystem) over HTTP, nothing patched.

``running_s3_server()`` (for a module-scoped fixture) starts it and points the usual environment at it
(``AWS_ENDPOINT_URL``, dummy keys), so ``ornis embed s3://...`` in this process or in a subprocess finds it the way a
user's run finds real S3."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
    "AWS_MAX_ATTEMPTS": "2",  # a refused request fails fast instead of retrying for long
    "AWS_RETRY_MODE": "standard",
}


@dataclass(frozen=True)
class S3Server:
    """Where the server listens."""

    host: str
    port: int

    @property
    def endpoint(self) -> str:
        """The URL clients are pointed at."""
        return f"http://{self.host}:{self.port}"

    def filesystem(self):
        """A fresh s3fs filesystem on the server (no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)

    def arrow_filesystem(self):
        """pyarrow's own S3 filesystem on the server: a client independent of fsspec."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=f"{self.host}:{self.port}",
            scheme="http",
            access_key=ENV["AWS_ACCESS_KEY_ID"],
            secret_key=ENV["AWS_SECRET_ACCESS_KEY"],
            region=ENV["AWS_DEFAULT_REGION"],
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def upload(self, local: Path, url: str) -> str:
        """Copy a local file or folder (recursively) to ``url``; returns ``url``."""
        fs = self.filesystem()
        target = url.split("://", 1)[1].rstrip("/")
        if local.is_dir():
            for path in sorted(local.rglob("*")):
                if path.is_file():
                    fs.pipe_file(f"{target}/{path.relative_to(local).as_posix()}", path.read_bytes())
        else:
            fs.pipe_file(target, local.read_bytes())
        return url

    def keys(self, url: str) -> list[str]:
        """The object names under ``url``, relative to it, fresh from the server."""
        fs = self.filesystem()
        prefix = url.split("://", 1)[1].rstrip("/") + "/"
        return sorted(k[len(prefix) :] for k in fs.find(prefix))


def _clear_instances() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance made for an earlier server would keep its endpoint


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, with the environment pointing at it for this module's tests."""
    pytest.importorskip("s3fs", reason="the object-storage tests need s3fs (pip install 'ornis[s3]')")
    server_module = pytest.importorskip("moto.server", reason="the object-storage tests need moto[server]")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line a request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(host, port)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**ENV, "AWS_ENDPOINT_URL": info.endpoint}.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        _clear_instances()
        try:
            yield info
        finally:
            _clear_instances()
            server.stop()
