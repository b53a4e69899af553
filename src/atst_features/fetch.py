"""The network: official files over HTTP (gdown) and converted files from the Hugging Face Hub.

Thin wrappers that put files on disk and say where: ``download_url`` for an official file (Google
Drive's confirmation page, progress bar, resume), ``hub_file`` / ``hub_snapshot`` for the Hub at a
revision, in the Hugging Face cache (``hub_cache``), with ``check_lfs_blobs`` to check a snapshot
against its blob names. ``offline()`` says whether downloads are forbidden. Nothing here builds a
model; gdown, requests and huggingface_hub are imported when used.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .artifacts import check_sha256

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class DownloadError(RuntimeError):
    """A named model that is not cached and cannot be fetched (offline, no network, server error)."""


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


# ---------------------------------------------------------------------------- official files


def download_url(url: str, dest: Path, progress: bool) -> None:
    """Download ``url`` to ``dest`` with gdown (Google Drive confirmation, tqdm progress, resume).

    gdown writes to a temporary file beside ``dest`` and moves it into place when complete, so
    ``dest`` is never a partial file. ``dest``'s folder holds nothing else: any other file there is
    a partial download, which is resumed; if resuming fails (a server that ignores byte ranges,
    a stale partial) the folder is emptied and the download starts over.

    Raises:
        DownloadError: gdown returned no file; network errors propagate as raised.
    """
    import gdown

    folder = dest.parent
    folder.mkdir(parents=True, exist_ok=True)

    def attempt() -> None:
        got = gdown.download(url, str(dest), quiet=not progress, resume=True)
        if got is None or not dest.is_file():
            raise DownloadError(f"gdown returned no file for {url}")

    if any(p != dest for p in folder.iterdir()):
        try:
            attempt()
            return
        except Exception as e:
            if _transient(e):  # keep the partial file for the next attempt
                raise
            shutil.rmtree(folder)
            folder.mkdir(parents=True)
    attempt()


def _transient(error: BaseException) -> bool:
    """A network failure (connection, timeout, cut transfer), after which a partial file is worth keeping."""
    import requests

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError)
    return isinstance(error, kinds) or isinstance(error.__cause__, kinds)


# ---------------------------------------------------------------------------- the Hub


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
        )
    )


def hub_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    """The files of a Hub repository that match ``allow_patterns``, at ``revision`` (``None``: main),
    from the Hugging Face cache or the Hub (only the cache when ``offline()``). Errors propagate as raised."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=allow_patterns,
        cache_dir=hub_cache(),
        local_files_only=offline(),
    )
    return Path(folder)


def hub_is_cached(repo_id: str, files: list[str], revision: str) -> bool:
    """Whether every one of ``files`` of the repository at ``revision`` is in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return all(
        isinstance(try_to_load_from_cache(repo_id, f, revision=revision, cache_dir=hub_cache()), str) for f in files
    )


def check_lfs_blobs(folder: Path) -> None:
    """Check the files of a Hub snapshot against their blob names: LFS blobs are named by their sha256.

    Raises:
        IntegrityError: naming the blob, when one differs from its name.
    """
    for path in sorted(folder.iterdir()):
        if not path.is_symlink():
            continue
        blob = path.resolve()
        if blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):
            check_sha256(
                blob,
                blob.name,
                f"Delete the cached repository ({str(blob.parent.parent)!r}) and load again to fetch it anew.",
            )
