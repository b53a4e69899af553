"""Where weights come from: a converted directory, an official checkpoint file, the Hub, or a name.

A converted model is a directory with ``config.json`` (an ``ATSTConfig``), ``model.safetensors``
(our parameter names), for fine-tuned checkpoints with a classifier ``head.safetensors`` (and
``labels.json`` when the class names are known), and ``checksums.json`` (the sha256 of each of
these files and where they came from). Official files are turned into that by ``convert.py``.

Named models (``weights_manifest.json``) resolve to, in this order,

- their converted copy in the cache (``cache_dir()/NAME``), when present;
- the converted files on the Hugging Face Hub, at the pinned revision, when the manifest lists them;
- otherwise the official file at its source URL (Google Drive through gdown, which handles Drive's
  confirmation page), downloaded once with a progress bar into a temporary file, checked,
  converted, and cached as a converted directory.

Downloaded files are checked against the manifest's trusted sha256 (when it has one); converted
files against the sha256 recorded when they were written, on every load. A mismatch is an error.
Once cached, a model loads without the network (``HF_HUB_OFFLINE=1`` forbids downloads).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import convert, heads
from .embed import ATSTModel, resolve_device, resolve_dtype
from .model import ATSTConfig, ATSTEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"
HEAD_NAME = heads.HEAD_NAME
LABELS_NAME = heads.LABELS_NAME
MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")
HF_SCHEME = "hf://"
CACHE_ENV = "ATST_FEATURES_CACHE"
HASH_CHUNK = 1 << 22  # bytes read at a time when hashing (4 MiB)
# The config fields that define the architecture: a converted file must match its manifest entry on these.
ARCH_FIELDS = ("family", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
ARCH_FIELDS += ("n_mels", "patch_h", "patch_w", "spec_w")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class IntegrityError(RuntimeError):
    """A file whose sha256 is not the one recorded for it."""


class DownloadError(RuntimeError):
    """A named model that is not cached and cannot be fetched (offline, no network, server error)."""


# ---------------------------------------------------------------------------- the manifest


def manifest(path: str | os.PathLike | Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The registry of published checkpoints, keyed by name.

    Args:
        path: a manifest file (``{"models": [...]}``), such a dict already loaded, or ``None`` for
            the manifest shipped with the package (``weights_manifest.json``).
    """
    return _read_manifest(path)


def _read_manifest(path: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, dict]:
    if isinstance(path, Mapping):
        data = path
    else:
        with open(MANIFEST_PATH if path is None else path, encoding="utf-8") as f:
            data = json.load(f)
    return {entry["name"]: entry for entry in data["models"]}


def list_models(manifest_path: str | os.PathLike | Mapping[str, Any] | None = None) -> list[str]:
    """Names of the published checkpoints that ``load`` accepts."""
    return sorted(_read_manifest(manifest_path))


def _entry(name: str, source: str | os.PathLike | Mapping[str, Any] | None) -> dict:
    entries = _read_manifest(source)
    if name not in entries:
        raise KeyError(f"{name!r} is not a known model; known names: {', '.join(sorted(entries))}")
    return entries[name]


def hub_published(entry: Mapping[str, Any]) -> bool:
    """Whether a manifest entry lists converted files on the Hub (repository, pinned revision, files)."""
    hub = entry.get("hub") or {}
    return bool(hub.get("repo_id") and hub.get("revision") and hub.get("files"))


# ---------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, as 64 lowercase hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file beside it (named by process) and ``os.replace``,
    so readers and concurrent writers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_sha256(path: Path, expected: str, way_out: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(
            f"{str(path)!r} has sha256 {actual}, but {expected} is recorded for it: the file was changed or damaged. "
            f"{way_out}"
        )


def verify_directory(directory: str | os.PathLike, way_out: str | None = None) -> bool:
    """Check every file listed in ``directory/checksums.json``; returns False when there is no such list.

    ``way_out`` is the advice that ends the error message (how to get an intact copy).

    Raises:
        IntegrityError: naming the file and both hashes, when a file differs from its record.
    """
    directory = Path(directory)
    record = directory / CHECKSUMS_NAME
    if not record.is_file():
        return False
    files = json.loads(record.read_text(encoding="utf-8"))["files"]
    for fname, expected in files.items():
        if not (directory / fname).is_file():
            raise IntegrityError(f"{str(directory / fname)!r} is listed in {CHECKSUMS_NAME} but missing")
        _check_sha256(directory / fname, expected, way_out or "Convert the official file again.")
    return True


# ---------------------------------------------------------------------------- reading official files


def _pickle_allow_list() -> list:
    """The plain globals official ATST pickles contain, allowed on top of torch's own.

    ``argparse.Namespace`` (the DINO-style file's ``args``) and NumPy scalars, dtypes and arrays
    (hyperparameters logged as NumPy numbers), under their NumPy 1.x and 2.x module names.
    """
    import argparse

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    allowed: list = [argparse.Namespace, np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        obj = getattr(core.multiarray, name)
        allowed += [(obj, f"numpy.core.multiarray.{name}"), (obj, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [(cls, f"numpy.dtypes.{n}") for n, cls in vars(dtypes).items() if isinstance(cls, type)]
    return allowed


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read an official checkpoint (a torch pickle or a safetensors file) without running arbitrary code.

    Torch pickles are read with ``weights_only=True`` plus an allow-list of the few plain globals
    the official files contain (``argparse.Namespace``, NumPy scalars, dtypes and arrays), and
    memory-mapped when the file allows it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if not hasattr(torch.serialization, "safe_globals"):
        raise convert.CheckpointError(
            "reading official ATST pickles safely needs torch.serialization.safe_globals; upgrade torch to 2.5 or newer"
        )
    try:
        with torch.serialization.safe_globals(_pickle_allow_list()):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler names the global that is not allowed
        raise convert.CheckpointError(
            f"cannot read {str(path)!r} as an ATST checkpoint: {e}\nOnly plain data is read from checkpoint files. "
            "If you trust this file and it needs more, load it yourself with torch.load and pass the dict to "
            "atst_features.convert.convert()."
        ) from None


def official_to_converted(
    ckpt: dict, family: str | None = None, num_heads: int | None = None
) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """A loaded official checkpoint (any supported layout) -> (config, our encoder state dict)."""
    converted = convert.convert(ckpt, family=family, num_heads=num_heads)
    return converted.config, converted.state_dict


# ---------------------------------------------------------------------------- writing converted models


def _write_checksums(directory: Path, files: list[str], source: dict | None) -> None:
    record = {"files": {f: sha256_file(directory / f) for f in files}, "source": source}
    write_text_atomic(directory / CHECKSUMS_NAME, json.dumps(record, indent=2) + "\n")


def save_converted(
    cfg: ATSTConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    head: dict[str, torch.Tensor] | None = None,
    head_level: str | None = None,
    labels: list[str] | None = None,
    multilabel: bool = True,
    source: dict | None = None,
) -> Path:
    """Write a converted model directory (created); returns it.

    Files: ``config.json``, ``model.safetensors``, with a head ``head.safetensors`` (+ ``labels.json``
    when ``labels`` are given), and last ``checksums.json`` (sha256 of each, plus ``source``, a
    dict describing where the weights came from). Each file is written to a temporary name first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    write_text_atomic(out / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
    files = [CONFIG_NAME, WEIGHTS_NAME]
    for stale, present in ((HEAD_NAME, head is not None), (LABELS_NAME, labels is not None)):
        if not present and (out / stale).is_file():  # left by an earlier conversion into this directory
            (out / stale).unlink()
    if head is not None:
        files += heads.save_head(head, head_level or "clip", out, labels, multilabel)
    _write_checksums(out, files, source)
    return out


def _source_record(path: Path, converted: convert.Converted, **extra) -> dict:
    return {
        "file": path.name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
        "layout": converted.layout,
        **extra,
    }


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    family: str | None = None,
    num_heads: int | None = None,
    *,
    head_level: str | None = None,
    labels: str | os.PathLike | list[str] | None = None,
) -> Path:
    """Convert an official ATST checkpoint file to a model directory that ``load`` reads offline.

    Args:
        src: the official file (.ckpt / .pth / .safetensors), any layout of ``convert.LAYOUTS``.
        out_dir: directory to write (created): ``config.json``, ``model.safetensors``, for
            fine-tuned files with a classifier ``head.safetensors`` (+ ``labels.json``), and
            ``checksums.json``.
        family: "clip" or "frame"; inferred from the keys when omitted.
        num_heads: attention heads; inferred from the checkpoint's arch or width when omitted.
        head_level: "clip" or "frame" for a classification head; inferred when omitted.
        labels: the head's class names in score order: a list, a JSON list file or a text file
            with one name per line.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    src = Path(src)
    converted = convert.convert(read_checkpoint(src), family=family, num_heads=num_heads, head_level=head_level)
    return write_converted(converted, src, out_dir, labels)


def write_converted(
    converted: convert.Converted,
    src: Path,
    out_dir: str | os.PathLike,
    labels: str | os.PathLike | list[str] | None = None,
    **provenance,
) -> Path:
    """Write ``convert.convert``'s result for the official file ``src`` as a model directory.

    ``labels``: the head's class names (a list or a labels file); ``provenance``: extra fields of
    the ``source`` record in ``checksums.json`` (e.g. the manifest name and URL).
    """
    if labels is None:
        labels = converted.labels
    elif not isinstance(labels, list):
        labels = heads.read_labels(labels)
    if labels is not None and converted.head is None:
        raise ValueError("labels were given, but the checkpoint has no classification head")
    return save_converted(
        converted.config,
        converted.state_dict,
        out_dir,
        head=converted.head,
        head_level=converted.head_level,
        labels=labels,
        multilabel=converted.multilabel,
        source=_source_record(src, converted, **provenance),
    )


# ---------------------------------------------------------------------------- building models


def build(
    cfg: ATSTConfig,
    state_dict: dict[str, torch.Tensor],
    name: str | None = None,
    head: heads.ClassificationHead | None = None,
) -> ATSTModel:
    """An ``ATSTModel`` from a config and our state dict (strict load), with an optional head."""
    encoder = ATSTEncoder(cfg)
    encoder.load_state_dict(state_dict, strict=True)
    model = ATSTModel(encoder, name=name)
    if head is not None:
        expected = (2 * cfg.embed_dim) if (head.level == "clip" and cfg.has_cls) else cfg.embed_dim
        if head.in_dim != expected:
            raise ValueError(
                f"the {head.level}-level head takes {head.in_dim} inputs, but the last block of this "
                f"ATST-{cfg.family.capitalize()} encoder gives {expected}"
            )
        model.head = head.eval()
    return model


def load_converted(directory: str | os.PathLike, verify: bool = True) -> ATSTModel:
    """Load a converted model directory (``config.json`` + ``model.safetensors`` [+ head files]).

    With ``verify`` the files listed in its ``checksums.json`` (when present) are checked first.
    """
    directory = Path(directory)
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / fname).is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} has no {fname}; a converted model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    if verify:
        verify_directory(directory)
    cfg = ATSTConfig.from_json(directory / CONFIG_NAME)
    return build(cfg, load_file(str(directory / WEIGHTS_NAME)), name=str(directory), head=heads.load_head(directory))


def _load_file(path: Path) -> ATSTModel:
    """An official checkpoint file, converted in memory (nothing is written)."""
    if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
        return load_converted(path.parent)
    c = convert.convert(read_checkpoint(path))
    head = (
        heads.ClassificationHead.from_state_dict(c.head, c.head_level, c.labels, c.multilabel)
        if c.head is not None
        else None
    )
    return build(c.config, c.state_dict, name=str(path), head=head)


# ---------------------------------------------------------------------------- the Hub


def offline() -> bool:
    """True when downloads are forbidden: ``HF_HUB_OFFLINE`` is set (read now, not at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str | None:
    """The Hugging Face cache as the environment names it now (``HF_HUB_CACHE``, else ``HF_HOME``/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _check_lfs_blobs(folder: Path) -> None:
    """Check files of a Hub snapshot against their blob names: LFS blobs are named by their sha256."""
    for path in sorted(folder.iterdir()):
        if not path.is_symlink():
            continue
        blob = path.resolve()
        if blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):
            _check_sha256(
                blob,
                blob.name,
                f"Delete the cached repository ({str(blob.parent.parent)!r}) and load again to fetch it anew.",
            )


def _load_hub(spec: str) -> ATSTModel:
    """``hf://org/repo[@revision]`` -> the converted model stored in that Hub repository."""
    from huggingface_hub import snapshot_download

    repo, _, revision = spec[len(HF_SCHEME) :].partition("@")
    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME, LABELS_NAME, CHECKSUMS_NAME],
            cache_dir=_hub_cache(),
            local_files_only=offline(),
        )
    except Exception as e:
        hint = " (HF_HUB_OFFLINE is set and this revision is not in the cache)" if offline() else ""
        raise DownloadError(f"cannot get {spec}{hint}: {e}") from e
    _check_lfs_blobs(Path(folder))
    model = load_converted(folder)
    model.name = spec
    return model


def _fetch_hub(name: str, entry: Mapping[str, Any], target: Path, force: bool = False) -> Path:
    """The pinned Hub files of a named model, each checked against the manifest's sha256.

    ``target`` is where a hand-converted copy would go (named in the error when offline).
    """
    from huggingface_hub import hf_hub_download

    hub = entry["hub"]
    folder = None
    for fname, expected in hub["files"].items():
        try:
            path = Path(
                hf_hub_download(
                    hub["repo_id"],
                    fname,
                    revision=hub["revision"],
                    cache_dir=_hub_cache(),
                    local_files_only=offline(),
                    force_download=force,
                )
            )
        except Exception as e:
            raise DownloadError(
                f"cannot get {fname} of {name!r} from the Hub ({hub['repo_id']}@{hub['revision']}): {e}\n"
                + _by_hand(name, entry, target)
            ) from e
        _check_sha256(path, expected, f"Run `atst-features download {name} --force` to fetch it anew.")
        folder = path.parent
    assert folder is not None
    return folder


# ---------------------------------------------------------------------------- downloads and the cache


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached: ``override``, else ``$ATST_FEATURES_CACHE``, else
    ``$XDG_CACHE_HOME/atst-features`` (``~/.cache/atst-features``)."""
    return _cache_root(override)


def _cache_root(override: str | os.PathLike | None) -> Path:
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atst-features"


def _source_page(entry: Mapping[str, Any]) -> str:
    src = entry["source"]
    return src.get("page") or src["url"]


def _by_hand(name: str, entry: Mapping[str, Any], target: Path | None) -> str:
    """How to get a model without this library's download: fetch the file, then convert it."""
    out = str(target) if target is not None else f"<cache>/{name}"
    return (
        f"To install {name!r} by hand, download the official file from {_source_page(entry)} and run\n"
        f"    atst-features convert FILE {out}\n"
        f"(or, with network access, `atst-features download {name}`)."
    )


def _fetch(url: str, dest: Path, progress: bool) -> None:
    """Download ``url`` to ``dest`` with gdown (Google Drive confirmation, tqdm progress, resume).

    gdown writes to a temporary file beside ``dest`` and moves it into place when complete, so
    ``dest`` is never a partial file. ``dest``'s folder holds nothing else: any other file there is
    a partial download, which is resumed; if resuming fails (a server that ignores byte ranges,
    a stale partial) the folder is emptied and the download starts over.
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


def _check_source(name: str, entry: Mapping[str, Any], path: Path) -> None:
    """The downloaded official file against the manifest: trusted sha256 / size (an error) and
    third-party reported values (a warning, since they are unverified)."""
    src = entry["source"]
    actual, size = sha256_file(path), path.stat().st_size
    if src.get("sha256") and actual != src["sha256"]:
        path.unlink()
        raise IntegrityError(
            f"the file downloaded for {name!r} from {src['url']} has sha256 {actual}, but the manifest expects "
            f"{src['sha256']}; it was deleted. Try again; if this persists the file at the source has changed: "
            f"check it by hand.\n" + _by_hand(name, entry, None)
        )
    if src.get("size") and size != src["size"]:
        path.unlink()
        raise IntegrityError(f"the file downloaded for {name!r} has {size} bytes, the manifest expects {src['size']}")
    reported = src.get("reported") or {}
    if reported.get("sha256") and actual != reported["sha256"]:
        warnings.warn(
            f"the file downloaded for {name!r} has sha256 {actual}; a third party reported {reported['sha256']} "
            "(unverified). It is used anyway.",
            stacklevel=3,
        )


def _check_cache_entry(name: str, entry: Mapping[str, Any], target: Path) -> None:
    """A cached converted model: every file against its recorded sha256, the source against the manifest."""
    if not verify_directory(target, f"Run `atst-features download {name} --force` to fetch and convert it anew."):
        raise IntegrityError(
            f"the cache entry {str(target)!r} has no {CHECKSUMS_NAME}; delete it and run `atst-features download {name}`"
        )
    source = json.loads((target / CHECKSUMS_NAME).read_text(encoding="utf-8")).get("source") or {}
    trusted = entry["source"].get("sha256")
    if trusted and source.get("sha256") != trusted:
        raise IntegrityError(
            f"the cache entry {str(target)!r} was converted from a file with sha256 {source.get('sha256')}, but the "
            f"manifest names {trusted}; delete it and run `atst-features download {name}`"
        )
    _check_config(name, entry, ATSTConfig.from_json(target / CONFIG_NAME))


def _check_config(name: str, entry: Mapping[str, Any], cfg: ATSTConfig) -> None:
    want = entry.get("config") or {}
    diff = {
        k: (getattr(cfg, k), want[k]) for k in ARCH_FIELDS if want.get(k) is not None and getattr(cfg, k) != want[k]
    }
    if diff:
        raise convert.CheckpointError(
            f"the file for {name!r} holds a different model than the manifest describes: "
            + ", ".join(f"{k} {got!r} (manifest: {exp!r})" for k, (got, exp) in diff.items())
        )


def _convert_into_cache(name: str, entry: Mapping[str, Any], src: Path, root: Path, target: Path) -> None:
    """Convert ``src`` into a temporary folder of the cache, then move it to ``target`` in one step."""
    cfg = entry.get("config") or {}
    converted = convert.convert(
        read_checkpoint(src),
        family=entry.get("family"),
        num_heads=cfg.get("num_heads"),
        head_level=(entry.get("head") or {}).get("level"),
    )
    _check_config(name, entry, converted.config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write_converted(converted, src, tmp, None, name=name, url=entry["source"]["url"])
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | Mapping[str, Any] | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Make a named model available locally and return its verified converted directory.

    1. A converted copy in the cache (``cache_dir/name``) is used when present, every file checked
       against its recorded sha256 (this is also where a hand-converted copy goes).
    2. Else, models published on the Hub come from the Hugging Face cache or the Hub (pinned
       revision, each file checked against the manifest's sha256).
    3. Else the official file is downloaded (progress bar, resumable, never a half file under its
       final name), checked, converted once into the cache, and deleted.

    Args:
        name: a manifest name (``list_models()``).
        cache_dir: where converted models live (default ``cache_dir()``).
        manifest: a manifest file or dict instead of the packaged one.
        progress: show download progress.
        force: discard the cached copy and fetch it again.

    Raises:
        DownloadError: not cached and cannot be fetched (the message says how to get it by hand).
        IntegrityError: a file's sha256 differs from its record.
    """
    entry = _entry(name, manifest)
    root = _cache_root(cache_dir)
    target = root / name
    if target.exists() and not force:
        _check_cache_entry(name, entry, target)
        return target
    if hub_published(entry):
        return _fetch_hub(name, entry, target, force)
    from filelock import FileLock

    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".locks" / f"{name}.lock")):  # one download and conversion at a time
        if force and target.exists():
            shutil.rmtree(target)
        if target.exists():  # another process finished it while this one waited
            _check_cache_entry(name, entry, target)
            return target
        if offline():
            raise DownloadError(
                f"model {name!r} is not in the cache ({target}) and downloads are off (HF_HUB_OFFLINE is set).\n"
                + _by_hand(name, entry, target)
            )
        src_info = entry["source"]
        dest = root / "downloads" / name / (src_info.get("filename") or f"{name}.ckpt")
        if not dest.is_file():
            try:
                _fetch(src_info["url"], dest, progress)
            except Exception as e:
                partial = [p for p in dest.parent.iterdir()] if dest.parent.is_dir() else []
                if not partial:
                    shutil.rmtree(dest.parent, ignore_errors=True)
                again = (
                    f"The partial file {str(partial[0])!r} is kept: run the same command again to resume.\n"
                    if partial
                    else "Check the network connection and run the same command again.\n"
                )
                raise DownloadError(
                    f"could not download {name!r} from {src_info['url']}: {e}\n{again}" + _by_hand(name, entry, target)
                ) from e
        _check_source(name, entry, dest)
        _convert_into_cache(name, entry, dest, root, target)
        shutil.rmtree(dest.parent, ignore_errors=True)
    return target


def is_cached(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | Mapping[str, Any] | None = None,
) -> bool:
    """Whether ``load(name)`` works offline (files present; they are verified when loaded)."""
    entry = _entry(name, manifest)
    if hub_published(entry):
        from huggingface_hub import try_to_load_from_cache

        hub = entry["hub"]
        return all(
            isinstance(try_to_load_from_cache(hub["repo_id"], f, revision=hub["revision"], cache_dir=_hub_cache()), str)
            for f in hub["files"]
        )
    return (_cache_root(cache_dir) / name / CHECKSUMS_NAME).is_file()


# ---------------------------------------------------------------------------- the entry point


def load(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> ATSTModel:
    """Load an ATST encoder for embedding (and its classifier, if it has one), in ``eval()`` mode.

    Args:
        source: a name from the manifest (``atst_features.list_models()``), a converted directory,
            an official checkpoint file (converted in memory), or ``"hf://org/repo[@revision]"``.
        device: where the encoder runs (never chosen for you).
        dtype: encoder precision (float32, or bfloat16 / float16 for speed); the front end and
            LayerNorm statistics stay float32.
        cache_dir: where named models are cached (default ``$ATST_FEATURES_CACHE`` or
            ``~/.cache/atst-features``).
        manifest: a manifest file or dict to resolve names with, instead of the packaged one.
        progress: show download progress for named models.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)  # bad values fail before any download
    if isinstance(source, str) and source.startswith(HF_SCHEME):
        model = _load_hub(source)
    elif Path(source).is_dir():
        model = load_converted(source)
    elif Path(source).is_file():
        model = _load_file(Path(source))
    elif isinstance(source, str) and source in _read_manifest(manifest):
        directory = download(source, cache_dir=cache_dir, manifest=manifest, progress=progress)
        model = load_converted(directory, verify=False)  # download() has just verified every file
        model.name = source
    else:
        names = ", ".join(sorted(_read_manifest(manifest)))
        raise FileNotFoundError(f"{str(source)!r} is not a model name, a directory or a file; known names: {names}")
    return model.to(device=device, dtype=dtype)
