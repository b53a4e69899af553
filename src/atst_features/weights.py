"""Loading: a converted directory, an official checkpoint file, the Hub, or a name -> an ``ATSTModel``.

Named models (``weights_manifest.json``, read by ``registry``) resolve to, in this order,

- their converted copy in the cache (``cache_dir()/NAME``), when present;
- the converted files on the Hugging Face Hub, at the pinned revision, when the manifest lists them;
- otherwise the official file at its source URL (``fetch``: Google Drive through gdown, which
  handles Drive's confirmation page), downloaded once with a progress bar, checked, converted
  (``convert``) and cached as a converted directory (``artifacts``).

Downloaded files are checked against the manifest's trusted sha256 (when it has one); converted
files against the sha256 recorded when they were written, on every load. A mismatch is an error.
Once cached, a model loads without the network (``HF_HUB_OFFLINE=1`` forbids downloads).

Every model comes back built with its head and provenance (``ATSTModel.source``, the directory,
file or Hub snapshot read; ``ATSTModel.weights_sha256``, the sha256 of the weights file read).
The file names, the atomic writer, checksums and conversion helpers live in ``artifacts`` and
are re-exported here.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from . import artifacts, convert, fetch, registry
from .artifacts import (  # re-exported: the names callers and tests know from this module
    CHECKSUMS_NAME,
    CONFIG_NAME,
    HEAD_NAME,
    LABELS_NAME,
    WEIGHTS_NAME,
    IntegrityError,
    convert_checkpoint,
    read_checkpoint,
    save_converted,
    sha256_file,
    verify_directory,
    write_converted,
    write_text_atomic,
)
from .dtypes import resolve_dtype
from .embed import ATSTModel, resolve_device
from .fetch import DownloadError, offline
from .heads import ClassificationHead
from .model import ATSTConfig, ATSTEncoder
from .registry import ManifestSource, ModelSpec, hub_published, list_models

__all__ = [
    "CHECKSUMS_NAME",
    "CONFIG_NAME",
    "HEAD_NAME",
    "LABELS_NAME",
    "WEIGHTS_NAME",
    "DownloadError",
    "IntegrityError",
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
    "read_checkpoint",
    "save_converted",
    "sha256_file",
    "verify_directory",
    "write_converted",
    "write_text_atomic",
]

HF_SCHEME = "hf://"
CACHE_ENV = "ATST_FEATURES_CACHE"
# The config fields that define the architecture: a converted file must match its manifest entry on these.
ARCH_FIELDS = ("family", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
ARCH_FIELDS += ("n_mels", "patch_h", "patch_w", "spec_w")
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


def build(
    cfg: ATSTConfig,
    state_dict: dict[str, torch.Tensor],
    name: str | None = None,
    head: ClassificationHead | None = None,
    *,
    source: str | None = None,
    weights_sha256: str | None = None,
) -> ATSTModel:
    """An ``ATSTModel`` from a config and our state dict (strict load), with an optional head.

    Args:
        cfg, state_dict: the encoder.
        name: what the model is called (``ATSTModel.name``).
        head: a classification head; its input width must match the encoder's last block.
        source, weights_sha256: provenance (``ATSTModel.source`` / ``.weights_sha256``).
    """
    if head is not None:
        expected = (2 * cfg.embed_dim) if (head.level == "clip" and cfg.has_cls) else cfg.embed_dim
        if head.in_dim != expected:
            raise ValueError(
                f"the {head.level}-level head takes {head.in_dim} inputs, but the last block of this "
                f"ATST-{cfg.family.capitalize()} encoder gives {expected}"
            )
    encoder = ATSTEncoder(cfg)
    encoder.load_state_dict(state_dict, strict=True)
    return ATSTModel(encoder, name=name, head=head, source=source, weights_sha256=weights_sha256)


def load_converted(
    directory: str | os.PathLike,
    verify: bool = True,
    *,
    name: str | None = None,
    weights_sha256: str | None = None,
) -> ATSTModel:
    """Load a converted model directory (``config.json`` + ``model.safetensors`` [+ head files]).

    With ``verify`` the files listed in its ``checksums.json`` (when present) are checked first.
    ``name`` (default: the directory) names the model; ``weights_sha256`` is the weights' sha256
    when the caller has just checked it (see ``artifacts.read_model_dir``).
    """
    d = artifacts.read_model_dir(directory, verify, weights_sha256=weights_sha256)
    return build(
        d.config,
        d.state_dict,
        name=str(directory) if name is None else name,
        head=d.head,
        source=str(d.directory),
        weights_sha256=d.weights_sha256,
    )


def _load_file(path: Path) -> ATSTModel:
    """An official checkpoint file, converted in memory (nothing is written)."""
    if path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
        return load_converted(path.parent)
    c = convert.convert(read_checkpoint(path))
    head = (
        ClassificationHead.from_state_dict(c.head, c.head_level, c.labels, c.multilabel) if c.head is not None else None
    )
    return build(c.config, c.state_dict, name=str(path), head=head, source=str(path), weights_sha256=sha256_file(path))


def _load_hub(spec: str) -> ATSTModel:
    """``hf://org/repo[@revision]`` -> the converted model stored in that Hub repository."""
    repo, _, revision = spec[len(HF_SCHEME) :].partition("@")
    try:
        folder = fetch.hub_snapshot(repo, revision or None, HUB_FILES)
    except Exception as e:
        hint = " (HF_HUB_OFFLINE is set and this revision is not in the cache)" if offline() else ""
        raise DownloadError(f"cannot get {spec}{hint}: {e}") from e
    fetch.check_lfs_blobs(folder)
    return load_converted(folder, name=spec)


def _fetch_hub(spec: ModelSpec, target: Path, force: bool = False) -> Path:
    """The pinned Hub files of a named model, each checked against the manifest's sha256.

    ``target`` is where a hand-converted copy would go (named in the error when offline).
    """
    hub, name = spec.hub, spec.name
    folder = None
    for fname, expected in hub.files.items():
        try:
            path = fetch.hub_file(hub.repo_id, fname, hub.revision, force)
        except Exception as e:
            raise DownloadError(
                f"cannot get {fname} of {name!r} from the Hub ({hub.repo_id}@{hub.revision}): {e}\n"
                + _by_hand(spec, target)
            ) from e
        artifacts.check_sha256(path, expected, f"Run `atst-features download {name} --force` to fetch it anew.")
        folder = path.parent
    assert folder is not None
    return folder


# ---------------------------------------------------------------------------- the cache and its checks


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where converted models are cached: ``override``, else ``$ATST_FEATURES_CACHE``, else
    ``$XDG_CACHE_HOME/atst-features`` (``~/.cache/atst-features``)."""
    return _cache_root(override)


def _cache_root(override: str | os.PathLike | None) -> Path:
    # ``download`` and ``load`` take an argument called ``cache_dir``, which hides the function above.
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atst-features"


def _by_hand(spec: ModelSpec, target: Path | None) -> str:
    """How to get a model without this library's download: fetch the file, then convert it."""
    out = str(target) if target is not None else f"<cache>/{spec.name}"
    page = spec.source.page_or_url if spec.source is not None else None
    return (
        f"To install {spec.name!r} by hand, download the official file from {page} and run\n"
        f"    atst-features convert FILE {out}\n"
        f"(or, with network access, `atst-features download {spec.name}`)."
    )


def _check_source(spec: ModelSpec, path: Path) -> None:
    """The downloaded official file against the manifest: trusted sha256 / size (an error) and
    third-party reported values (a warning, since they are unverified)."""
    src, name = spec.source, spec.name
    actual, size = sha256_file(path), path.stat().st_size
    if src.sha256 and actual != src.sha256:
        path.unlink()
        raise IntegrityError(
            f"the file downloaded for {name!r} from {src.url} has sha256 {actual}, but the manifest expects "
            f"{src.sha256}; it was deleted. Try again; if this persists the file at the source has changed: "
            f"check it by hand.\n" + _by_hand(spec, None)
        )
    if src.size and size != src.size:
        path.unlink()
        raise IntegrityError(f"the file downloaded for {name!r} has {size} bytes, the manifest expects {src.size}")
    if src.reported is not None and src.reported.sha256 and actual != src.reported.sha256:
        warnings.warn(
            f"the file downloaded for {name!r} has sha256 {actual}; a third party reported {src.reported.sha256} "
            "(unverified). It is used anyway.",
            stacklevel=3,
        )


def _check_cache_entry(spec: ModelSpec, target: Path) -> str | None:
    """A cached converted model: every file against its recorded sha256, the source against the
    manifest, the config against the manifest's. Returns the weights' sha256."""
    name = spec.name
    if not verify_directory(target, f"Run `atst-features download {name} --force` to fetch and convert it anew."):
        raise IntegrityError(
            f"the cache entry {str(target)!r} has no {CHECKSUMS_NAME}; delete it and run `atst-features download {name}`"
        )
    record = artifacts.read_checksums(target)
    source = record.get("source") or {}
    trusted = spec.source.sha256 if spec.source is not None else None
    if trusted and source.get("sha256") != trusted:
        raise IntegrityError(
            f"the cache entry {str(target)!r} was converted from a file with sha256 {source.get('sha256')}, but the "
            f"manifest names {trusted}; delete it and run `atst-features download {name}`"
        )
    _check_config(spec, ATSTConfig.from_json(target / CONFIG_NAME))
    return record["files"].get(WEIGHTS_NAME)


def _check_config(spec: ModelSpec, cfg: ATSTConfig) -> None:
    """The architecture fields of ``cfg`` against the manifest entry's config (``ARCH_FIELDS``)."""
    want = spec.config
    diff = {
        k: (getattr(cfg, k), want[k]) for k in ARCH_FIELDS if want.get(k) is not None and getattr(cfg, k) != want[k]
    }
    if diff:
        raise convert.CheckpointError(
            f"the file for {spec.name!r} holds a different model than the manifest describes: "
            + ", ".join(f"{k} {got!r} (manifest: {exp!r})" for k, (got, exp) in diff.items())
        )


def _convert_into_cache(spec: ModelSpec, src: Path, root: Path, target: Path) -> None:
    """Convert ``src`` into a temporary folder of the cache, then move it to ``target`` in one step."""
    converted = convert.convert(
        read_checkpoint(src),
        family=spec.family,
        num_heads=spec.config.get("num_heads"),
        head_level=spec.head.level if spec.head is not None else None,
    )
    _check_config(spec, converted.config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        write_converted(converted, src, tmp, None, name=spec.name, url=spec.source.url)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- downloads


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: ManifestSource = None,
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
    return _download(registry.get(name, manifest), _cache_root(cache_dir), progress, force)[0]


def _download(spec: ModelSpec, root: Path, progress: bool, force: bool) -> tuple[Path, str | None]:
    """``download``: the verified directory and the sha256 of its weights (``None`` if not recorded)."""
    target = root / spec.name
    if target.exists() and not force:
        return target, _check_cache_entry(spec, target)
    if spec.hub.published:
        return _fetch_hub(spec, target, force), spec.hub.files.get(WEIGHTS_NAME)
    from filelock import FileLock

    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".locks" / f"{spec.name}.lock")):  # one download and conversion at a time
        if force and target.exists():
            shutil.rmtree(target)
        if target.exists():  # another process finished it while this one waited
            return target, _check_cache_entry(spec, target)
        _download_and_convert(spec, root, target, progress)
    return target, artifacts.read_checksums(target)["files"][WEIGHTS_NAME]


def _download_and_convert(spec: ModelSpec, root: Path, target: Path, progress: bool) -> None:
    """Fetch the official file into ``root/downloads/NAME/``, check it, convert it to ``target``, delete it."""
    name, src = spec.name, spec.source
    if offline():
        raise DownloadError(
            f"model {name!r} is not in the cache ({target}) and downloads are off (HF_HUB_OFFLINE is set).\n"
            + _by_hand(spec, target)
        )
    if src is None or not src.url:
        raise DownloadError(f"the manifest lists no source to download {name!r} from")
    dest = root / "downloads" / name / (src.filename or f"{name}.ckpt")
    if not dest.is_file():
        try:
            fetch.download_url(src.url, dest, progress)
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
                f"could not download {name!r} from {src.url}: {e}\n{again}" + _by_hand(spec, target)
            ) from e
    _check_source(spec, dest)
    _convert_into_cache(spec, dest, root, target)
    shutil.rmtree(dest.parent, ignore_errors=True)


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
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | os.PathLike | None = None,
    manifest: ManifestSource = None,
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

    Returns:
        an ``ATSTModel`` whose ``name`` is ``source`` as given (a directory or file as a string),
        with ``source`` (what was read) and ``weights_sha256`` set.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)  # bad values fail before any download
    if isinstance(source, str) and source.startswith(HF_SCHEME):
        model = _load_hub(source)
    elif Path(source).is_dir():
        model = load_converted(source)
    elif Path(source).is_file():
        model = _load_file(Path(source))
    else:
        specs = registry.manifest(manifest)
        if not (isinstance(source, str) and source in specs):
            names = ", ".join(sorted(specs))
            raise FileNotFoundError(f"{str(source)!r} is not a model name, a directory or a file; known names: {names}")
        directory, sha = _download(specs[source], _cache_root(cache_dir), progress, force=False)
        # _download has just verified every file: no second pass over them
        model = load_converted(directory, verify=False, name=source, weights_sha256=sha)
    return model.to(device=device, dtype=dtype)
