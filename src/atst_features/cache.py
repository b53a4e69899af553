"""The cache of converted models: where it is, paths kept inside it, first-use pins, and the
checks a cached entry must pass against its manifest entry before it is used.

``weights`` (download and load) builds on it; nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import artifacts, registry
from .artifacts import CHECKSUMS_NAME, CONFIG_NAME, WEIGHTS_NAME, verify_directory
from .atomic import write_text_atomic
from .errors import CheckpointError, DownloadError, IntegrityError, ManifestError
from .model import ATSTConfig
from .registry import ManifestSource, ModelSpec, SourceSpec

CACHE_ENV = "ATST_FEATURES_CACHE"
OTHER_FILE_ENV = "ATST_FEATURES_ALLOW_OTHER_FILE"  # "1": accept files that differ from their pin (opt-out)
PINS_NAME = "pins.json"  # first-use pins of the sources the manifest does not pin, in the cache
# The config fields that define the architecture: a converted file must match its manifest entry on these.
ARCH_FIELDS = ("family", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias")
ARCH_FIELDS += ("n_mels", "patch_h", "patch_w", "spec_w")
_TRUE = {"1", "ON", "YES", "TRUE"}
DOWNLOADS = "downloads"
LOCKS = ".locks"


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


def _in_cache(root: Path, *parts: str) -> Path:
    """``root/parts...``, checked to stay inside the cache (no ``..``, no link out) before it is written or removed."""
    path = root.joinpath(*parts)
    inside = path.resolve()
    base = root.resolve()
    if inside == base or not inside.is_relative_to(base):
        raise ManifestError(f"{str(path)!r} is not inside the cache {str(root)!r}: refused to write or remove it")
    return path


def _remove(root: Path, *parts: str) -> None:
    path = _in_cache(root, *parts)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _allow_other(value: bool | None) -> bool:
    """The opt-out: the argument when given, else ``$ATST_FEATURES_ALLOW_OTHER_FILE``."""
    if value is not None:
        return bool(value)
    return os.environ.get(OTHER_FILE_ENV, "").upper() in _TRUE


_OPT_OUT = (
    f"If you knowingly use another file, pass allow_other_file=True (`--allow-other-file`, or "
    f"{OTHER_FILE_ENV}=1)."
)


def _by_hand(spec: ModelSpec, target: Path | None) -> str:
    """How to get a model without this library's download: fetch the file, then convert it."""
    out = str(target) if target is not None else f"<cache>/{spec.name}"
    pages = [s.page_or_url for s in spec.sources] or ["(no source listed)"]
    return (
        f"To install {spec.name!r} by hand, download the file from {' or '.join(pages)} and run\n"
        f"    atst-features convert FILE {out}\n"
        f"(or, with network access, `atst-features download {spec.name}`)."
    )


# ---- pins


@dataclass(frozen=True)
class Pin:
    """What a source file must be: its size and sha256, and who pinned them ("manifest" or "first use")."""

    sha256: str
    size: int | None
    by: str


def _read_pins(root: Path) -> dict:
    """``pins.json``: name -> source URL -> {sha256, size, pinned_at, by}."""
    path = root / PINS_NAME
    if not path.is_file():
        return {}
    try:
        pins = json.loads(path.read_text(encoding="utf-8")).get("pins", {})
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise IntegrityError(f"{str(path)!r} is not a record of first-use pins ({e}); delete it to pin anew") from None
    if not isinstance(pins, dict):
        raise IntegrityError(f"{str(path)!r} is not a record of first-use pins; delete it to pin anew")
    return pins


def _pin_of(spec: ModelSpec, src: SourceSpec, root: Path) -> Pin | None:
    """The pin of a source: the manifest's, else the first-use one recorded in this cache, else none yet."""
    if src.pinned:
        return Pin(src.sha256, src.size, "the manifest")
    first = _read_pins(root).get(spec.name, {}).get(src.url)
    if isinstance(first, dict) and isinstance(first.get("sha256"), str):
        return Pin(first["sha256"], first.get("size"), f"its first use ({first.get('pinned_at', 'time unknown')}, {PINS_NAME})")
    return None


def _record_pin(root: Path, spec: ModelSpec, src: SourceSpec, sha256: str, size: int | None, how: str) -> None:
    """Pin an unpinned source to the file first accepted for it (never replacing a pin)."""
    from filelock import FileLock, Timeout

    locks = _in_cache(root, LOCKS)
    locks.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(locks / "pins.lock"), timeout=60):
            _add_pin(root, spec, src, sha256, size, how)
    except Timeout:
        raise DownloadError(f"another process holds {str(locks / 'pins.lock')!r} for more than 60 s") from None


def _add_pin(root: Path, spec: ModelSpec, src: SourceSpec, sha256: str, size: int | None, how: str) -> None:
    """``_record_pin`` under its lock: read ``pins.json``, add the pin unless one is there, write it back."""
    pins = _read_pins(root)
    known = pins.setdefault(spec.name, {}).get(src.url)
    if known is not None:
        if known.get("sha256") != sha256:
            raise IntegrityError(
                f"{spec.name!r} from {src.url} is pinned (first use) to sha256 {known.get('sha256')}, not {sha256}"
            )
        return
    pins[spec.name][src.url] = {"sha256": sha256, "size": size, "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "by": how}
    write_text_atomic(_in_cache(root, PINS_NAME), json.dumps({"format_version": 1, "pins": pins}, indent=2) + "\n")


def pin_status(name: str, *, cache_dir: str | os.PathLike | None = None, manifest: ManifestSource = None) -> str:
    """How the files of a named model are pinned: "pinned" (by the manifest, or its Hub block),
    "first-use: pinned here" (by the first verified download into this cache), "first-use" (not
    yet), or a combination for models with several sources ("pinned + first-use")."""
    spec = registry.get(name, manifest)
    if spec.hub.published:
        return "pinned (hub)"
    root = _cache_root(cache_dir)
    kinds = []
    for src in spec.sources:
        pin = _pin_of(spec, src, root)
        kind = "pinned" if src.pinned else ("first-use: pinned here" if pin else "first-use")
        if kind not in kinds:
            kinds.append(kind)
    return " + ".join(kinds) or "no source"


def _check_source_record(spec: ModelSpec, root: Path, record: Mapping, target: Path, allow_other: bool) -> None:
    """The file a cache entry was converted from must be the pinned file of one of the model's sources.

    A source without a pin yet is pinned by it (first use: a copy converted by hand), unless the
    copy was accepted with the opt-out (``"pinned": false`` in its record), which then needs the
    opt-out on every load too.
    """
    sha, url, name = record.get("sha256"), record.get("url"), spec.name
    sources = [s for s in spec.sources if s.url == url] or list(spec.sources)
    pins = [(s, _pin_of(spec, s, root)) for s in sources]
    if any(p is not None and p.sha256 == sha for _, p in pins):
        return
    unpinned = [s for s, p in pins if p is None]
    accepted_other = record.get("pinned") is False
    if unpinned and not accepted_other and not allow_other and isinstance(sha, str) and artifacts.SHA256_RE.fullmatch(sha):
        size = record.get("size") if isinstance(record.get("size"), int) else None
        try:
            _record_pin(root, spec, unpinned[0], sha, size, "first load of a converted copy")
        except OSError as e:  # a read-only (shared) cache: the copy is used, its pin not recorded
            warnings.warn(f"could not record the first-use pin of {name!r} in {str(root)!r}: {e}", stacklevel=4)
        return
    expected = ", ".join(f"{p.sha256} (pinned by {p.by})" for _, p in pins if p is not None)
    message = f"the cache entry {str(target)!r} was converted from a file with sha256 {sha}, " + (
        f"but {name!r} is pinned to {expected}" if expected else f"accepted with the opt-out: it is not pinned for {name!r}"
    )
    if allow_other:
        warnings.warn(message + "; used anyway, as other files are allowed", stacklevel=4)
        return
    raise IntegrityError(
        f"{message}. Delete it and run `atst-features download {name}` to get the pinned file. " + _OPT_OUT
    )


def _check_cache_entry(spec: ModelSpec, root: Path, target: Path, allow_other: bool) -> str:
    """A cached converted model: every file against its recorded sha256, the source it was converted
    from against the pins, the config against the manifest's. Returns the weights' sha256."""
    name = spec.name
    if not target.is_dir():
        raise IntegrityError(f"the cache entry {str(target)!r} is not a directory; delete it and run `atst-features download {name}`")
    if not verify_directory(target, f"Run `atst-features download {name} --force` to fetch and convert it anew."):
        raise IntegrityError(
            f"the cache entry {str(target)!r} has no {CHECKSUMS_NAME}; delete it and run `atst-features download {name}`"
        )
    record = artifacts.read_checksums(target)
    source = record.get("source") if isinstance(record.get("source"), Mapping) else {}
    _check_source_record(spec, root, source, target, allow_other)
    _check_config(spec, artifacts.read_config(target / CONFIG_NAME))
    formats = {f for s in spec.sources for f in s.formats}
    if formats and source.get("layout") not in formats:
        raise CheckpointError(
            f"the cache entry {str(target)!r} was converted from a {source.get('layout')!r} file, but {name!r} is "
            f"published as {sorted(formats)}; delete it and run `atst-features download {name}`"
        )
    return record["files"][WEIGHTS_NAME]


def _check_config(spec: ModelSpec, cfg: ATSTConfig) -> None:
    """The architecture fields of ``cfg`` (``ARCH_FIELDS``) against the manifest entry's config,
    and its front-end contract (``db_clamp``) against the entry's ``frontend``."""
    want = spec.config
    diff = {
        k: (getattr(cfg, k), want[k]) for k in ARCH_FIELDS if want.get(k) is not None and getattr(cfg, k) != want[k]
    }
    if "db_clamp" in spec.frontend:
        clamp = spec.frontend["db_clamp"]
        clamp = tuple(float(x) for x in clamp) if clamp is not None else None
        if cfg.db_clamp != clamp:
            diff["db_clamp"] = (cfg.db_clamp, clamp)
    if diff:
        raise CheckpointError(
            f"the file for {spec.name!r} holds a different model than the manifest describes: "
            + ", ".join(f"{k} {got!r} (manifest: {exp!r})" for k, (got, exp) in diff.items())
        )


