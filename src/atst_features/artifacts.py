"""Model directories on disk: reading official files, writing and reading converted ones.

A converted model is a directory with

- ``config.json``: an ``ATSTConfig``;
- ``model.safetensors``: the encoder in our parameter names;
- for fine-tuned checkpoints with a classifier, ``head.safetensors`` (official ``LinearHead``
  names; its level and whether it is multi-label in the file's metadata) and, when the class
  names are known, ``labels.json`` (a JSON list, score order);
- ``checksums.json``: the sha256 of each of these files and where the weights came from.

Reading a directory checks everything it loads: each of these files must be listed in
``checksums.json`` and match its sha256 (a present but unlisted one is refused); a directory
without ``checksums.json`` loads with a warning that it is unverified. The config must be in
range and the weights must have exactly its keys and shapes, finite, before a model is built.

Every file is written through ``atomic_write`` (a unique temporary file beside it, then
``os.replace``), so readers and concurrent writers never see a partial file. Official files are
read without running code (``read_checkpoint``) and turned into a directory by ``convert.py``
(``convert_checkpoint``). Nothing here downloads or builds a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import convert
from .atomic import atomic_write, write_text_atomic
from .errors import CheckpointError, IntegrityError, ModelNotFoundError
from .heads import LEVELS, ClassificationHead
from .model import ATSTConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKSUMS_NAME = "checksums.json"
HEAD_NAME = "head.safetensors"
LABELS_NAME = "labels.json"
HASH_CHUNK = 1 << 22  # bytes read at a time when hashing (4 MiB)
#: The files of a model directory that are read (everything else in the folder is left alone).
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME, LABELS_NAME)
SHA256_RE = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------- hashing and atomic writes


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file, as 64 lowercase hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str, way_out: str) -> None:
    """Raise ``IntegrityError`` (naming the file, both hashes and ``way_out``) unless ``path`` hashes to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(
            f"{str(path)!r} has sha256 {actual}, but {expected} is recorded for it: the file was changed or damaged. "
            f"{way_out}"
        )


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file, written atomically."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


# ---------------------------------------------------------------------------- checksums


def read_checksums(directory: str | os.PathLike) -> dict | None:
    """``directory/checksums.json`` (``{"files": {name: sha256}, "source": {...}}``), or ``None`` without one.

    Raises:
        IntegrityError: the record is not of that form.
    """
    record_path = Path(directory) / CHECKSUMS_NAME
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{str(record_path)!r} is not a JSON record of checksums: {e}") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and SHA256_RE.fullmatch(v) for k, v in files.items()
    ):
        raise IntegrityError(f"{str(record_path)!r} must hold {{\"files\": {{name: sha256}}, ...}}")
    return record


def verify_directory(directory: str | os.PathLike, way_out: str | None = None) -> bool:
    """Check a model directory against its ``checksums.json``; returns False when there is no such record.

    Every model file present (``MODEL_FILES``) must be listed, and every listed file must be
    present and match its sha256. ``way_out`` is the advice that ends the error message (how to get
    an intact copy).

    Raises:
        IntegrityError: naming the file (and both hashes), when a file differs from its record, is
            missing, or is present but not listed.
    """
    directory = Path(directory)
    record = read_checksums(directory)
    if record is None:
        return False
    way_out = way_out or "Convert the official file again."
    listed = record["files"]
    for fname in MODEL_FILES:
        if (directory / fname).exists() and fname not in listed:
            raise IntegrityError(
                f"{str(directory / fname)!r} is not listed in {CHECKSUMS_NAME}, so it is not loaded: it was not written "
                f"with the other files (it was put there later). Delete it if it does not belong. {way_out}"
            )
    for fname, expected in listed.items():
        if fname not in MODEL_FILES:
            raise IntegrityError(f"{str(directory / CHECKSUMS_NAME)!r} lists {fname!r}, which is not a model file")
        if not (directory / fname).is_file():
            raise IntegrityError(f"{str(directory / fname)!r} is listed in {CHECKSUMS_NAME} but missing. {way_out}")
        check_sha256(directory / fname, expected, way_out)
    return True


def check_pinned(directory: str | os.PathLike, pinned: Mapping[str, str], way_out: str) -> None:
    """Check the files of ``pinned`` (name -> sha256) in ``directory``; the others are not read.

    Raises:
        IntegrityError: a pinned file is missing or differs.
    """
    directory = Path(directory)
    for fname, expected in pinned.items():
        if not (directory / fname).is_file():
            raise IntegrityError(f"{str(directory / fname)!r} is pinned but missing. {way_out}")
        check_sha256(directory / fname, expected, way_out)


def _write_checksums(directory: Path, files: list[str], source: dict | None) -> None:
    record = {"files": {f: sha256_file(directory / f) for f in files}, "source": source}
    write_text_atomic(directory / CHECKSUMS_NAME, json.dumps(record, indent=2) + "\n")


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

    Raises:
        convert.CheckpointError: the file needs more than plain data, or cannot be read.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors checks its header and offsets against the file
            raise CheckpointError(f"cannot read {str(path)!r} as a safetensors file: {e}") from None
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(
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
        raise CheckpointError(
            f"cannot read {str(path)!r} as an ATST checkpoint: {e}\nOnly plain data is read from checkpoint files. "
            "If you trust this file and it needs more, load it yourself with torch.load and pass the dict to "
            "atst_features.convert.convert()."
        ) from None


# ---------------------------------------------------------------------------- heads and labels


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a JSON list (``.json``) or a text file with one name per line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{str(path)!r} is not JSON: {e}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise CheckpointError(f"{str(path)!r} must hold a JSON list of class names (strings)")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def save_head(
    state_dict: dict[str, torch.Tensor],
    level: str,
    directory: str | os.PathLike,
    labels: list[str] | None = None,
    multilabel: bool = True,
) -> list[str]:
    """Write ``head.safetensors`` (and ``labels.json``) to ``directory``; returns the file names written."""
    directory = Path(directory)
    num_classes = state_dict["linear.weight"].shape[0]
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for a head with {num_classes} classes")
    meta = {"format": "pt", "level": level, "multilabel": str(bool(multilabel)).lower()}
    _save_tensors(directory / HEAD_NAME, state_dict, meta)
    written = [HEAD_NAME]
    if labels is not None:
        write_text_atomic(directory / LABELS_NAME, json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
        written.append(LABELS_NAME)
    return written


def load_head(directory: str | os.PathLike, config: ATSTConfig | None = None) -> ClassificationHead | None:
    """The head stored in a converted model directory (in eval mode), or ``None`` when it has none.

    Its keys, shapes and values are checked (against ``config``'s width, when given) before it is built.

    Raises:
        CheckpointError: the head or its labels file is malformed, or labels come without a head.
    """
    directory = Path(directory)
    path = directory / HEAD_NAME
    if not path.is_file():
        if (directory / LABELS_NAME).is_file():
            raise CheckpointError(f"{str(directory)!r} has {LABELS_NAME} but no {HEAD_NAME}")
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state_dict = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {str(path)!r} as a safetensors file: {e}") from None
    level, multilabel = meta.get("level"), meta.get("multilabel", "true") == "true"
    if level not in LEVELS:
        raise CheckpointError(f"{str(path)!r} does not record its level ('clip' or 'frame') in its metadata")
    if config is not None:
        state_dict, _ = convert.convert_head(state_dict, config, level, HEAD_NAME + ":")
    labels = read_labels(directory / LABELS_NAME) if (directory / LABELS_NAME).is_file() else None
    try:
        return ClassificationHead.from_state_dict(state_dict, level, labels, multilabel)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a classification head: {e}") from None


# ---------------------------------------------------------------------------- writing converted models


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
    dict describing where the weights came from). Each file is written atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(out / WEIGHTS_NAME, state_dict, {"format": "pt"})
    write_text_atomic(out / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=2) + "\n")
    files = [CONFIG_NAME, WEIGHTS_NAME]
    for stale, present in ((HEAD_NAME, head is not None), (LABELS_NAME, labels is not None)):
        if not present and (out / stale).is_file():  # left by an earlier conversion into this directory
            (out / stale).unlink()
    if head is not None:
        files += save_head(head, head_level or "clip", out, labels, multilabel)
    _write_checksums(out, files, source)
    return out


def _source_record(path: Path, converted: convert.Converted, sha256: str | None, **extra) -> dict:
    return {
        "file": path.name,
        "size": path.stat().st_size,
        "sha256": sha256 or sha256_file(path),
        "layout": converted.layout,
        **extra,
    }


def write_converted(
    converted: convert.Converted,
    src: Path,
    out_dir: str | os.PathLike,
    labels: str | os.PathLike | list[str] | None = None,
    *,
    src_sha256: str | None = None,
    **provenance,
) -> Path:
    """Write ``convert.convert``'s result for the official file ``src`` as a model directory.

    ``labels``: the head's class names (a list or a labels file); ``src_sha256``: the sha256 of
    ``src`` when the caller has it (else it is hashed); ``provenance``: extra fields of the
    ``source`` record in ``checksums.json`` (e.g. the manifest name and URL).
    """
    if labels is None:
        labels = converted.labels
    elif not isinstance(labels, list):
        labels = read_labels(labels)
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
        source=_source_record(Path(src), converted, src_sha256, **provenance),
    )


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    family: str | None = None,
    num_heads: int | None = None,
    *,
    head_level: str | None = None,
    labels: str | os.PathLike | list[str] | None = None,
    depth: int | None = None,
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
        depth: the blocks the encoder must have (default: the official 12).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    src = Path(src)
    converted = convert.convert(
        read_checkpoint(src), family=family, num_heads=num_heads, head_level=head_level, depth=depth
    )
    return write_converted(converted, src, out_dir, labels)


# ---------------------------------------------------------------------------- reading converted models


@dataclass(frozen=True)
class ModelDir:
    """What a converted model directory holds.

    Attributes:
        config: the encoder's ``ATSTConfig``.
        state_dict: the encoder in our parameter names (as stored, CPU), checked against ``config``.
        head: the classification head (eval mode), or ``None``.
        weights_sha256: sha256 of ``model.safetensors`` (64 hex digits).
        directory: the directory that was read.
        verified: whether every file read was checked against a recorded or pinned sha256.
    """

    config: ATSTConfig
    state_dict: dict[str, torch.Tensor]
    head: ClassificationHead | None
    weights_sha256: str
    directory: Path
    verified: bool = True


def read_config(path: str | os.PathLike) -> ATSTConfig:
    """An ``ATSTConfig`` from a ``config.json``, every field checked.

    Raises:
        CheckpointError: the file is not JSON, or a field is unknown, of the wrong type or out of range.
    """
    try:
        return ATSTConfig.from_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a usable ATST config: {e}") from None


def read_weights(path: str | os.PathLike, config: ATSTConfig) -> dict[str, torch.Tensor]:
    """``model.safetensors`` for ``config``: exactly its keys and shapes, finite floats.

    Nothing is built and nothing beyond the file's own tensors is allocated before this passes.

    Raises:
        CheckpointError: naming the key, or the file is not a safetensors file.
    """
    try:
        state_dict = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {str(path)!r} as a safetensors file: {e}") from None
    convert.check_state_dict(state_dict, convert._encoder_shapes(config), f"{str(path)!r} (against its config.json)")
    return state_dict


def read_model_dir(
    directory: str | os.PathLike,
    verify: bool = True,
    *,
    weights_sha256: str | None = None,
    pinned: Mapping[str, str] | None = None,
    way_out: str | None = None,
) -> ModelDir:
    """Read a converted model directory (``config.json`` + ``model.safetensors`` [+ head files]).

    Args:
        directory: the directory.
        verify: check it against its ``checksums.json`` first (``verify_directory``); without one
            the files are read with a warning that they are unverified.
        weights_sha256: the weights' sha256 when the caller has just checked it (``weights.download``
            does). Otherwise it comes from ``checksums.json`` when verified, or the weights file is
            hashed once.
        pinned: file name -> sha256 from elsewhere (a manifest's Hub block): only these files are
            read, each checked; ``checksums.json`` and any other file are ignored.
        way_out: the advice that ends an integrity error (how to get an intact copy).

    Raises:
        ModelNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
        IntegrityError: a file differs from its record, or is present but not listed.
        CheckpointError: the config is out of range, or the weights or head do not match it.
    """
    directory = Path(directory)
    readable: Collection[str] = MODEL_FILES if pinned is None else [f for f in MODEL_FILES if f in pinned]
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if fname not in readable or not (directory / fname).is_file():
            raise ModelNotFoundError(
                f"{str(directory)!r} has no {fname}{'' if pinned is None else ' that is pinned'}; a converted model "
                f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    verified = False
    if pinned is not None:
        check_pinned(directory, pinned, way_out or "Fetch it again.")
        verified = True
        weights_sha256 = weights_sha256 or pinned[WEIGHTS_NAME]
    elif verify:
        verified = verify_directory(directory, way_out)
        if verified:
            weights_sha256 = weights_sha256 or read_checksums(directory)["files"][WEIGHTS_NAME]
        else:
            warnings.warn(
                f"{str(directory)!r} has no {CHECKSUMS_NAME}: its files are loaded UNVERIFIED (nothing says they are "
                "the ones that were converted). Convert the official file again to get a verified directory.",
                stacklevel=3,
            )
    config = read_config(directory / CONFIG_NAME)
    state_dict = read_weights(directory / WEIGHTS_NAME, config)
    head = None
    if HEAD_NAME in readable:
        head = load_head(directory, config)
    elif pinned is not None and LABELS_NAME in pinned:
        raise CheckpointError(f"the pinned files of {str(directory)!r} have {LABELS_NAME} but no {HEAD_NAME}")
    return ModelDir(
        config=config,
        state_dict=state_dict,
        head=head,
        weights_sha256=weights_sha256 or sha256_file(directory / WEIGHTS_NAME),
        directory=directory,
        verified=verified,
    )
