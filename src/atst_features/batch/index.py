"""What a folder run records: the settings key, ``metadata.json``, ``index.jsonl`` rows, and the
``BatchSummary`` it returns.

A rerun skips an input whose latest index row is ``ok`` / ``skipped`` with the same size, mtime
and settings key, and whose output is the file the row describes (``up_to_date``): a regular
file, not a link, of the recorded size and digest (``output_digest``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ..version import __version__
from ..atomic import open_no_follow, read_at
from ..audio import PathLike
from ..embed import ATSTModel
from ..pieces import SourceInfo
from .discovery import InputFile

INDEX_NAME = "index.jsonl"
METADATA_NAME = "metadata.json"
FORMAT_VERSION = 1  # bump when the content of the .npz files changes
STATUS_OK, STATUS_SKIPPED, STATUS_FAILED = "ok", "skipped", "failed"
DIGEST_SPAN = 1 << 16  # bytes hashed at each end of an output (64 kB)


@dataclass(frozen=True)
class Settings:
    """Everything that changes the content of an output file; its ``key`` is stored in every index row."""

    model: str
    weights_sha256: str
    config: dict
    what: tuple[str, ...]
    clip_layers: tuple[int, ...]
    frame_layers: tuple[int, ...]
    compute_dtype: str
    frames_dtype: str
    head: str | None = None  # sha256 of the head's tensors when the outputs are its scores
    hop_tokens: int | None = None  # overlapping windows of the frames (``embed_frames(hop_s=...)``)
    backend: str | None = None  # ``ATSTModel.backend`` when it is not torch (ONNX Runtime's outputs differ by rounding)

    @property
    def key(self) -> str:
        """16 hex digits of the sha256 of the settings (without the model's name) and ``FORMAT_VERSION``;
        the optional settings count only when set, so runs without them keep their keys."""
        content = {k: v for k, v in self.__dict__.items() if k != "model" and not (k in _OPTIONAL and v is None)}
        content["format"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


_OPTIONAL = ("head", "hop_tokens", "backend")


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for key, tensor in sorted(state_dict.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(model: ATSTModel) -> tuple[str, str]:
    """(sha256, what was hashed) of a model's weights.

    ``model.weights_sha256``, the sha256 of the weights file the loader read, when it is known;
    otherwise (a model built in memory) the state dict's tensors: names, dtypes, shapes and bytes,
    in name order.
    """
    if model.weights_sha256 is not None:
        return model.weights_sha256, "weights file"
    return tensors_sha256(model.encoder.state_dict()), "state dict tensors"


def metadata(settings: Settings, hashed: str, source: str | None, input: str, stream_seconds: float) -> dict:
    """The contents of ``metadata.json``; ``hashed`` from ``weights_sha256``, ``source`` = ``ATSTModel.source``."""
    return {
        "package": "atst-features",
        "package_version": __version__,
        "format_version": FORMAT_VERSION,
        "settings_key": settings.key,
        "model": settings.model,
        "source": source,  # where the weights were resolved to, None for a model built in memory
        "weights_sha256": settings.weights_sha256,
        "weights_hashed": hashed,
        "config": settings.config,
        "what": list(settings.what),
        "clip_layers": list(settings.clip_layers),
        "frame_layers": list(settings.frame_layers),
        "compute_dtype": settings.compute_dtype,
        "frames_dtype": settings.frames_dtype,
        **{k: getattr(settings, k) for k in _OPTIONAL if getattr(settings, k) is not None},
        "arrays": {
            "clip": "float32 (C,): the official clip embedding of clip_layers",
            "frames": f"{settings.frames_dtype} (T', len(frame_layers) * embed_dim), one row per 40 ms token",
            "timestamps": "float64 (T',) seconds, start of each token",
        } if settings.head is None else {
            "scores": "float32 (T', classes): the frame-level head's scores of the last block, one row per 40 ms token",
            "timestamps": "float64 (T',) seconds, start of each token",
            "labels": "str (classes,): the class names in score order (empty when unknown)",
        },
        "input": input,
        "stream_seconds": stream_seconds,  # longer files were decoded in blocks (same result)
    }


# ============================================================================ index files


def index_name(shard: tuple[int, int] | None) -> str:
    """The index file a run writes: ``index.jsonl``, or ``index.shard-i-of-N.jsonl`` for shard (i, N)."""
    return INDEX_NAME if shard is None else f"index.shard-{shard[0]}-of-{shard[1]}.jsonl"


def open_no_follow_text(path: Path) -> TextIO | None:
    """A regular file opened for reading UTF-8 text, or None when it is missing or is a link (never followed)."""
    try:
        fd = open_no_follow(path, os.O_RDONLY)
    except OSError:  # missing, a link (ELOOP), unreadable
        if os.path.lexists(path) and not os.path.islink(path):
            raise
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, encoding="utf-8", errors="replace")


def _rows(path: Path) -> Iterator[dict]:
    """The rows of one index file that are JSON objects with a ``path``; others (a truncated last line)
    are skipped, and so is an index that is a link."""
    f = open_no_follow_text(path)
    if f is None:
        return
    with f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("path"), str):
                yield row


def read_index(out: PathLike) -> dict[str, dict]:
    """The latest row per input path over every index file in ``out`` (``index*.jsonl``).

    Rows are JSON objects; a truncated last line (a killed run) is ignored.
    """
    rows: dict[str, dict] = {}
    for path in sorted(Path(out).glob("index*.jsonl")):
        for row in _rows(path):
            old = rows.get(row["path"])
            if old is None or row.get("time", 0) >= old.get("time", 0):
                rows[row["path"]] = row
    return rows


def index_paths(path: Path) -> set[str]:
    """The input paths an index file has rows for (none when it does not exist)."""
    return {row["path"] for row in _rows(path)}


def output_digest(fd: int) -> tuple[int, str]:
    """(size in bytes, sha256 hex of the size and the first and last 64 kB) of an open file.

    Cheap (at most 128 kB read) and enough for an ``.npz``: its end holds the zip's central
    directory, with the CRC-32 of every array, so rewritten content changes the digest.
    """
    size = os.fstat(fd).st_size
    h = hashlib.sha256(str(size).encode())
    h.update(read_at(fd, DIGEST_SPAN, 0))
    h.update(read_at(fd, DIGEST_SPAN, max(0, size - DIGEST_SPAN)))
    return size, h.hexdigest()


def output_matches(out: Path, row: dict) -> bool:
    """Whether the output an ``ok`` / ``skipped`` row names is in ``out`` as the row recorded it:
    a regular file (not a link) with the row's ``output_size`` and ``output_digest``."""
    output, size, digest = row.get("output"), row.get("output_size"), row.get("output_digest")
    if not isinstance(output, str) or size is None or digest is None:
        return False
    try:
        fd = open_no_follow(out / output, os.O_RDONLY)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and output_digest(fd) == (size, digest)
    except OSError:
        return False
    finally:
        os.close(fd)


def up_to_date(row: dict | None, f: InputFile, key: str, out: Path) -> bool:
    """Whether ``f``'s output in ``out`` is current: same size, mtime and settings ``key`` as its
    row, and the output the row describes (``output_matches``)."""
    return (
        row is not None
        and row.get("status") in (STATUS_OK, STATUS_SKIPPED)
        and row.get("size") == f.size
        and row.get("mtime_ns") == f.mtime_ns
        and row.get("settings") == key
        and row.get("output") == f.output
        and output_matches(out, row)
    )


def index_row(
    f: InputFile,
    key: str,
    info: SourceInfo | None,
    n_frames: int | None,
    error: str | None,
    digest: tuple[int, str] | None = None,
) -> dict:
    """The index row of an input just embedded (``error`` None; ``digest`` = ``output_digest`` of
    its output) or failed."""
    status = STATUS_FAILED if error else STATUS_OK
    size, digest = digest if status == STATUS_OK and digest is not None else (None, None)
    return {
        "path": f.rel,
        "status": status,
        "duration": info.duration if info else None,
        "sample_rate": info.sample_rate if info else None,
        "channels": info.channels if info else None,
        "n_frames": n_frames,
        "output": f.output if status == STATUS_OK else None,
        "output_size": size,
        "output_digest": digest,
        "error": error,
        "size": f.size,
        "mtime_ns": f.mtime_ns,
        "settings": key,
        "time": time.time(),
    }


# ============================================================================ the summary


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters, undecodable bytes (surrogates) and other
    non-printable characters escaped as ``repr`` does (``\\x1b``, ``\\udcff``); the rest unchanged."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@dataclass
class BatchSummary:
    """What a folder run did.

    Attributes:
        ok: files embedded by this run.
        skipped: files whose output was already up to date.
        failed: files that could not be embedded (listed in ``failures`` and the index).
        ignored: files without an audio extension.
        failures: (relative path, error message) per failed file.
        audio_seconds: duration of the audio embedded by this run, in seconds.
        wall_seconds: duration of the run.
        out_dir, index_path: where the outputs and this run's index are.
        aborted: why the run stopped early (disk full, interrupted, worker crash), else None.
        rows: this run's index rows by relative path (every input of the run: ok, skipped, failed).
        inputs: each input's path by relative path.
    """

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    ignored: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    out_dir: Path | None = None
    index_path: Path | None = None
    aborted: str | None = None
    rows: dict[str, dict] = field(default_factory=dict, repr=False)
    inputs: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def exit_status(self) -> int:
        """0 when every input is embedded (now or before), 1 otherwise."""
        return 1 if self.failed or self.aborted else 0

    def __str__(self) -> str:
        speed = ""
        if self.ok and self.wall_seconds > 0:
            speed = f" ({self.ok / self.wall_seconds:.1f} files/s, {self.audio_seconds / 3600 / self.wall_seconds:.3f} audio h/s)"
        text = (
            f"{self.ok} embedded, {self.skipped} skipped (up to date), {self.failed} failed, "
            f"{self.ignored} ignored (not audio) in {self.wall_seconds:.1f} s{speed}"
        )
        return text + (f"; stopped early: {self.aborted}" if self.aborted else "")
