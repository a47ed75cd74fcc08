"""Where published weights live on the Hugging Face hub, and how ornis's settings map onto ``huggingface_hub``'s.

A published file is ``{endpoint}/{repo_id}/resolve/{revision}/{filename}``, for example
``https://huggingface.co/birder-project/hieradet_small_sam2_1/resolve/main/hieradet_small_sam2_1.pt``.

=================================  =====================================================================================
ornis                              huggingface_hub
=================================  =====================================================================================
``ORNIS_BASE_URL``, ``--base-url``  ``endpoint=`` (a hub mirror). A full ``<endpoint>/<org>/<repo>/resolve/<revision>``
                                   base (``{name}`` filled in) also names the repository and revision.
(unset)                            ``HF_ENDPOINT`` for weights published on huggingface.co, else the entry's own base.
``ORNIS_OFFLINE=1``                no network, as ``HF_HUB_OFFLINE=1`` (either one turns it on).
``ORNIS_CACHE``                    ``<ORNIS_CACHE>/hub`` is ``cache_dir=`` (downloads, resume, locks);
                                   ``<ORNIS_CACHE>/weights`` holds the files ornis loads, each checked first.
(none)                             ``HF_TOKEN`` or ``hf auth login``: the token for a private repository or mirror.
=================================  =====================================================================================
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ornis.errors import WeightsNotFoundError, first_line
from ornis.weights.manifest import DEFAULT_FILE_FORMAT, HF_BASE, PretrainedWeights

HF_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
HF_ORGANISATION = "birder-project"
URL_SCHEMES = ("http", "https")
# "<endpoint>/<org>/<repo>/resolve/<revision>": the endpoint may carry a path (a mirror under a prefix)
_RESOLVE = re.compile(r"^(?P<endpoint>.+?)/(?P<repo_id>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/?$")
# A server that refuses the connection, or a host name that does not resolve, is not coming back in a few seconds:
# one quick second try (a server restarting), then the error; huggingface_hub would back off for ~23 s first
UNREACHABLE_ATTEMPTS = 2
UNREACHABLE_WAIT_S = 0.5
PROBE_TIMEOUT_S = 10.0
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository at a revision, as ``hf_hub_download`` is asked for it."""

    endpoint: str
    repo_id: str
    revision: str
    filename: str

    @property
    def base(self) -> str:
        """``{endpoint}/{repo_id}/resolve/{revision}``: the folder the file is resolved in."""
        return f"{self.endpoint}/{self.repo_id}/resolve/{self.revision}"

    @property
    def url(self) -> str:
        """The file's resolve URL."""
        return f"{self.base}/{self.filename}"

    def folder_in(self, hub_cache: Path) -> Path:
        """The repository's folder in huggingface_hub's cache ``hub_cache`` (``models--<org>--<repo>``)."""
        return Path(hub_cache) / f"models--{self.repo_id.replace('/', '--')}"


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def offline_setting() -> str | None:
    """The variable that turns offline mode on (``ORNIS_OFFLINE`` or ``HF_HUB_OFFLINE``), or None."""
    return next((v for v in ("ORNIS_OFFLINE", "HF_HUB_OFFLINE") if env_flag(v)), None)


def _split(base: str) -> tuple[str, str | None, str | None]:
    """``(endpoint, repo_id, revision)`` of a resolve base, or ``(base, None, None)`` for a bare endpoint."""
    base = base.rstrip("/")
    m = _RESOLVE.match(base)
    return (m["endpoint"], m["repo_id"], m["revision"]) if m else (base, None, None)


def locate(weights: PretrainedWeights, file_format: str = DEFAULT_FILE_FORMAT, base_url: str | None = None) -> HubFile:
    """Where ``weights``' file is fetched from: the mirror (``base_url``, else ``ORNIS_BASE_URL``), else
    ``HF_ENDPOINT`` for weights on huggingface.co, else the entry's own base."""
    endpoint, repo_id, revision = _split(weights.base_url or HF_BASE.format(name=weights.name))
    mirror = base_url or os.environ.get("ORNIS_BASE_URL")
    if mirror:
        endpoint, mirror_repo, mirror_revision = _split(mirror.replace("{name}", weights.name))
        repo_id, revision = mirror_repo or repo_id, mirror_revision or revision
    elif endpoint == HF_ENDPOINT and os.environ.get("HF_ENDPOINT"):
        endpoint = os.environ["HF_ENDPOINT"].rstrip("/")
    return HubFile(
        endpoint,
        repo_id or f"{HF_ORGANISATION}/{weights.name}",
        revision or DEFAULT_REVISION,
        weights.file_name(file_format),
    )


def check_url(url: str) -> None:
    """``WeightsNotFoundError`` at once, before any connection, unless ``url`` is a URL a download can use (http or
    https, with a host, a numeric port, no spaces): a malformed mirror is a typo, not a network failure to retry."""
    why = None
    try:
        parts = urllib.parse.urlsplit(url)
        _port = parts.port  # ValueError for a port that is not a number in range
    except ValueError as e:
        why = str(e)
    else:
        if parts.scheme not in URL_SCHEMES:
            found = f"{parts.scheme!r}" if parts.scheme else "none"
            why = f"the scheme is {found}, expected one of {', '.join(URL_SCHEMES)}"
        elif not parts.hostname:
            why = "it names no host"
        elif any(c.isspace() or ord(c) < 32 for c in url):
            why = "it contains spaces or control characters"
    if why is not None:
        raise WeightsNotFoundError(
            f"{url!r} is not a valid download URL ({why}); check --base-url / base_url= / ORNIS_BASE_URL"
        )


def unreachable(endpoint: str) -> str | None:
    """Why nobody answers at ``endpoint``'s host and port (refused, unknown host, no route: after one quick second
    try), or None when a connection opens or the failure may pass (a timeout: huggingface_hub retries those). Not
    asked when a proxy carries the traffic: the host itself may well be out of direct reach then."""
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    if proxies.get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return None
    for attempt in range(1, UNREACHABLE_ATTEMPTS + 1):
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            return None
        except OSError as e:
            if not (isinstance(e, ConnectionRefusedError | socket.gaierror) or e.errno in _UNREACHABLE_ERRNOS):
                return None
            reason = f"cannot connect to {host}:{port} ({e}); gave up after {attempt} attempts"
        if attempt < UNREACHABLE_ATTEMPTS:
            time.sleep(UNREACHABLE_WAIT_S)
    return reason


def hub_failure(e: BaseException, source: HubFile) -> str:
    """One line on why ``hf_hub_download`` could not fetch ``source``, from the error it raised."""
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:
        e = e.__cause__  # "cannot find the file in the local cache" wraps the real reason
    status = getattr(getattr(e, "response", None), "status_code", None)
    http = f"HTTP {status}: " if status else ""
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    if isinstance(e, GatedRepoError):
        return f"{http}{source.repo_id} is gated: accept its terms on the hub, then {login}"
    if isinstance(e, RepositoryNotFoundError):
        return f"{http}no repository {source.repo_id} at {source.endpoint} (if it is private, {login})"
    if isinstance(e, RevisionNotFoundError):
        return f"{http}no revision {source.revision!r} in {source.repo_id}"
    if isinstance(e, RemoteEntryNotFoundError):
        return f"{http}{source.repo_id} has no file {source.filename} at {source.revision!r}"
    if isinstance(e, FileMetadataError):
        return (
            "the server does not answer as a Hugging Face hub (no X-Repo-Commit or ETag header); ORNIS_BASE_URL and "
            "HF_ENDPOINT must name a hub or a hub mirror"
        )
    if isinstance(e, HfHubHTTPError) and status:
        return f"HTTP {status} ({first_line(e, 120)})"
    return f"{type(e).__name__}: {first_line(e)}"
