"""The parts of the Hugging Face hub protocol that ornis relies on, against a loopback hub: how ornis's settings
become huggingface_hub's (endpoint, mirror, HF_ENDPOINT, token), a large file redirected to a CDN, a server that is
no hub, a download killed midway, and copies already in huggingface_hub's cache."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import signal
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # read HF_ENDPOINT now, before a test sets it
import pytest
from support.hub import LoopbackHub, resolve_path, running_hub, weights_entry

from ornis.errors import WeightsNotFoundError
from ornis.weights import cache, hub, manifest

NAME = "vit_t16_hub-test"
REPO = f"birder-project/{NAME}"
DATA = hashlib.sha256(b"seed").digest() * 65536  # 2 MiB of published bytes
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture()
def server():
    with running_hub() as srv:
        srv.publish(REPO, f"{NAME}.pt", DATA)
        yield srv


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh cache, network allowed, no mirror or token from the caller's environment; returns the cache root."""
    monkeypatch.setenv("ORNIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORNIS_OFFLINE", "0")
    for var in ("ORNIS_BASE_URL", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cache"


@pytest.fixture()
def entry(server: LoopbackHub, env: Path, monkeypatch: pytest.MonkeyPatch):
    weights = weights_entry(NAME, "vit_t16", DATA, num_classes=0, endpoint=server.url)
    monkeypatch.setitem(manifest.MANIFEST, NAME, weights)
    return weights


def published_entry(monkeypatch: pytest.MonkeyPatch):
    """An entry on huggingface.co itself (no base of its own), as the real manifest's are."""
    weights = dataclasses.replace(weights_entry(NAME, "vit_t16", DATA, num_classes=0, endpoint=""), base_url="")
    monkeypatch.setitem(manifest.MANIFEST, NAME, weights)
    return weights


def test_settings_become_endpoint_repository_and_revision(env, monkeypatch):
    weights = published_entry(monkeypatch)
    assert hub.locate(weights).url == f"https://huggingface.co/{REPO}/resolve/main/{NAME}.pt"
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    assert hub.locate(weights).base == f"https://hf-mirror.example/{REPO}/resolve/main"
    monkeypatch.setenv("ORNIS_BASE_URL", "http://mirror.lan/hub")  # ornis's own setting wins
    assert hub.locate(weights).base == f"http://mirror.lan/hub/{REPO}/resolve/main"
    monkeypatch.setenv("ORNIS_BASE_URL", "http://mirror.lan/team/{name}/resolve/v2")  # a full base names the repo
    assert hub.locate(weights).base == f"http://mirror.lan/team/{NAME}/resolve/v2"
    assert cache.base_url_for(weights, "http://other") == f"http://other/{REPO}/resolve/main"  # --base-url first


def test_hf_endpoint_reaches_weights_published_on_the_hub(server, env, monkeypatch):
    published_entry(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", f"{server.url}/hf")
    path = cache.resolve_weights(NAME, progress=False)
    assert path.read_bytes() == DATA
    # The file and nothing else: huggingface_hub's daily agent-registry request is off for ornis's downloads
    at = resolve_path(NAME, prefix="/hf")
    assert [(r.method, r.path) for r in server.requests] == [("HEAD", at), ("GET", at)]


def test_full_mirror_base_names_the_repository(entry, server, monkeypatch):
    server.publish(f"team/{NAME}", f"{NAME}.pt", DATA)
    monkeypatch.setenv("ORNIS_BASE_URL", f"{server.url}/m/team/{{name}}/resolve/main")
    cache.resolve_weights(NAME, progress=False)
    assert server.gets() == [(f"/m/team/{NAME}/resolve/main/{NAME}.pt", None)]


def test_private_repository_needs_the_token(entry, server, monkeypatch):
    server.token = "hf_secret"
    with pytest.raises(WeightsNotFoundError) as e:
        cache.resolve_weights(NAME, progress=False)
    msg = str(e.value)
    assert f"HTTP 401: no repository {REPO} at {server.url}" in msg and "HF_TOKEN" in msg and "\n" not in msg
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert cache.resolve_weights(NAME, progress=False).read_bytes() == DATA
    assert server.requests[-1].authorization == "Bearer hf_secret"


def test_large_file_redirected_to_a_cdn_without_the_token(entry, server, monkeypatch):
    """As on huggingface.co: the resolve answer is a redirect carrying X-Linked-Etag and X-Linked-Size; the bytes
    come from another host, which never sees the token."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.token = "hf_secret"
    with running_hub() as cdn:
        cdn.blobs = server.blobs
        server.cdn_url = cdn.url
        assert cache.resolve_weights(NAME, progress=False).read_bytes() == DATA
    assert [r.method for r in server.requests] == ["HEAD"]
    assert [(r.method, r.path, r.authorization) for r in cdn.requests] == [("GET", f"/cdn/{SHA}", None)]


def test_a_server_that_is_no_hub_is_named(entry, tmp_path, monkeypatch):
    """A plain file server (no X-Repo-Commit, no ETag) with the file at the right path is still refused: it is
    not a hub mirror, and the message says so."""
    root = tmp_path / "plain"
    (root / resolve_path(NAME).lstrip("/")).parent.mkdir(parents=True)
    (root / resolve_path(NAME).lstrip("/")).write_bytes(DATA)
    plain = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        with pytest.raises(WeightsNotFoundError, match="does not answer as a Hugging Face hub"):
            cache.resolve_weights(NAME, base_url=f"http://127.0.0.1:{plain.server_address[1]}", progress=False)
    finally:
        plain.shutdown()
        plain.server_close()


def _resolve_in_child() -> None:
    cache.resolve_weights(NAME, progress=False)


def test_killed_download_leaves_nothing_after_the_next_run(entry, server, env):
    """huggingface_hub writes to a temporary name unique to the process and cannot delete it when killed; the next
    run deletes it (under ornis's lock, so nobody is writing it) and downloads the file whole."""
    server.delay_per_chunk = 0.05
    child = multiprocessing.get_context("fork").Process(target=_resolve_in_child)
    child.start()
    deadline = time.monotonic() + 30
    while server.bytes_sent < 256 * 1024 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    blobs = env / "hub" / f"models--birder-project--{NAME}" / "blobs"
    assert [p.name.split(".")[0] for p in blobs.iterdir()] == [SHA]  # the killed download's partial file
    server.delay_per_chunk = 0.0
    assert cache.resolve_weights(NAME, progress=False).read_bytes() == DATA
    assert list(blobs.iterdir()) == []
    assert server.gets()[-1][1] is None  # not resumed: a fresh transfer


def _fill_hub_cache(server: LoopbackHub, env: Path) -> Path:
    """What ``hf download birder-project/<name> <name>.pt --cache-dir $ORNIS_CACHE/hub`` leaves behind."""
    return Path(
        huggingface_hub.hf_hub_download(REPO, f"{NAME}.pt", endpoint=server.url, cache_dir=env / "hub")
    ).resolve()


def test_copy_in_the_hub_cache_is_used_offline(entry, server, env, monkeypatch):
    blob = _fill_hub_cache(server, env)
    requests = len(server.requests)
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    path = cache.resolve_weights(NAME, progress=False)
    assert path == env / "weights" / f"{NAME}.pt" and path.read_bytes() == DATA
    assert not blob.exists() and len(server.requests) == requests


def test_wrong_copy_in_the_hub_cache_is_deleted_then_fetched(entry, server, env, monkeypatch):
    blob = _fill_hub_cache(server, env)
    blob.write_bytes(b"\0" * len(DATA))  # damaged on disk, same size
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="offline mode is on"):
        cache.resolve_weights(NAME, progress=False)
    assert not blob.exists()  # refused, and gone: nothing can load it
    monkeypatch.setenv("ORNIS_OFFLINE", "0")
    assert cache.resolve_weights(NAME, progress=False).read_bytes() == DATA
    assert len(server.gets()) == 2


def test_offline_argument_beats_the_environment(entry, server, env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match=r"offline mode is on \(HF_HUB_OFFLINE\)"):
        cache.resolve_weights(NAME, progress=False)
    with pytest.raises(WeightsNotFoundError, match=r"offline mode is on \(offline=True\)"):
        cache.resolve_weights(NAME, offline=True, progress=False)
    assert server.requests == []
