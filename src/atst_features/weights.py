"""Loading: a converted directory, an official checkpoint file, the Hub, or a name -> an ``ATSTModel``.

``load(source)`` takes, in this order: an ``hf://org/repo@commit`` spec; a **name** of the manifest
(``weights_manifest.json``, read by ``registry``), which wins over a same-named folder in the
current directory (write ``./NAME`` for the folder); else an existing directory or file.

Named models resolve to their converted copy in the cache (``cache_dir()/NAME``) when present,
else the converted files on the Hugging Face Hub at the pinned revision when the manifest lists
them, else a source file (the official one, or a second source on a stable host), downloaded
once, checked, converted (``convert``) and cached as a converted directory (``artifacts``).

Every source carries a pinned size and sha256, enforced: a mismatch is an error, the file is
deleted and nothing is cached. A source without a pin in the manifest is pinned by its first
verified download (trust on first use, recorded in ``cache_dir()/pins.json`` and never silently
replaced). ``allow_other_file=True`` (or ``ATST_FEATURES_ALLOW_OTHER_FILE=1``) is the explicit
opt-out for a user who knowingly uses another file. The converted file must also be of the
family, layout and architecture the manifest describes. Converted files are checked against the
sha256 recorded when they were written, on every load. Once cached, a model loads without the
network (``HF_HUB_OFFLINE=1`` forbids downloads).

Transfers have timeouts, retries and a stall limit (``fetch``); one process at a time downloads a
name into a cache (a lock with a timeout that names its holder); a failed or refused transfer
leaves no file that a rerun would reuse, except a partial download of a pinned file, which a
rerun resumes (the pin catches a splice). Every path written or removed is checked to be inside
the cache.

Every model comes back built with its head and provenance (``ATSTModel.source``, the directory,
file or ``hf://repo@commit`` read; ``ATSTModel.weights_sha256``, the sha256 of the weights file
read). Every error is a ``LoadError`` (``errors``); the file names, the atomic writer, checksums
and conversion helpers live in ``artifacts`` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifacts, convert, fetch, onnx_export, registry
from .artifacts import (  # re-exported: the names callers and tests know from this module
    CHECKSUMS_NAME,
    CONFIG_NAME,
    HEAD_NAME,
    LABELS_NAME,
    WEIGHTS_NAME,
    convert_checkpoint,
    read_checkpoint,
    save_converted,
    sha256_file,
    verify_directory,
    write_converted,
    write_text_atomic,
)
from .cache import (  # the cache, its pins and checks
    ARCH_FIELDS,
    CACHE_ENV,
    DOWNLOADS,
    LOCKS,
    OTHER_FILE_ENV,
    PINS_NAME,
    Pin,
    _OPT_OUT,
    _allow_other,
    _by_hand,
    _cache_root,
    _check_cache_entry,
    _check_config,
    _in_cache,
    _pin_of,
    _record_pin,
    _remove,
    _umask,
    cache_dir,
    pin_status,
)
from .cpu import auto_dtype
from .dtypes import resolve_dtype
from .embed import ATSTModel, resolve_device
from .errors import (
    CheckpointError,
    DownloadError,
    IntegrityError,
    LoadArgumentError,
    LoadError,
    ManifestError,
    ModelNotFoundError,
    UnknownModelError,
)
from .fetch import offline
from .heads import ClassificationHead
from .model import ATSTConfig, ATSTEncoder
from .registry import ManifestSource, ModelSpec, SourceSpec, hub_published, list_models

__all__ = [
    "ARCH_FIELDS",
    "CACHE_ENV",
    "OTHER_FILE_ENV",
    "PINS_NAME",
    "CHECKSUMS_NAME",
    "CONFIG_NAME",
    "HEAD_NAME",
    "LABELS_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "DownloadError",
    "IntegrityError",
    "LoadArgumentError",
    "LoadError",
    "ManifestError",
    "ModelNotFoundError",
    "UnknownModelError",
    "build",
    "cache_dir",
    "convert_checkpoint",
    "download",
    "hub_published",
    "is_cached",
    "list_models",
    "load",
    "load_converted",
    "manifest",
    "offline",
    "pin_status",
    "read_checkpoint",
    "save_converted",
    "sha256_file",
    "verify_directory",
    "write_converted",
    "write_text_atomic",
]

HF_SCHEME = "hf://"
LOCK_TIMEOUT_S = 1800.0  # longest wait for another process's download of the same name
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME, LABELS_NAME, CHECKSUMS_NAME]  # what an hf:// load fetches


def manifest(path: ManifestSource = None) -> dict[str, dict]:
    """The manifest's entries as written (plain dicts, yours to change), keyed by name.

    ``registry.manifest`` gives the same entries as typed ``ModelSpec``s.

    Args:
        path: a manifest file (``{"models": [...]}``), such a dict already loaded, or ``None`` for
            the manifest shipped with the package (``weights_manifest.json``).
    """
    return {name: copy.deepcopy(dict(spec.raw)) for name, spec in registry.manifest(path).items()}


# ---------------------------------------------------------------------------- building models


def _encoder(cfg: ATSTConfig, state_dict: Mapping[str, torch.Tensor], owned: bool) -> ATSTEncoder:
    """An encoder holding ``state_dict`` (strict): built on the meta device (no allocation, no
    initialisation), then given the tensors, as they are when ``owned`` (read from a file for this
    model) or as float32 copies."""
    with torch.device("meta"):
        encoder = ATSTEncoder(cfg)
    tensors = {
        k: v if owned and v.dtype == torch.float32 else v.detach().to(torch.float32, copy=True)
        for k, v in state_dict.items()
    }
    encoder.load_state_dict(tensors, strict=True, assign=True)
    return encoder


def _check_head_width(cfg: ATSTConfig, head: ClassificationHead | None) -> None:
    if head is not None:
        expected = (2 * cfg.embed_dim) if (head.level == "clip" and cfg.has_cls) else cfg.embed_dim
        if head.in_dim != expected:
            raise CheckpointError(
                f"the {head.level}-level head takes {head.in_dim} inputs, but the last block of this "
                f"ATST-{cfg.family.capitalize()} encoder gives {expected}"
            )


def build(
    cfg: ATSTConfig,
    state_dict: dict[str, torch.Tensor],
    name: str | None = None,
    head: ClassificationHead | None = None,
    *,
    source: str | None = None,
    weights_sha256: str | None = None,
) -> ATSTModel:
    """An ``ATSTModel`` from a config and our state dict (strict load, copied), with an optional head.

    Args:
        cfg, state_dict: the encoder (any depth: building in memory is not restricted).
        name: what the model is called (``ATSTModel.name``).
        head: a classification head; its input width must match the encoder's last block.
        source, weights_sha256: provenance (``ATSTModel.source`` / ``.weights_sha256``).
    """
    _check_head_width(cfg, head)
    encoder = _encoder(cfg, state_dict, owned=False)
    model = ATSTModel(encoder, name=name, head=head, source=source, weights_sha256=weights_sha256)
    return model.to()  # on the CPU in float32; to() chooses the GEMM path


def _from_dir(d: artifacts.ModelDir, name: str, source: str | None = None) -> ATSTModel:
    _check_head_width(d.config, d.head)
    return ATSTModel(
        _encoder(d.config, d.state_dict, owned=True),
        name=name,
        head=d.head,
        source=str(d.directory.absolute()) if source is None else source,
        weights_sha256=d.weights_sha256,
    )


def load_converted(
    directory: str | os.PathLike,
    verify: bool = True,
    *,
    name: str | None = None,
    weights_sha256: str | None = None,
) -> ATSTModel:
    """Load a converted model directory (``config.json`` + ``model.safetensors`` [+ head files]).

    With ``verify`` every file loaded must be listed in its ``checksums.json`` and match it; a
    directory without one loads with a warning that it is unverified. ``name`` (default: the
    directory) names the model; ``weights_sha256`` is the weights' sha256 when the caller has just
    checked it (see ``artifacts.read_model_dir``).
    """
    d = artifacts.read_model_dir(directory, verify, weights_sha256=weights_sha256)
    return _from_dir(d, str(directory) if name is None else name)


def _load_file(path: Path, depth: int | None) -> ATSTModel:
    """An official checkpoint file, converted in memory (nothing is written)."""
    if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
        return load_converted(path.parent)
    c = convert.convert(read_checkpoint(path), depth=depth)
    head = (
        ClassificationHead.from_state_dict(c.head, c.head_level, c.labels, c.multilabel) if c.head is not None else None
    )
    _check_head_width(c.config, head)
    encoder = _encoder(c.config, c.state_dict, owned=True)
    return ATSTModel(encoder, name=str(path), head=head, source=str(path.absolute()), weights_sha256=sha256_file(path))


def _hub_error(what: str, e: BaseException) -> str:
    hint = " (HF_HUB_OFFLINE is set and this revision is not in the cache)" if offline() else ""
    return f"cannot get {what}{hint}: {type(e).__name__}: {fetch._first_line(e)}"


def _load_hub(spec: str) -> ATSTModel:
    """``hf://org/repo[@revision]`` -> the converted model stored in that Hub repository."""
    repo, revision = fetch.parse_hub_spec(spec, HF_SCHEME)
    try:
        folder = fetch.hub_snapshot(repo, revision, HUB_FILES)
    except Exception as e:
        raise DownloadError(_hub_error(spec, e)) from None
    if folder.parent.name != "snapshots" or not fetch._SHA1.fullmatch(folder.name):
        raise IntegrityError(f"the Hub client answered {str(folder)!r} for {spec}, which is not a snapshot of its cache")
    content_checked = fetch.check_blobs(folder, HUB_FILES)
    d = artifacts.read_model_dir(folder, verify=not content_checked)
    return _from_dir(d, spec, source=f"{HF_SCHEME}{repo}@{folder.name}")


def _fetch_hub(spec: ModelSpec, target: Path, force: bool = False) -> tuple[Path, artifacts.ModelDir]:
    """The pinned Hub files of a named model, read and checked against the manifest's sha256 and
    architecture; files the manifest does not pin are not read.

    ``target`` is where a hand-converted copy would go (named in the error when offline).
    """
    hub, name = spec.hub, spec.name
    folder = None
    for fname in hub.files:
        try:
            folder = fetch.hub_file(hub.repo_id, fname, hub.revision, force).parent
        except Exception as e:
            raise DownloadError(
                _hub_error(f"{fname} of {name!r} from the Hub ({hub.repo_id}@{hub.revision})", e) + "\n" + _by_hand(spec, target)
            ) from None
    assert folder is not None
    way_out = f"Run `atst-features download {name} --force` to fetch it anew."
    d = artifacts.read_model_dir(folder, pinned=dict(hub.files), way_out=way_out)
    _check_config(spec, d.config)
    return folder, d


# ---- downloads


@contextlib.contextmanager
def _locked(root: Path, name: str, progress: bool) -> Iterator[None]:
    """One download and conversion of ``name`` into this cache at a time: a file lock that waits at
    most ``LOCK_TIMEOUT_S`` and says who holds it."""
    from filelock import FileLock, Timeout

    locks = _in_cache(root, LOCKS)
    locks.mkdir(parents=True, exist_ok=True)
    path, holder = locks / f"{name}.lock", _in_cache(root, LOCKS, f"{name}.holder")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = _holder(holder)
        if progress:
            print(f"waiting for {who}, which is downloading {name!r} into this cache (lock {path})", file=sys.stderr)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise DownloadError(
                f"{who} holds the download lock of {name!r} ({path}); waited {LOCK_TIMEOUT_S:g} s. If that process is "
                "gone or stuck, stop it (or delete the lock file) and run again."
            ) from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_text_atomic(holder, json.dumps(info) + "\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: ManifestSource = None,
    progress: bool = True,
    force: bool = False,
    allow_other_file: bool | None = None,
) -> Path:
    """Make a named model available locally and return its verified converted directory.

    1. A converted copy in the cache (``cache_dir/name``) is used when present, every file checked
       against its recorded sha256 and the file it came from against the pins (this is also where
       a hand-converted copy goes).
    2. Else, models published on the Hub come from the Hugging Face cache or the Hub (pinned
       revision, each pinned file checked against the manifest's sha256, the others not read).
    3. Else the model's sources are tried in turn (pinned ones first): the file is downloaded
       (a line says what, how large and from where; progress bar; timeouts; resumable), checked
       against its pin, converted once into the cache, and deleted.

    Args:
        name: a manifest name (``list_models()``).
        cache_dir: where converted models live (default ``cache_dir()``).
        manifest: a manifest file or dict instead of the packaged one.
        progress: print what is downloaded and show its progress.
        force: discard the cached copy (and any partial download) and fetch it again; the new
            file must still match the pin.
        allow_other_file: accept a file that differs from its pin (a warning, not an error); the
            default is ``$ATST_FEATURES_ALLOW_OTHER_FILE``.

    Raises:
        LoadError: ``DownloadError`` (not cached and cannot be fetched; the message says how to get
            it by hand), ``IntegrityError`` (a file differs from its pin or record),
            ``CheckpointError`` (the file is not the model the manifest describes),
            ``UnknownModelError``.
    """
    spec = registry.get(name, manifest)
    return _download(spec, _cache_root(cache_dir), progress, force, _allow_other(allow_other_file)).directory


@dataclass
class _Found:
    """Where ``_download`` found a named model: its directory and weights' sha256, and the model
    directory already read when the checks read it (the Hub path)."""

    directory: Path
    weights_sha256: str
    read: artifacts.ModelDir | None = None
    source: str | None = None


def _download(spec: ModelSpec, root: Path, progress: bool, force: bool, allow_other: bool) -> _Found:
    """``download``: the verified directory of a named model."""
    target = _in_cache(root, spec.name)
    if target.exists() and not force:
        return _Found(target, _check_cache_entry(spec, root, target, allow_other))
    if spec.hub.published:
        folder, d = _fetch_hub(spec, target, force)
        return _Found(folder, d.weights_sha256, d, f"{HF_SCHEME}{spec.hub.repo_id}@{spec.hub.revision}")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, spec.name, progress):
        if force:
            _remove(root, DOWNLOADS, spec.name)  # partial downloads too
        elif target.exists():  # another process finished it while this one waited
            return _Found(target, _check_cache_entry(spec, root, target, allow_other))
        _download_and_convert(spec, root, target, progress, allow_other)
    return _Found(target, artifacts.read_checksums(target)["files"][WEIGHTS_NAME])


def _download_and_convert(spec: ModelSpec, root: Path, target: Path, progress: bool, allow_other: bool) -> None:
    """Try the model's sources in turn until one is fetched, checked and converted into ``target``."""
    name = spec.name
    if offline():
        raise DownloadError(
            f"model {name!r} is not in the cache ({target}) and downloads are off (HF_HUB_OFFLINE is set).\n"
            + _by_hand(spec, target)
        )
    if not spec.sources:
        raise DownloadError(f"the manifest lists no source to download {name!r} from")
    failures = []
    for src in spec.sources:
        try:
            path, sha256, pin = _fetch_source(spec, src, root, progress, allow_other)
        except fetch.TransferError as e:
            failures.append(f"from {fetch.host_of(src.url)}: {e}")
            continue
        try:
            other = pin.sha256 != sha256 if pin is not None else allow_other  # not (to be) the pinned file
            _convert_into_cache(spec, src, path, sha256, root, target, other=other)
            if pin is None and not allow_other:
                _record_pin(root, spec, src, sha256, path.stat().st_size, "first verified download")
        finally:
            _remove(root, DOWNLOADS, name)
        return
    kept = fetch.partial_files(_in_cache(root, DOWNLOADS, name))
    again = (
        f"The partial file {str(kept[0])!r} is kept: run the same command again to resume.\n"
        if kept
        else "Check the network connection and run the same command again.\n"
    )
    raise DownloadError(f"could not download {name!r}:\n  " + "\n  ".join(failures) + f"\n{again}" + _by_hand(spec, target))


def _fetch_source(
    spec: ModelSpec, src: SourceSpec, root: Path, progress: bool, allow_other: bool
) -> tuple[Path, str, Pin | None]:
    """Download one source into ``root/downloads/NAME/`` and check it against its pin.

    Returns the file, its sha256 and its pin (``None``: not pinned yet). A partial file is kept
    for a resume only when the source is pinned (a rerun's result is checked); anything else that
    fails is removed, so a rerun fetches anew.

    Raises:
        fetch.TransferError: the transfer failed (the next source may be tried).
        IntegrityError: the file is not the pinned one (deleted; nothing is cached).
    """
    name = spec.name
    folder = _in_cache(root, DOWNLOADS, name)
    dest = _in_cache(root, DOWNLOADS, name, src.filename or f"{name}.ckpt")
    pin = _pin_of(spec, src, root)
    own = [p for p in fetch.partial_files(folder) if p.name.startswith(dest.name)]
    if folder.exists() and (pin is None or set(folder.iterdir()) - set(own)):
        _remove(root, DOWNLOADS, name)  # a complete file, another source's or an unpinned partial: not reused
        own = []
    resume = pin is not None and bool(own)
    while True:
        if progress:
            size = fetch.human_size(pin.size if pin else None)
            print(f"downloading {name} ({size}) from {fetch.host_of(src.url)}" + (" (resuming)" if resume else ""), file=sys.stderr)
        try:
            sha256 = fetch.download_url(src.url, dest, progress, size=pin.size if pin else None, resume=resume)
            break
        except fetch.TransferError as e:
            if not (e.resumable and pin is not None and any(p.stat().st_size for p in fetch.partial_files(folder))):
                _remove(root, DOWNLOADS, name)  # nothing worth resuming
            if not (e.restart and resume):
                raise
            resume = False  # the server will not resume: start over, once
    size = dest.stat().st_size
    if pin is not None and (sha256 != pin.sha256 or (pin.size is not None and size != pin.size)):
        message = (
            f"the file downloaded for {name!r} from {src.url} has {size} bytes and sha256 {sha256}, but {pin.by} pins "
            f"{pin.size} bytes and sha256 {pin.sha256}"
        )
        if not allow_other:
            _remove(root, DOWNLOADS, name)
            raise IntegrityError(
                f"{message}. It was deleted and nothing was cached. Try again; if this persists the file at the source "
                f"has changed: check it by hand. {_OPT_OUT}\n" + _by_hand(spec, None)
            )
        warnings.warn(f"{message}; it is used anyway, as other files are allowed", stacklevel=5)
    return dest, sha256, pin


def _convert_into_cache(
    spec: ModelSpec, src: SourceSpec, path: Path, sha256: str, root: Path, target: Path, other: bool
) -> None:
    """Convert ``path`` (the checks: the manifest's depth, heads, family, layout, architecture and
    front end) into a temporary folder of the cache, then move it to ``target``.

    ``other``: the file is not the pinned one (accepted with the opt-out), which ``checksums.json``
    records as ``"pinned": false``.
    """
    converted = convert.convert(
        read_checkpoint(path),
        num_heads=spec.config.get("num_heads"),
        head_level=spec.head.level if spec.head is not None else None,
        depth=spec.config.get("depth"),
        use_head=spec.head.use if spec.head is not None else None,
    )
    if spec.head is not None:
        what = f"the file downloaded for {spec.name!r}"
        converted = convert.match_head(converted, spec.head.num_classes, spec.head.labels, what)
    if src.formats and converted.layout not in src.formats:
        raise CheckpointError(
            f"the file downloaded for {spec.name!r} from {fetch.host_of(src.url)} is a {converted.layout!r} file, but the "
            f"manifest publishes it as {list(src.formats)}: it is another model; nothing was cached"
        )
    if converted.config.family != spec.family and spec.family is not None:
        raise CheckpointError(
            f"the file downloaded for {spec.name!r} holds an ATST-{converted.config.family.capitalize()} encoder, but "
            f"{spec.name!r} is ATST-{spec.family.capitalize()}: it is another model; nothing was cached"
        )
    _check_config(spec, converted.config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; a cache may be shared
    try:
        provenance = {"name": spec.name, "url": src.url, "pinned": not other}
        write_converted(converted, path, tmp, None, src_sha256=sha256, **provenance)
        _replace_dir(root, tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(root: Path, new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target`` (replacing a previous one: renamed aside, then removed)."""
    old = None
    if target.exists() or target.is_symlink():
        old = _in_cache(root, f".{target.name}-old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        _remove(root, old.name)


def is_cached(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: ManifestSource = None,
) -> bool:
    """Whether ``load(name)`` works offline (files present; they are verified when loaded)."""
    spec = registry.get(name, manifest)
    if spec.hub.published:
        return fetch.hub_is_cached(spec.hub.repo_id, list(spec.hub.files), spec.hub.revision)
    return (_cache_root(cache_dir) / name / CHECKSUMS_NAME).is_file()


# ---------------------------------------------------------------------------- the entry point


def load(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    backend: str = "torch",
    cache_dir: str | os.PathLike | None = None,
    manifest: ManifestSource = None,
    progress: bool = True,
    allow_other_file: bool | None = None,
    depth: int | None = None,
) -> ATSTModel:
    """Load an ATST encoder for embedding (and its classifier, if it has one), in ``eval()`` mode.

    Args:
        source: a name from the manifest (``atst_features.list_models()``; a name wins over a
            folder of that name in the current directory: write ``./NAME`` for the folder), a
            converted directory, an official checkpoint file (converted in memory), or
            ``"hf://org/repo@commit"`` (a branch name works, with a warning that it can move).
        device: where the encoder runs (never chosen for you).
        dtype: encoder precision (float32, or bfloat16 / float16 for speed); the front end and
            LayerNorm statistics stay float32. ``"auto"``: on the CPU bfloat16 where it is native
            (AVX512-BF16 or AMX), else float32; on CUDA bfloat16 (float16 without it). What was
            chosen, and why, is in ``model.choices["dtype"]``.
        backend: where encoder passes run: "torch" (default), or ONNX Runtime on the CPU in
            float32: "onnxruntime" (the exported float32 graph, equal to torch within 1e-4) or
            "onnxruntime-int8" (its weight matrix multiplications in int8). The graph is exported
            on first use and cached in ``onnx/`` beside the converted weights (``onnx_export``);
            these need the ``onnx`` extra (``pip install 'atst-features[onnx]'``).
        cache_dir: where named models are cached (default ``$ATST_FEATURES_CACHE`` or
            ``~/.cache/atst-features``).
        manifest: a manifest file or dict to resolve names with, instead of the packaged one.
        progress: print what is downloaded and show its progress, for named models.
        allow_other_file: accept a downloaded or cached file that differs from its pin (a warning,
            not an error); default ``$ATST_FEATURES_ALLOW_OTHER_FILE``.
        depth: the blocks an official checkpoint file must have (default the official 12); a
            converted directory's ``config.json`` records its own.

    Returns:
        an ``ATSTModel`` whose ``name`` is ``source`` as given (a directory or file as a string),
        with ``source`` (what was read) and ``weights_sha256`` set.

    Raises:
        LoadError: every problem of the source (see ``errors``); ``OSError`` for the file system.
    """
    try:  # bad values fail before any download
        device = resolve_device(device)
        why = None
        if isinstance(dtype, str) and dtype == "auto":
            if backend == "torch":
                dtype, why = auto_dtype(device)
            else:
                dtype, why = torch.float32, "auto: float32, what the ONNX Runtime backends run"
        dtype = resolve_dtype(dtype)
        onnx_export.check_backend(backend, device, dtype)
    except (TypeError, ValueError) as e:
        raise LoadArgumentError(str(e)) from None
    if backend != "torch":
        onnx_export.require_runtime()  # the missing extra is named before any download
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise LoadArgumentError(f"depth must be a positive integer or None, got {depth!r}")
    if isinstance(source, str) and source.startswith(HF_SCHEME):
        model = _load_hub(source)
    else:
        specs = registry.manifest(manifest)
        if isinstance(source, str) and source in specs:
            model = _load_named(specs[source], _cache_root(cache_dir), progress, _allow_other(allow_other_file))
        else:
            model = _load_path(source, specs, depth)
    model.to(device=device, dtype=dtype)
    if why is not None:
        model.choices["dtype"] = why
    if backend == "torch":
        return model
    return onnx_export.attach_backend(model, backend)


def _load_named(spec: ModelSpec, root: Path, progress: bool, allow_other: bool) -> ATSTModel:
    try:
        found = _download(spec, root, progress, force=False, allow_other=allow_other)
    except LoadError as e:
        if Path(spec.name).exists():  # the folder this name used to shadow
            e.args = (f"{e.args[0]}\n(A folder {spec.name!r} exists here; names win over folders: pass "
                      f"'./{spec.name}' to load the folder.)",)
        raise
    # _download has just verified every file: no second pass over them
    d = found.read or artifacts.read_model_dir(found.directory, verify=False, weights_sha256=found.weights_sha256)
    return _from_dir(d, spec.name, source=found.source)


def _load_path(source: str | os.PathLike, specs: Mapping[str, ModelSpec], depth: int | None) -> ATSTModel:
    path = Path(source)
    if path.is_dir():
        model = load_converted(path, name=str(source))
        if depth is not None and model.config.depth != depth:
            raise CheckpointError(f"{str(path)!r} holds a {model.config.depth}-block encoder, but depth={depth} was asked for")
        return model
    if path.is_file():
        return _load_file(path, depth)
    names = ", ".join(sorted(specs))
    raise ModelNotFoundError(f"{str(source)!r} is not a model name, a directory or a file; known names: {names}")
