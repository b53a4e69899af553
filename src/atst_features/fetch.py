"""The network: official files over HTTP (gdown) and converted files from the Hugging Face Hub.

Thin wrappers that put files on disk and say where. ``download_url`` fetches one official file
(Google Drive's confirmation page, progress bar, resume) with connect and read timeouts,
retries, a stall timeout (a server that sends too little for too long is given up), a byte limit
(an endless body), and a refusal of HTML pages (Google Drive's quota page); it returns the file's
sha256. ``hub_file`` / ``hub_snapshot`` read the Hub at a revision, in the Hugging Face cache
(``hub_cache``), with ``check_blobs`` to check a snapshot against its content-addressed blob
names; ``parse_hub_spec`` checks an ``hf://`` spec first. ``offline()`` says whether downloads
are forbidden. Nothing here builds a model; gdown, requests and huggingface_hub are imported
when used.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

from .artifacts import check_sha256
from .errors import DownloadError, IntegrityError, LoadArgumentError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "ON", "YES", "TRUE"}

CONNECT_TIMEOUT_S = 20.0  # to open a connection
READ_TIMEOUT_S = 60.0  # between two reads of the answer
STALL_TIMEOUT_S = 180.0  # longest wait for the next 512 KiB (gdown's chunk): ~3 kB/s, slower is given up
RETRIES = 3  # further attempts after a network failure, each resuming the transfer
MAX_BYTES = 4 << 30  # the most any download may send when its size is not pinned (4 GiB)
HTML_SNIFF_BYTES = 1024


class TransferError(DownloadError):
    """A transfer that failed; ``resumable`` is True when the bytes received so far are worth keeping
    (the connection broke mid-file), False when the server refused or sent something else;
    ``restart`` is True when a resume was refused (a server that ignores byte ranges): start over."""

    def __init__(self, message: str, resumable: bool = False, restart: bool = False):
        super().__init__(message)
        self.resumable = resumable
        self.restart = restart


def offline() -> bool:
    """True when downloads are forbidden: ``HF_HUB_OFFLINE`` is set (read now, not at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str | None:
    """The Hugging Face cache as the environment names it now (``HF_HUB_CACHE``, else ``HF_HOME``/hub);
    ``None`` leaves the choice to huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def host_of(url: str) -> str:
    """The host (and port) a URL points to, for messages."""
    return urlparse(url).netloc or url


def human_size(n: int | None) -> str:
    """``1459523813`` -> ``"1.46 GB"`` (``"size unknown"`` for ``None``)."""
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------- official files


def _is_drive(url: str) -> bool:
    return host_of(url) in ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")


def looks_like_html(head: bytes) -> bool:
    """Whether the first bytes of a body are an HTML page (checkpoints are zip, pickle or safetensors)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html")) or (text.startswith(b"<") and b"<html" in text)


def _refused_as_html(url: str) -> str:
    if _is_drive(url):
        return (
            "Google Drive refused the download (quota or permission page) — it sent an HTML page instead of the file. "
            "Drive limits downloads of popular files per day: try again later, or download the file in a browser"
        )
    return f"{host_of(url)} sent an HTML page instead of the file (an error, login or quota page)"


class _Hasher:
    """gdown's ``hasher``: the sha256 of every byte written, refusing HTML pages and bodies over ``limit``."""

    def __init__(self, url: str, limit: int):
        self.url, self.limit = url, limit
        self.sha = hashlib.sha256()
        self.head = b""
        self.count = 0

    def update(self, chunk: bytes) -> None:
        self.count += len(chunk)
        if self.count > self.limit:
            raise TransferError(f"{host_of(self.url)} sent more than {self.limit} bytes, more than the file has; stopped")
        if len(self.head) < HTML_SNIFF_BYTES:
            self.head += chunk[: HTML_SNIFF_BYTES - len(self.head)]
            if looks_like_html(self.head):
                raise TransferError(_refused_as_html(self.url))
        self.sha.update(chunk)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class _Progress:
    """gdown's ``progress`` callback: a tqdm bar, and the time of the last chunk for the stall watchdog."""

    def __init__(self, show: bool, total: int | None):
        self.last = time.monotonic()
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr)

    def __call__(self, done: int, total: int | None) -> None:
        self.last = time.monotonic()
        if self.bar is not None:
            if self.bar.total is None and total is not None:
                self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _watch(progress: _Progress, cancel: threading.Event, done: threading.Event, stalled: list) -> None:
    """Set ``cancel`` when no chunk arrived for ``STALL_TIMEOUT_S`` (a slow-drip or silent server)."""
    while not done.wait(0.05):
        if time.monotonic() - progress.last > STALL_TIMEOUT_S:
            stalled.append(True)
            cancel.set()
            return


def _explain(error: BaseException, url: str) -> TransferError:
    """A failed transfer as one line saying what happened, and whether its partial file is worth keeping."""
    import gdown.exceptions
    import requests

    if isinstance(error, TransferError):
        return error
    host = host_of(url)
    if isinstance(error, gdown.exceptions.FileURLRetrievalError):
        reason = " ".join(str(error).split())
        return TransferError(
            "Google Drive refused the download (quota or permission page) — "
            f"{reason[:300]}. Drive limits downloads of popular files per day: try again later, or download the file "
            "in a browser"
        )
    if isinstance(error, requests.exceptions.HTTPError) and error.response is not None:
        return TransferError(f"{host} answered HTTP {error.response.status_code} {error.response.reason}")
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, requests.exceptions.RequestException):
        cause = cause.__cause__
    if isinstance(cause, requests.exceptions.ConnectTimeout):
        return TransferError(f"{host} did not accept a connection within {CONNECT_TIMEOUT_S:g} s")
    if isinstance(cause, requests.exceptions.Timeout):
        return TransferError(f"{host} sent nothing for {READ_TIMEOUT_S:g} s", resumable=True)
    if isinstance(cause, requests.exceptions.ConnectionError):
        reason = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(cause))
        refused = reason is not None and ("refused" in reason[1] or "known" in reason[1] or "resolution" in reason[1])
        return TransferError(f"cannot reach {host}: {reason[1] if reason else _first_line(cause)[:200]}", resumable=not refused)
    if isinstance(error, gdown.exceptions.DownloadError):
        text = _first_line(error)
        if "byte range" in text:
            return TransferError(f"{host} cannot resume the transfer (it ignores byte ranges)", restart=True)
        return TransferError(f"the transfer from {host} broke off: {text}", resumable="incomplete" in text)
    return TransferError(f"the transfer from {host} failed: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def download_url(
    url: str,
    dest: Path,
    progress: bool,
    *,
    size: int | None = None,
    resume: bool = False,
) -> str:
    """Download ``url`` to ``dest`` with gdown; returns the file's sha256.

    gdown writes to a temporary ``.part`` file beside ``dest`` and moves it into place when
    complete, so ``dest`` is never a partial file. Every connection has a connect and a read
    timeout (``CONNECT_TIMEOUT_S``, ``READ_TIMEOUT_S``) and is retried ``RETRIES`` times, resuming
    where it broke; a transfer that delivers less than 512 KiB in ``STALL_TIMEOUT_S`` is given up.
    The body may not exceed ``size`` (when known) or ``MAX_BYTES``, and may not be an HTML page.

    Args:
        url: the file (a Google Drive ``uc?id=`` URL or any HTTP(S) URL).
        dest: where the complete file goes; its folder holds nothing but this download.
        progress: show a progress bar.
        size: the pinned size in bytes, when known.
        resume: continue a ``.part`` file left in ``dest``'s folder by an earlier attempt (only
            safe when the result is checked against a pinned sha256).

    Raises:
        TransferError: what went wrong in one line; ``resumable`` says whether the partial file is
            worth keeping for a resume. The caller removes what it does not keep.
    """
    import gdown

    dest.parent.mkdir(parents=True, exist_ok=True)
    hasher = _Hasher(url, size if size is not None else MAX_BYTES)
    meter = _Progress(progress, size)
    cancel, done, stalled = threading.Event(), threading.Event(), []
    watchdog = threading.Thread(target=_watch, args=(meter, cancel, done, stalled), daemon=True)
    watchdog.start()
    try:
        got = gdown.download(
            url,
            str(dest),
            quiet=True,
            resume=resume,
            progress=meter,
            hasher=hasher,
            timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            retries=RETRIES,
            cancel=cancel,
        )
    except BaseException as e:
        if stalled:
            raise TransferError(
                f"{host_of(url)} sent less than 512 KiB in {STALL_TIMEOUT_S:g} s; the transfer was given up", resumable=True
            ) from None
        if not isinstance(e, Exception):
            raise
        raise _explain(e, url) from None
    finally:
        done.set()
        watchdog.join()
        meter.close()
    if got is None or not dest.is_file():
        raise TransferError(f"gdown returned no file for {url}")
    if hasher.count == 0 or looks_like_html(hasher.head):  # an empty body, or a page shorter than the sniff
        dest.unlink(missing_ok=True)
        raise TransferError(_refused_as_html(url) if hasher.count else f"{host_of(url)} sent an empty file")
    return hasher.hexdigest()


def partial_files(folder: Path) -> list[Path]:
    """gdown's partial downloads (``*.part``) in ``folder``."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(".part")) if folder.is_dir() else []


# ---------------------------------------------------------------------------- the Hub

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def parse_hub_spec(spec: str, scheme: str = "hf://") -> tuple[str, str]:
    """``hf://org/repo[@revision]`` -> (repo_id, revision).

    The revision should be a 40-hex commit; a branch or tag name (``main`` when none is given) is
    accepted with a warning that it can move. A repository or revision that could name a path
    (``..``, a leading ``/``) is refused.

    Raises:
        LoadArgumentError: the spec is malformed.
    """
    repo, at, revision = spec[len(scheme) :].partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise LoadArgumentError(f"{spec!r}: the repository must be ORG/NAME (letters, digits, '.', '_', '-')")
    if at and not revision:
        raise LoadArgumentError(f"{spec!r}: nothing after '@'; give a 40-hex commit")
    revision = revision or "main"
    if _SHA1.fullmatch(revision):
        return repo, revision
    if ".." in revision or revision.startswith("/") or not _REF.fullmatch(revision) or revision.endswith("/"):
        raise LoadArgumentError(f"{spec!r}: {revision!r} is neither a 40-hex commit nor a branch or tag name")
    warnings.warn(
        f"{spec!r} names the branch or tag {revision!r}, which can move: the weights may change from one load to the "
        "next. Pin a 40-hex commit (hf://ORG/NAME@COMMIT) for reproducible results.",
        stacklevel=3,
    )
    return repo, revision


def hub_file(repo_id: str, filename: str, revision: str, force: bool = False) -> Path:
    """One file of a Hub repository at ``revision``, from the Hugging Face cache or the Hub
    (only the cache when ``offline()``); ``force`` downloads it again. Errors propagate as raised."""
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=hub_cache(),
            local_files_only=offline(),
            force_download=force,
            etag_timeout=CONNECT_TIMEOUT_S,
        )
    )


def hub_snapshot(repo_id: str, revision: str, allow_patterns: list[str]) -> Path:
    """The files of a Hub repository that match ``allow_patterns``, at ``revision``, from the
    Hugging Face cache or the Hub (only the cache when ``offline()``). Errors propagate as raised."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=allow_patterns,
        cache_dir=hub_cache(),
        local_files_only=offline(),
        etag_timeout=CONNECT_TIMEOUT_S,
    )
    return Path(folder)


def hub_is_cached(repo_id: str, files: list[str], revision: str) -> bool:
    """Whether every one of ``files`` of the repository at ``revision`` is in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return all(
        isinstance(try_to_load_from_cache(repo_id, f, revision=revision, cache_dir=hub_cache()), str) for f in files
    )


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_blobs(folder: Path, names: list[str]) -> bool:
    """Check the files ``names`` of a Hub snapshot against their content-addressed blob names: LFS
    blobs are named by their sha256, small files by their git blob sha1. Returns whether every
    one present was checked (False: some file is not a link to a named blob, so unverified).

    Raises:
        IntegrityError: naming the blob, when one differs from its name.
    """
    way_out = f"Delete the cached repository ({str(folder.parent.parent)!r}) and load again to fetch it anew."
    checked = True
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        blob = path.resolve()
        if not path.is_symlink() or blob.parent.name != "blobs":
            checked = False
        elif _SHA256.fullmatch(blob.name):
            check_sha256(blob, blob.name, way_out)
        elif _SHA1.fullmatch(blob.name):
            actual = _git_blob_sha1(blob)
            if actual != blob.name:
                raise IntegrityError(
                    f"{str(blob)!r} has git blob hash {actual}, but is named {blob.name}: the file was changed or "
                    f"damaged. {way_out}"
                )
        else:
            checked = False
    return checked
