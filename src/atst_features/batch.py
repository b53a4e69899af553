"""Embed a folder of audio files: resumable, failure-tolerant, batched, shardable.

``embed_folder(INPUT, OUT)`` (and the ``atst-features embed`` command over it) writes one
``.npz`` per input file under OUT, mirroring the input tree (``a/b.wav`` -> ``OUT/a/b.wav.npz``),
with the arrays

- ``clip``: (C,) float32 clip vector (``ATSTModel.embed_clip`` of the clip layers);
- ``frames``: (T', L * D) frame embeddings, float16 by default (``ATSTModel.embed_frames``);
- ``timestamps``: (T',) float64 seconds, the start of each 40 ms token;

plus ``OUT/index.jsonl`` (one JSON row per input: status ``ok`` | ``skipped`` | ``failed`` and
what is known of it) and ``OUT/metadata.json`` (model, weights hash, layers, dtypes, version).

How it stays fast and safe:

- Decoding and resampling run in ``torch.utils.data.DataLoader`` workers; files are processed in
  order of size so neighbours in a batch have similar lengths; chunks of several files share an
  encoder batch; on CUDA the pieces come through pinned memory with non-blocking copies.
- Every output is written to ``NAME.npz.partial`` and renamed with ``os.replace``, so a killed
  run never leaves a truncated ``.npz``. A rerun skips inputs whose row in the index is ``ok``
  with the same size, mtime and settings, and whose output exists.
- A file that cannot be decoded is recorded as ``failed`` with its error and the run goes on;
  CUDA out-of-memory halves the batch and retries; a full disk stops the run cleanly.
- Files longer than ``stream_seconds`` are decoded in blocks, twice: a first pass finds the
  loudest mel frame (the 80 dB floor of the front end is taken over the whole file), a second
  embeds windows of whole 1001-frame chunks, each computed from its samples plus the 512-sample
  STFT context. Memory stays bounded and the result equals the whole-file API.

A window's mel is made from the front end's parts (``frontend.mel_db``, ``frontend.normalise``)
rather than ``frontend.log_mel``, because ``log_mel`` takes the 80 dB floor over the frames it is
given, and a window is not the whole file: the floor comes from the whole file's peak.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr
import torch

from . import __version__, audio, frontend, pooling, weights
from .embed import COMPUTE_DTYPES, DEFAULT_MODEL, ATSTModel, Layers, check_batch_size, resolve_dtype, resolve_layers

PathLike = str | os.PathLike

#: Extensions of files that are embedded (case-insensitive); every other file is ignored.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64"}
)
#: An INPUT ending in one of these (or written ``@FILE``) is a list of paths, one per line.
LIST_EXTENSIONS = (".txt", ".lst", ".list")
INDEX_NAME = "index.jsonl"
METADATA_NAME = "metadata.json"
OUTPUT_SUFFIX = ".npz"
PARTIAL_SUFFIX = ".partial"
WHAT = ("clip", "frames")
FORMAT_VERSION = 1  # bump when the content of the .npz files changes

STATUS_OK, STATUS_SKIPPED, STATUS_FAILED = "ok", "skipped", "failed"
_STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_BLOCK_FRAMES = 1 << 18  # source frames per read when streaming a long file
_GROUP_FILES = 8  # decoded files a worker sends at once (one transfer, one copy to the device)
_GROUP_SAMPLES = 1 << 22  # ... or fewer, when their samples reach this


# ============================================================================ inputs and shards


@dataclass(frozen=True)
class InputFile:
    """One audio file to embed.

    Attributes:
        path: absolute path.
        rel: POSIX path relative to the input root; the output is ``OUT/rel + ".npz"``.
        size: bytes (-1 when the file is missing).
        mtime_ns: modification time in ns (-1 when missing).
    """

    path: Path
    rel: str
    size: int
    mtime_ns: int

    @property
    def output(self) -> str:
        return self.rel + OUTPUT_SUFFIX


def is_audio_path(path: PathLike) -> bool:
    """Whether a file is embedded, judged by its extension (``AUDIO_EXTENSIONS``); hidden files never are."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def _stat(path: Path, rel: str) -> InputFile:
    try:
        st = path.stat()
        return InputFile(path, rel, st.st_size, st.st_mtime_ns)
    except OSError:
        return InputFile(path, rel, -1, -1)


def _list_file(source: str) -> Path | None:
    if source.startswith("@"):
        return Path(source[1:])
    return Path(source) if source.lower().endswith(LIST_EXTENSIONS) else None


def find_inputs(source: PathLike, exclude: PathLike | None = None) -> tuple[list[InputFile], int]:
    """The audio files named by ``source``, sorted by relative path, and the number of files ignored.

    Args:
        source: a folder (searched recursively, hidden entries skipped), an audio file, or a list
            file: a path written ``@FILE`` or ending in .txt / .lst / .list, holding one path per
            line (blank lines and lines starting with ``#`` are skipped; relative paths are taken
            from the list file's folder). Listed files keep paths relative to the deepest folder
            that holds them all.
        exclude: a folder not to search (the output folder, when it lies inside ``source``).

    Returns:
        (files, ignored): files with an audio extension; ``ignored`` counts the other files.

    Raises:
        FileNotFoundError: ``source`` (or the list file) does not exist.
        ValueError: a single file that is neither audio nor a list.
    """
    source = os.fspath(source)
    listed = _list_file(source)
    if listed is not None:
        if not listed.is_file():
            raise FileNotFoundError(f"list file {str(listed)!r} does not exist")
        paths = []
        for line in listed.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line).expanduser()
                paths.append((p if p.is_absolute() else listed.parent / p).resolve())
        paths = list(dict.fromkeys(paths))
        audio_paths = [p for p in paths if is_audio_path(p)]
        root = Path(os.path.commonpath([str(p.parent) for p in audio_paths])) if audio_paths else listed.parent
        files = [_stat(p, p.relative_to(root).as_posix()) for p in audio_paths]
        return sorted(files, key=lambda f: f.rel), len(paths) - len(audio_paths)
    path = Path(source).resolve()
    if path.is_file():
        if not is_audio_path(path):
            raise ValueError(
                f"{source!r} is neither an audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}) nor a list file "
                f"(@FILE or {', '.join(LIST_EXTENSIONS)})"
            )
        return [_stat(path, path.name)], 0
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {source!r}")
    skip = Path(exclude).resolve() if exclude is not None else None
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d != skip)
        for name in filenames:
            if is_audio_path(name):
                files.append(_stat(here / name, (here / name).relative_to(path).as_posix()))
            else:
                ignored += 1
    return sorted(files, key=lambda f: f.rel), ignored


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/N"`` or ``(i, N)`` -> (i, N) with 0 <= i < N; ``None`` -> ``None`` (no sharding)."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in (spec.split("/") if isinstance(spec, str) else spec))
    except (ValueError, TypeError):
        raise ValueError(f"shard must be 'i/N' with 0 <= i < N (e.g. '0/4'), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard must be 'i/N' with 0 <= i < N (e.g. '0/4'), got {spec!r}")
    return i, n


def shard_of(rel: str, n: int) -> int:
    """The shard (0..n-1) of a relative path: a stable hash (SHA-1) of the path, the same on every machine."""
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big") % n


# ============================================================================ settings, metadata, index


@dataclass(frozen=True)
class _Settings:
    """Everything that changes the content of an output file; its ``key`` is stored in every index row."""

    model: str
    weights_sha256: str
    config: dict
    what: tuple[str, ...]
    clip_layers: tuple[int, ...]
    frame_layers: tuple[int, ...]
    compute_dtype: str
    frames_dtype: str

    @property
    def key(self) -> str:
        content = {k: v for k, v in self.__dict__.items() if k != "model"}
        content["format"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def weights_sha256(model: ATSTModel) -> tuple[str, str]:
    """(sha256, what was hashed) of a model's weights.

    The weights file when the model was loaded from one (a converted directory's
    ``model.safetensors``, a checkpoint file, or a cached named model); otherwise the state dict's
    tensors (names, dtypes, shapes and bytes, in name order).
    """
    name = model.name or ""
    candidates = [Path(name) / weights.WEIGHTS_NAME, Path(name), weights.cache_dir() / name / weights.WEIGHTS_NAME] if name else []
    for path in candidates:
        if path.is_file():
            return weights.sha256_file(path), f"file {path.name}"
    h = hashlib.sha256()
    for key, tensor in sorted(model.encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), "state dict tensors"


def _index_name(shard: tuple[int, int] | None) -> str:
    return INDEX_NAME if shard is None else f"index.shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_index(out: PathLike) -> dict[str, dict]:
    """The latest row per input path over every index file in ``out`` (``index*.jsonl``).

    Rows are JSON objects; a truncated last line (a killed run) is ignored.
    """
    rows: dict[str, dict] = {}
    for path in sorted(Path(out).glob("index*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("path"), str):
                    continue
                old = rows.get(row["path"])
                if old is None or row.get("time", 0) >= old.get("time", 0):
                    rows[row["path"]] = row
    return rows


def _up_to_date(row: dict | None, f: InputFile, key: str, out: Path) -> bool:
    return (
        row is not None
        and row.get("status") in (STATUS_OK, STATUS_SKIPPED)
        and row.get("size") == f.size
        and row.get("mtime_ns") == f.mtime_ns
        and row.get("settings") == key
        and (out / f.output).is_file()
    )


# ============================================================================ the front end on windows


def _reflect_indices(lo: int, hi: int, n_total: int | None) -> np.ndarray:
    """Sample indices [lo, hi) of the reflect-padded waveform (``center=True``) mapped into [0, n_total)."""
    idx = np.abs(np.arange(lo, hi, dtype=np.int64))  # left edge: sample -i is sample i
    if n_total is not None:
        over = idx >= n_total
        idx[over] = 2 * (n_total - 1) - idx[over]
    return idx


def _sample_range(first_frame: int, n_frames: int) -> tuple[int, int]:
    """Samples [lo, hi) that mel frames [first_frame, first_frame + n_frames) are computed from.

    Frame f is centred at sample f * HOP_LENGTH and spans N_FFT samples, so the range is
    N_FFT // 2 samples wider than the frame centres on each side (lo < 0 or hi > N at the edges,
    where the front end reflects). hi - lo = HOP_LENGTH * (n_frames - 1) + N_FFT.
    """
    half = frontend.N_FFT // 2
    return first_frame * frontend.HOP_LENGTH - half, (first_frame + n_frames - 1) * frontend.HOP_LENGTH + half


def window_log_mel(segments: list[torch.Tensor], n_frames: list[int], peak_db: list[float | None]) -> list[torch.Tensor]:
    """Normalised log-mel of windows of files, equal to the matching frames of ``frontend.log_mel(whole file)``.

    Args:
        segments: per window, the samples ``_sample_range`` names (already reflected at file edges),
            float32 at 16 kHz, on one device.
        n_frames: mel frames per window.
        peak_db: per window, the loudest dB of the whole file, or ``None`` when the window is the
            whole file (the peak is then taken over its own frames).

    Returns:
        per window a (N_MELS, n_frames) float32 tensor.
    """
    batch = torch.nn.utils.rnn.pad_sequence(segments, batch_first=True)  # (B, S)
    db = frontend.mel_db(batch)  # (B, M, T)
    own = frontend.peak_db(db, torch.tensor(n_frames))  # (B,)
    given = torch.tensor([math.nan if p is None else p for p in peak_db], dtype=torch.float32, device=db.device)
    mel = frontend.normalise(db, torch.where(torch.isnan(given), own, given))
    return [mel[i, :, :n] for i, n in enumerate(n_frames)]


# ============================================================================ decoding (DataLoader workers)


@dataclass(frozen=True)
class _PlanSpec:
    """What the workers need of the model to cut a file into encoder chunks."""

    spec_w: int
    patch_w: int
    clip_chunk_frames: int
    frame_plan: bool  # frames wanted, or an ATST-Frame clip vector (pooled from the same chunks)
    clip_plan: bool  # an ATST-Clip clip vector (its own 601-frame chunks)

    def chunks(self, idx: int, n_mel_frames: int) -> tuple[list[pooling.Chunk], list[pooling.Chunk]]:
        frame = pooling.frame_chunks(idx, n_mel_frames, self.spec_w, self.patch_w) if self.frame_plan else []
        clip = pooling.clip_chunks(idx, n_mel_frames, self.clip_chunk_frames, self.patch_w) if self.clip_plan else []
        return frame, clip


@dataclass
class _SourceInfo:
    """What is known of a decoded file; travels with its first piece."""

    duration: float  # seconds, at the file's own rate
    sample_rate: int  # Hz, the file's own
    channels: int
    n_samples: int  # at 16 kHz, mono
    frame_chunks: list[pooling.Chunk]
    clip_chunks: list[pooling.Chunk]


@dataclass
class _Piece:
    """A window of a decoded file: samples for mel frames [first_frame, first_frame + n_frames)."""

    idx: int
    segment: torch.Tensor  # (HOP_LENGTH * (n_frames - 1) + N_FFT,) float32, 16 kHz
    first_frame: int
    n_frames: int
    peak_db: float | None  # the whole file's loudest dB; None when the piece is the whole file
    chunks: list[tuple[str, pooling.Chunk]]  # ("frame" | "clip", chunk) encoded from this piece
    info: _SourceInfo | None = None  # on the file's first piece


@dataclass
class _Failure:
    idx: int
    error: str


def _windows(
    frame_chunks: list[pooling.Chunk], clip_chunks: list[pooling.Chunk], window_frames: int
) -> list[tuple[int, int, list[tuple[str, pooling.Chunk]]]]:
    """Group chunks into windows by start frame: [(first frame, frames, chunks)], in order.

    Window w holds the chunks starting in [w * window_frames, (w + 1) * window_frames) and
    spans their frames (an ATST-Clip chunk may reach past the window's end).
    """
    groups: dict[int, list[tuple[str, pooling.Chunk]]] = defaultdict(list)
    for kind, chunks in (("frame", frame_chunks), ("clip", clip_chunks)):
        for c in chunks:
            groups[c.start // window_frames].append((kind, c))
    out = []
    for w in sorted(groups):
        first = min(c.start for _, c in groups[w])
        end = max(c.start + c.frames for _, c in groups[w])
        out.append((first, end - first, groups[w]))
    return out


class _SampleBuffer:
    """Consecutive 16 kHz samples of a stream, from global position ``start``."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.start = 0
        self.end = 0

    def append(self, block: np.ndarray) -> None:
        self.blocks.append(block)
        self.end += block.shape[0]

    def take(self, idx: np.ndarray) -> np.ndarray:
        if len(self.blocks) > 1:
            self.blocks = [np.concatenate(self.blocks)]
        if idx.size and (idx.min() < self.start or idx.max() >= self.end):
            raise RuntimeError(f"samples {idx.min()}..{idx.max()} are not buffered ({self.start}..{self.end})")
        return self.blocks[0][idx - self.start]

    def discard_before(self, pos: int) -> None:
        k = min(max(0, pos - self.start), self.end - self.start)
        if k:
            data = np.concatenate(self.blocks) if len(self.blocks) > 1 else self.blocks[0]
            self.blocks = [data[k:]]
            self.start += k


def _stream_blocks(path: Path) -> Iterator[np.ndarray]:
    """Decode a file block by block to mono float32 at 16 kHz, as ``audio.load_audio`` would (soxr HQ)."""
    with sf.SoundFile(str(path)) as f:
        rs = None
        if f.samplerate != frontend.SAMPLE_RATE:
            rs = soxr.ResampleStream(f.samplerate, frontend.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        while True:
            data = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (n, C)
            last = data.shape[0] < _BLOCK_FRAMES
            mono = data.mean(axis=1, dtype=np.float32)
            if rs is not None:
                mono = rs.resample_chunk(mono, last=last)
            if not np.isfinite(mono).all():
                raise ValueError(f"{str(path)!r} contains NaN or Inf samples")
            yield mono
            if last:
                return


def _stream_peak(path: Path, window_frames: int) -> tuple[int, float]:
    """First pass over a long file: (samples at 16 kHz, loudest mel-frame dB), in bounded memory."""
    buf, peak, next_frame = _SampleBuffer(), -math.inf, 0
    for block in _stream_blocks(path):
        buf.append(block)
        while buf.end >= _sample_range(next_frame, window_frames)[1]:  # the window is inside the file
            seg = buf.take(_reflect_indices(*_sample_range(next_frame, window_frames), None))
            peak = max(peak, float(frontend.mel_db(torch.from_numpy(seg)[None]).max()))
            next_frame += window_frames
            buf.discard_before(_sample_range(next_frame, 1)[0])
    n_samples = buf.end
    n_mel = frontend.num_frames(n_samples)
    while next_frame < n_mel:  # the file's tail, reflected at its end
        n = min(window_frames, n_mel - next_frame)
        seg = buf.take(_reflect_indices(*_sample_range(next_frame, n), n_samples))
        peak = max(peak, float(frontend.mel_db(torch.from_numpy(seg)[None]).max()))
        next_frame += n
    return n_samples, peak


def _whole_piece(idx: int, wav: torch.Tensor, spec: _PlanSpec, info: dict) -> _Piece:
    """A decoded waveform (N,) at 16 kHz as the single piece of its file."""
    n_samples = wav.shape[0]
    n_mel = frontend.num_frames(n_samples)
    frame_chunks, clip_chunks = spec.chunks(idx, n_mel)
    lo, hi = _sample_range(0, n_mel)  # lo = -N_FFT // 2: the front end's reflect padding on both sides
    x = wav.numpy()
    segment = torch.from_numpy(np.concatenate([x[-lo:0:-1], x, x[-2 : -2 + lo : -1]])[: hi - lo])
    chunks = [("frame", c) for c in frame_chunks] + [("clip", c) for c in clip_chunks]
    source = _SourceInfo(n_samples=n_samples, frame_chunks=frame_chunks, clip_chunks=clip_chunks, **info)
    return _Piece(idx, segment, 0, n_mel, None, chunks, source)


def _streamed_pieces(idx: int, path: Path, spec: _PlanSpec, info: dict, window_frames: int) -> Iterator[_Piece]:
    """A long file as windows of whole chunks (two passes, bounded memory)."""
    n_samples, peak = _stream_peak(path, window_frames)
    if n_samples < frontend.MIN_SAMPLES:
        raise ValueError(f"{str(path)!r} holds {n_samples} samples at 16 kHz; at least {frontend.MIN_SAMPLES} are needed")
    frame_chunks, clip_chunks = spec.chunks(idx, frontend.num_frames(n_samples))
    source = _SourceInfo(n_samples=n_samples, frame_chunks=frame_chunks, clip_chunks=clip_chunks, **info)
    windows = _windows(frame_chunks, clip_chunks, window_frames)
    blocks, buf = _stream_blocks(path), _SampleBuffer()
    for w, (first, n, chunks) in enumerate(windows):
        idxs = _reflect_indices(*_sample_range(first, n), n_samples)
        while buf.end <= idxs.max():
            block = next(blocks, None)
            if block is None:
                raise ValueError(f"{str(path)!r} changed while it was read (fewer samples on the second pass)")
            buf.append(block)
        yield _Piece(idx, torch.from_numpy(buf.take(idxs)), first, n, peak, chunks, source if w == 0 else None)
        if w + 1 < len(windows):
            buf.discard_before(_sample_range(windows[w + 1][0], 1)[0])


def _decode(idx: int, path: Path, spec: _PlanSpec, stream_seconds: float, window_frames: int) -> Iterator[_Piece | _Failure]:
    """One file -> its pieces, or a ``_Failure`` carrying the error (never raises)."""
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no audio file at {str(path)!r}")
        try:
            header = sf.info(str(path))
        except Exception as e:  # libsndfile reports empty, truncated and unknown files alike
            reason = str(e).split("': ", 1)[-1]  # drop libsndfile's "Error opening 'PATH': "
            raise ValueError(f"cannot decode {str(path)!r} as audio ({reason})") from None
        info = {"duration": header.frames / header.samplerate, "sample_rate": header.samplerate, "channels": header.channels}
        if header.frames / header.samplerate <= stream_seconds:
            wav = audio.prepare_waveform(audio.load_audio(path), frontend.SAMPLE_RATE, str(path))
            yield _whole_piece(idx, wav, spec, info)
        else:
            yield from _streamed_pieces(idx, path, spec, info, window_frames)
    except (ValueError, TypeError, FileNotFoundError) as e:  # messages that say what was wrong
        yield _Failure(idx, str(e))
    except Exception as e:
        yield _Failure(idx, f"{type(e).__name__}: {e}")


@dataclass
class _Group:
    """What a worker sends: pieces and failures of a few files, in order, with the pieces' samples
    back to back in one tensor (one transfer between processes, one pinned copy to the device)."""

    samples: torch.Tensor  # (S,) float32
    spans: list[tuple[int, int]]  # (offset, length) of each piece's segment in ``samples``
    items: list[_Piece | _Failure]  # pieces' segments are detached while in transit

    @classmethod
    def pack(cls, items: list[_Piece | _Failure]) -> "_Group":
        pieces = [x for x in items if isinstance(x, _Piece)]
        lengths = [p.segment.shape[0] for p in pieces]
        offsets = np.cumsum([0, *lengths[:-1]]).tolist()
        samples = torch.from_numpy(np.concatenate([p.segment.numpy() for p in pieces] or [np.zeros(0, np.float32)]))
        for p in pieces:
            p.segment = None
        return cls(samples, list(zip(offsets, lengths)), items)

    def pin_memory(self) -> "_Group":
        self.samples = self.samples.pin_memory()
        return self

    def unpack(self, device: torch.device) -> list[_Piece | _Failure]:
        """The items; each piece's segment a view of the samples moved to ``device`` (non-blocking from pinned memory)."""
        samples = self.samples.to(device, non_blocking=True)
        spans = iter(self.spans)
        for item in self.items:
            if isinstance(item, _Piece):
                offset, length = next(spans)
                item.segment = samples[offset : offset + length]
        return self.items


class _DecodeDataset(torch.utils.data.IterableDataset):
    """Decodes files into groups of pieces; worker k of W takes files k, k + W, ... (sorted by size)."""

    def __init__(self, files: list[tuple[int, Path]], spec: _PlanSpec, stream_seconds: float, window_frames: int):
        self.files, self.spec = files, spec
        self.stream_seconds, self.window_frames = stream_seconds, window_frames

    def __iter__(self) -> Iterator[_Group]:
        worker = torch.utils.data.get_worker_info()
        k, n = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        items: list[_Piece | _Failure] = []
        files = samples = 0
        for idx, path in self.files[k::n]:
            files += 1
            for item in _decode(idx, path, self.spec, self.stream_seconds, self.window_frames):
                items.append(item)
                samples += item.segment.shape[0] if isinstance(item, _Piece) else 0
                if samples >= _GROUP_SAMPLES:  # a long file's windows go one by one
                    yield _Group.pack(items)
                    items, files, samples = [], 0, 0
            if files >= _GROUP_FILES:
                yield _Group.pack(items)
                items, files, samples = [], 0, 0
        if items:
            yield _Group.pack(items)


# ============================================================================ outputs


class _DiskFull(OSError):
    """Writing an output failed for lack of space: the run stops (a rerun resumes)."""


class _MemorySink:
    """Keeps a file's outputs in memory (``Embedder.embed``)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.result: EmbedResult | None = None

    def write_frames(self, rows: np.ndarray) -> None:
        self.frames.append(rows)

    def finish(self, clip: np.ndarray | None, frames_dim: int | None, dtype, timestamps: np.ndarray | None) -> None:
        frames = None
        if frames_dim is not None:
            frames = np.concatenate(self.frames) if self.frames else np.zeros((0, frames_dim), dtype)
        self.result = EmbedResult(clip, frames, timestamps)

    def abort(self) -> None:
        self.frames = []


class _NpzSink:
    """Writes one ``.npz`` (uncompressed zip of .npy members) to ``PATH.partial``, streaming the frames,
    and renames it to PATH when complete; ``np.load`` reads it like any ``np.savez`` file."""

    def __init__(self, path: Path, n_tokens: int | None, frames_dim: int | None, dtype: np.dtype):
        self.path, self.tmp = path, path.with_name(path.name + PARTIAL_SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.member = None
        if frames_dim is not None:
            self.member = self.zip.open("frames.npy", "w", force_zip64=True)
            descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
            header = {"descr": descr, "fortran_order": False, "shape": (n_tokens, frames_dim)}
            np.lib.format.write_array_header_1_0(self.member, header)

    def write_frames(self, rows: np.ndarray) -> None:
        self.member.write(np.ascontiguousarray(rows).tobytes())

    def finish(self, clip: np.ndarray | None, frames_dim: int | None, dtype, timestamps: np.ndarray | None) -> None:
        if self.member is not None:
            self.member.close()
            self.member = None
        for name, array in (("clip", clip), ("timestamps", timestamps)):
            if array is not None:
                with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
        self.zip.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.member is not None:
                self.member.close()
            self.zip.close()
        except (OSError, ValueError):
            pass
        self.tmp.unlink(missing_ok=True)


def _disk_full(e: OSError) -> bool:
    return e.errno in _DISK_FULL


# ============================================================================ the encoding engine


@dataclass
class _Job:
    """A file being embedded: its chunks, the results received so far, where its outputs go."""

    idx: int
    info: _SourceInfo | None  # None for a file that failed before it was decoded
    sink: _MemorySink | _NpzSink
    pending: int  # chunk results still to come
    sums: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (L_clip, D) float32
    cls: dict[int, torch.Tensor] = field(default_factory=dict)
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # chunk index -> rows not yet written
    next_frame_chunk: int = 0  # position in info.frame_chunks of the next rows to write
    failed: bool = False


@dataclass
class _InFlight:
    """An encoder pass whose outputs are on their way to the CPU: (b, N, Lf * D) frames in the
    storage dtype, (b, Lc, D) float32 token sums and [CLS] outputs; ``event`` marks the copies (CUDA)."""

    kind: str
    batch: list[tuple[_Job, pooling.Chunk, torch.Tensor]]
    frames: torch.Tensor | None
    sums: torch.Tensor | None
    cls: torch.Tensor | None
    event: "torch.cuda.Event | None"


def _to_pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start a non-blocking copy of a CUDA tensor into pinned host memory."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class _Engine:
    """Turns pieces into per-file outputs: mel on the model's device, chunks of many files batched
    through the encoder, pooled and streamed to each file's sink.

    ``on_done(job, error)`` is called once per file, with ``error=None`` on success.
    """

    def __init__(
        self,
        model: ATSTModel,
        what: Sequence[str],
        clip_layers: list[int],
        frame_layers: list[int],
        frames_dtype: torch.dtype,
        batch_size: int,
        on_done: Callable[[_Job, str | None], None],
        log: Callable[[str], None] = lambda msg: None,
    ):
        self.model, self.cfg = model, model.config
        self.want_clip, self.want_frames = "clip" in what, "frames" in what
        self.frames_dtype, self.batch_size = frames_dtype, batch_size
        self.on_done, self.log = on_done, log
        clip_from_frames = self.want_clip and not self.cfg.has_cls
        frame_blocks = list(frame_layers if self.want_frames else [])
        frame_blocks += [b for b in (clip_layers if clip_from_frames else []) if b not in frame_blocks]
        # per pool kind: (encoder blocks, positions of the frame layers in them, positions of the clip layers)
        self.kinds = {
            "frame": (frame_blocks, [frame_blocks.index(b) for b in frame_layers] if self.want_frames else [],
                      [frame_blocks.index(b) for b in clip_layers] if clip_from_frames else []),
            "clip": (list(clip_layers), [], list(range(len(clip_layers)))),
        }
        self.frames_dim = len(frame_layers) * self.cfg.embed_dim if self.want_frames else None
        self.pools: dict[str, list[tuple[_Job, pooling.Chunk, torch.Tensor]]] = {"frame": [], "clip": []}
        self.jobs: dict[int, _Job] = {}
        self.inflight: _InFlight | None = None

    # ------------------------------------------------------------ intake

    def plan_spec(self) -> _PlanSpec:
        cfg = self.cfg
        return _PlanSpec(
            cfg.spec_w, cfg.patch_w, cfg.clip_chunk_frames,
            frame_plan=self.want_frames or (self.want_clip and not cfg.has_cls),
            clip_plan=self.want_clip and cfg.has_cls,
        )

    def n_tokens(self, info: _SourceInfo) -> int:
        return sum(c.tokens for c in info.frame_chunks)

    def start(self, piece: _Piece, sink: _MemorySink | _NpzSink) -> _Job:
        info = piece.info
        job = _Job(piece.idx, info, sink, pending=len(info.frame_chunks) + len(info.clip_chunks))
        self.jobs[piece.idx] = job
        return job

    def add(self, pieces: list[_Piece]) -> None:
        """Compute the mel of ``pieces`` (whose jobs were started) in one batch and queue their chunks."""
        pieces = [p for p in pieces if p.idx in self.jobs and not self.jobs[p.idx].failed]
        if not pieces:
            return
        device = self.model.device
        try:
            segments = [p.segment.to(device, non_blocking=True) for p in pieces]
            mels = window_log_mel(segments, [p.n_frames for p in pieces], [p.peak_db for p in pieces])
        except torch.OutOfMemoryError:
            if len(pieces) == 1:
                self.fail(pieces[0].idx, "out of GPU memory computing the mel of one window")
                return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.add(pieces[: len(pieces) // 2])
            self.add(pieces[len(pieces) // 2 :])
            return
        for p, mel in zip(pieces, mels):
            job = self.jobs[p.idx]
            for kind, c in p.chunks:
                offset = c.start - p.first_frame
                self.pools[kind].append((job, c, mel[:, offset : offset + c.frames]))
        for kind in self.pools:
            while len(self.pools[kind]) >= self.batch_size:
                batch, self.pools[kind] = self.pools[kind][: self.batch_size], self.pools[kind][self.batch_size :]
                self._run(kind, batch)

    def flush(self) -> None:
        """Encode everything queued and hand out every result."""
        for kind in self.pools:
            while self.pools[kind]:
                batch, self.pools[kind] = self.pools[kind][: self.batch_size], self.pools[kind][self.batch_size :]
                self._run(kind, batch)
        self._complete_inflight()

    def fail(self, idx: int, error: str) -> None:
        job = self.jobs.pop(idx, None)
        if job is not None and not job.failed:
            job.failed = True
            job.sink.abort()
            self.on_done(job, error)

    def abort_all(self) -> None:
        """Drop every unfinished file (its partial output is removed); no callbacks."""
        for job in self.jobs.values():
            job.failed = True
            job.sink.abort()
        self.jobs.clear()
        self.pools = {"frame": [], "clip": []}
        self.inflight = None

    # ------------------------------------------------------------ encoding

    def _run(self, kind: str, batch: list[tuple[_Job, pooling.Chunk, torch.Tensor]]) -> None:
        """Queue one encoder pass, then hand out the previous pass's results (on CUDA the GPU
        computes this batch while the CPU writes the previous one)."""
        batch = [e for e in batch if not e[0].failed]
        if not batch:
            return
        try:
            flight = self._launch(kind, batch)
        except torch.OutOfMemoryError:
            self._complete_inflight()
            if len(batch) == 1:
                self.fail(batch[0][0].idx, "out of GPU memory with a batch of one chunk")
                return
            half = len(batch) // 2
            if self.batch_size > half:
                self.batch_size = half
                self.log(f"out of GPU memory: batch size lowered to {half} chunks")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._run(kind, batch[:half])
            self._run(kind, batch[half:])
            return
        except (RuntimeError, ValueError) as e:
            for job, _, _ in batch:
                self.fail(job.idx, f"encoder failed: {type(e).__name__}: {e}")
            return
        self._complete_inflight()
        self.inflight = flight

    def _complete_inflight(self) -> None:
        flight, self.inflight = self.inflight, None
        if flight is None:
            return
        if flight.event is not None:
            flight.event.synchronize()
        frames = flight.frames.numpy() if flight.frames is not None else None
        for j, (job, c, _) in enumerate(flight.batch):
            if not job.failed:
                rows = frames[j, : c.tokens] if frames is not None else None
                token_sum = flight.sums[j] if flight.sums is not None else None
                cls = flight.cls[j] if flight.cls is not None else None
                self._receive(flight.kind, job, c, rows, token_sum, cls)

    @torch.inference_mode()
    def _launch(self, kind: str, batch) -> _InFlight:
        """One encoder pass over a batch of chunks; its outputs start their way to the CPU without waiting."""
        cfg, device = self.cfg, self.model.device
        blocks, frame_sel, clip_sel = self.kinds[kind]
        width = max(c.frames for _, c, _ in batch)
        mel = torch.zeros(len(batch), cfg.n_mels, width, device=device)
        for j, (_, c, m) in enumerate(batch):
            mel[j, :, : c.frames] = m
        tokens = torch.tensor([c.tokens for _, c, _ in batch], device=device)
        padded = any(c.tokens < width // cfg.patch_w for _, c, _ in batch)
        out = self.model.encode(mel, tokens if padded else None, blocks)  # (b, L, N, D)
        skip = int(cfg.has_cls)
        n = out.shape[2] - skip
        frames = sums = cls = None
        if frame_sel:
            frames = out[:, frame_sel, skip:].permute(0, 2, 1, 3).reshape(len(batch), n, -1)  # (b, N, Lf * D)
            frames = frames.to(self.frames_dtype)
        if clip_sel:
            valid = torch.arange(n, device=device)[None, :] < tokens[:, None]  # (b, N)
            sums = (out[:, clip_sel, skip:] * valid[:, None, :, None]).sum(dim=2, dtype=torch.float32)  # (b, Lc, D)
            if skip:
                cls = out[:, clip_sel, 0].float()  # (b, Lc, D)
        event = None
        if device.type == "cuda":
            frames, sums, cls = (_to_pinned(t) for t in (frames, sums, cls))
            event = torch.cuda.Event()
            event.record()
        return _InFlight(kind, batch, frames, sums, cls, event)

    def _receive(self, kind: str, job: _Job, chunk: pooling.Chunk, rows, token_sum, cls) -> None:
        try:
            if rows is not None:
                job.frames[chunk.index] = rows
                order = job.info.frame_chunks
                while job.next_frame_chunk < len(order) and order[job.next_frame_chunk].index in job.frames:
                    job.sink.write_frames(job.frames.pop(order[job.next_frame_chunk].index))
                    job.next_frame_chunk += 1
            if token_sum is not None:
                job.sums[(kind, chunk.index)] = token_sum
            if cls is not None:
                job.cls[chunk.index] = cls
            job.pending -= 1
            if job.pending == 0:
                self._finish(job)
        except OSError as e:
            if _disk_full(e):
                raise _DiskFull(e.errno, f"disk full while writing outputs ({e})") from e
            self.fail(job.idx, f"cannot write the output: {e}")

    def _finish(self, job: _Job) -> None:
        info, cfg = job.info, self.cfg
        clip = None
        if self.want_clip and cfg.has_cls:
            chunks = info.clip_chunks
            clip = pooling.clip_clip_vector(
                [job.cls[c.index] for c in chunks], [job.sums[("clip", c.index)] for c in chunks], chunks
            ).numpy()
        elif self.want_clip:
            chunks = info.frame_chunks
            clip = pooling.frame_clip_vector([job.sums[("frame", c.index)] for c in chunks], chunks).numpy()
        timestamps = None
        if self.want_frames:
            timestamps = pooling.token_times(info.frame_chunks, cfg.patch_w).numpy()
        job.sink.finish(clip, self.frames_dim, _numpy_dtype(self.frames_dtype), timestamps)
        del self.jobs[job.idx]
        self.on_done(job, None)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype({torch.float16: np.float16, torch.float32: np.float32}[dtype])


# ============================================================================ in-memory batch API


@dataclass
class EmbedResult:
    """Outputs of one input, as stored in its ``.npz``.

    Attributes:
        clip: (C,) float32 clip vector (C = L * D for ATST-Frame, 2 * L * D for ATST-Clip), or None.
        frames: (T', L * D) frame embeddings in the frames dtype, or None.
        timestamps: (T',) float64 seconds, the start of each 40 ms token, or None.
    """

    clip: np.ndarray | None
    frames: np.ndarray | None
    timestamps: np.ndarray | None


def _check_what(what: str | Sequence[str]) -> tuple[str, ...]:
    items = tuple(w.strip() for w in what.split(",")) if isinstance(what, str) else tuple(what)
    if not items or any(w not in WHAT for w in items):
        raise ValueError(f"what={what!r} is not understood; use 'clip', 'frames' or both ('clip,frames')")
    return tuple(w for w in WHAT if w in items)


def _check_dtype(name, table: dict, what: str) -> torch.dtype:
    for key, value in table.items():
        if name in (key, value):
            return value
    raise ValueError(f"{what}={name!r} is not understood; use one of {', '.join(table)}")


class Embedder:
    """Embeds decoded 16 kHz waveforms with the settings of a folder run, chunks of many inputs per batch.

    ``embed_folder`` writes exactly what this returns; the Ray Data integration and the benchmarks
    use it directly.

    Args:
        model: a loaded ``ATSTModel`` (its device and dtype are used as they are).
        what: "clip", "frames" or both (a comma-separated string or a sequence).
        clip_layers: blocks of the clip vector ("all" by default, the official embedding).
        frame_layers: blocks of the frame embeddings ("last" by default).
        frames_dtype: storage dtype of frames, "float16" (default) or "float32".
        batch_size: chunks (of up to 10.01 s) per encoder pass.
    """

    def __init__(
        self,
        model: ATSTModel,
        *,
        what: str | Sequence[str] = WHAT,
        clip_layers: Layers = "all",
        frame_layers: Layers = "last",
        frames_dtype: str | torch.dtype = "float16",
        batch_size: int = 16,
    ):
        check_batch_size(batch_size)
        self.model = model
        self.what = _check_what(what)
        self.clip_layers = resolve_layers(clip_layers, model.config.depth)
        self.frame_layers = resolve_layers(frame_layers, model.config.depth)
        self.frames_dtype = _check_dtype(frames_dtype, _STORAGE_DTYPES, "frames_dtype")
        self.batch_size = batch_size

    def _engine(self, on_done: Callable[[_Job, str | None], None], log: Callable[[str], None] = lambda m: None) -> _Engine:
        return _Engine(
            self.model, self.what, self.clip_layers, self.frame_layers, self.frames_dtype, self.batch_size, on_done, log
        )

    def embed(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> list[EmbedResult]:
        """Embed mono float waveforms at 16 kHz (each (N,), N >= 513 samples, +-1 full scale).

        Returns:
            one ``EmbedResult`` per waveform, in order.

        Raises:
            ValueError / TypeError: a waveform that is not a finite 1-D float or PCM array of at least 513 samples.
            RuntimeError: the encoder failed (e.g. out of GPU memory with a batch of one chunk).
        """
        wavs = [audio.prepare_waveform(w, frontend.SAMPLE_RATE, f"waveform {i}") for i, w in enumerate(waveforms)]
        errors: dict[int, str] = {}

        def done(job: _Job, error: str | None) -> None:
            if error:
                errors[job.idx] = error

        engine = self._engine(done)
        spec = engine.plan_spec()
        sinks = [_MemorySink() for _ in wavs]
        order = sorted(range(len(wavs)), key=lambda i: wavs[i].shape[0])  # similar lengths share batches
        group: list[_Piece] = []
        for i in order:
            piece = _whole_piece(i, wavs[i], spec, {"duration": wavs[i].shape[0] / frontend.SAMPLE_RATE,
                                                     "sample_rate": frontend.SAMPLE_RATE, "channels": 1})
            engine.start(piece, sinks[i])
            group.append(piece)
            if sum(len(p.chunks) for p in group) >= self.batch_size:
                engine.add(group)
                group = []
        engine.add(group)
        engine.flush()
        if errors:
            raise RuntimeError("; ".join(f"waveform {i}: {e}" for i, e in sorted(errors.items())))
        return [s.result for s in sinks]


# ============================================================================ folder runs


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


def _metadata(settings: _Settings, hashed: str, source: str, stream_seconds: float) -> dict:
    return {
        "package": "atst-features",
        "package_version": __version__,
        "format_version": FORMAT_VERSION,
        "settings_key": settings.key,
        "model": settings.model,
        "weights_sha256": settings.weights_sha256,
        "weights_hashed": hashed,
        "config": settings.config,
        "what": list(settings.what),
        "clip_layers": list(settings.clip_layers),
        "frame_layers": list(settings.frame_layers),
        "compute_dtype": settings.compute_dtype,
        "frames_dtype": settings.frames_dtype,
        "arrays": {
            "clip": "float32 (C,): the official clip embedding of clip_layers",
            "frames": f"{settings.frames_dtype} (T', len(frame_layers) * embed_dim), one row per 40 ms token",
            "timestamps": "float64 (T',) seconds, start of each token",
        },
        "input": source,
        "stream_seconds": stream_seconds,  # longer files were decoded in blocks (same result)
    }


def embed_folder(
    input: PathLike,
    out: PathLike,
    *,
    model: str | PathLike | ATSTModel = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    what: str | Sequence[str] = WHAT,
    clip_layers: Layers = "all",
    frame_layers: Layers = "last",
    frames_dtype: str | torch.dtype = "float16",
    batch_size: int | None = None,
    workers: int | None = None,
    shard: str | tuple[int, int] | None = None,
    force: bool = False,
    progress: bool = False,
    stream_seconds: float = 600.0,
    window_chunks: int = 30,
    compile: bool = False,
) -> BatchSummary:
    """Embed every audio file of a folder, file or list into ``out`` (see the module docstring).

    Args:
        input: a folder (recursive), an audio file, or a list file (``@FILE`` or .txt/.lst/.list).
        out: output folder (created).
        model: a name, converted directory or checkpoint file (loaded with ``load``), or an ``ATSTModel``.
        device: where the front end and encoder run ("cpu", "cuda", ...); ignored for an ``ATSTModel``.
        dtype: encoder precision, "float32" (default), "bfloat16" or "float16"; ignored for an ``ATSTModel``.
        what: "clip", "frames" or both.
        clip_layers, frame_layers: blocks of the clip vector (default all) and of the frames (default last).
        frames_dtype: storage dtype of frames: "float16" (default) or "float32". Clip vectors are float32.
        batch_size: chunks (of up to 10.01 s) per encoder pass; default 64 on CUDA, 16 otherwise.
            Halved for the rest of the run when CUDA runs out of memory.
        workers: decoding processes; 0 decodes in this process; default min(8, CPUs - 1).
        shard: ``"i/N"``: embed only the files whose relative path hashes to shard i of N (0-based).
        force: recompute outputs that are up to date.
        progress: show a tqdm progress bar (stderr).
        stream_seconds: files longer than this are decoded in blocks, twice, in bounded memory.
        window_chunks: 1001-frame chunks per window of a streamed file.
        compile: run the encoder through ``torch.compile`` (``ATSTModel.compile``); pays off on
            long GPU runs.

    Returns:
        a ``BatchSummary``; ``summary.exit_status`` is non-zero when a file failed.
    """
    t0 = time.perf_counter()
    out = Path(out)
    what = _check_what(what)
    shard = parse_shard(shard)
    if not isinstance(window_chunks, int) or window_chunks < 1:
        raise ValueError(f"window_chunks must be a positive integer, got {window_chunks!r}")
    if not stream_seconds > 0:
        raise ValueError(f"stream_seconds must be a positive number of seconds, got {stream_seconds!r}")
    files, ignored = find_inputs(input, exclude=out)
    if shard is not None:
        files = [f for f in files if shard_of(f.rel, shard[1]) == shard[0]]
    if not isinstance(model, ATSTModel):
        model = weights.load(model, device=device, dtype=resolve_dtype("float32" if dtype is None else dtype))
    if compile:
        model.compile()
    device = model.device
    if batch_size is None:
        batch_size = 64 if device.type == "cuda" else 16
    embedder = Embedder(
        model, what=what, clip_layers=clip_layers, frame_layers=frame_layers, frames_dtype=frames_dtype, batch_size=batch_size
    )
    sha, hashed = weights_sha256(model)
    settings = _Settings(
        model=str(model.name), weights_sha256=sha, config=model.config.to_dict(), what=what,
        clip_layers=tuple(embedder.clip_layers), frame_layers=tuple(embedder.frame_layers),
        compute_dtype=str(model.dtype).removeprefix("torch."), frames_dtype=str(embedder.frames_dtype).removeprefix("torch."),
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(_metadata(settings, hashed, os.fspath(input), stream_seconds), indent=2) + "\n"
    if not (out / METADATA_NAME).is_file() or (out / METADATA_NAME).read_text(encoding="utf-8") != meta:
        weights.write_text_atomic(out / METADATA_NAME, meta)

    previous = read_index(out)
    key = settings.key
    summary = BatchSummary(ignored=ignored, out_dir=out, index_path=out / _index_name(shard))
    rows: dict[str, dict] = {}
    work: list[InputFile] = []
    for f in files:
        row = previous.get(f.rel)
        if not force and _up_to_date(row, f, key, out):
            rows[f.rel] = {**row, "status": STATUS_SKIPPED}
            summary.skipped += 1
        else:
            work.append(f)
    work.sort(key=lambda f: (f.size, f.rel))  # similar lengths next to each other

    own_index = summary.index_path
    own_paths = _index_paths(own_index) if own_index.is_file() else set()
    old_own = {r: row for r, row in previous.items() if r in own_paths}  # kept if this run stops early
    completed = False
    try:
        if work:
            with open(own_index, "a", encoding="utf-8") as log:
                _run(work, embedder, out, key, summary, rows, log, workers, progress, stream_seconds, window_chunks)
        completed = summary.aborted is None
    finally:
        final = dict(rows) if completed else {**old_own, **rows}  # rows of inputs that no longer exist go
        weights.write_text_atomic(own_index, "".join(json.dumps(final[r]) + "\n" for r in sorted(final)))
        summary.wall_seconds = time.perf_counter() - t0
    return summary


def _index_paths(path: Path) -> set[str]:
    """The input paths an index file has rows for."""
    paths = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                paths.add(json.loads(line)["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return paths


def _row(f: InputFile, status: str, key: str, info: _SourceInfo | None, n_frames: int | None, error: str | None) -> dict:
    return {
        "path": f.rel,
        "status": status,
        "duration": info.duration if info else None,
        "sample_rate": info.sample_rate if info else None,
        "channels": info.channels if info else None,
        "n_frames": n_frames,
        "output": f.output if status == STATUS_OK else None,
        "error": error,
        "size": f.size,
        "mtime_ns": f.mtime_ns,
        "settings": key,
        "time": time.time(),
    }


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


def _run(
    work: list[InputFile],
    embedder: Embedder,
    out: Path,
    key: str,
    summary: BatchSummary,
    rows: dict[str, dict],
    log,
    workers: int | None,
    progress: bool,
    stream_seconds: float,
    window_chunks: int,
) -> None:
    """Decode ``work`` in DataLoader workers, embed, write outputs and index rows; fills ``summary``."""
    from tqdm.auto import tqdm

    n_workers = _default_workers() if workers is None else workers
    if not isinstance(n_workers, int) or n_workers < 0:
        raise ValueError(f"workers must be a non-negative integer, got {workers!r}")
    bar = tqdm(total=len(work), unit="file", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    t0 = time.perf_counter()

    def done(job: _Job, error: str | None) -> None:
        f, info = work[job.idx], job.info
        n_frames = engine.n_tokens(info) if error is None and engine.want_frames else None
        row = _row(f, STATUS_FAILED if error else STATUS_OK, key, info, n_frames, error)
        rows[f.rel] = row
        log.write(json.dumps(row) + "\n")
        log.flush()
        if error:
            summary.failed += 1
            summary.failures.append((f.rel, error))
        else:
            summary.ok += 1
            summary.audio_seconds += info.duration
        bar.update(1)
        rate = summary.audio_seconds / 3600 / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix({"audio h/s": f"{rate:.3f}", "failed": summary.failed}, refresh=False)

    engine = embedder._engine(done, log=bar.write)
    spec = engine.plan_spec()
    frames_dtype = _numpy_dtype(embedder.frames_dtype)

    def start(piece: _Piece) -> None:
        try:
            sink = _NpzSink(out / work[piece.idx].output, engine.n_tokens(piece.info), engine.frames_dim, frames_dtype)
        except OSError as e:
            if _disk_full(e):
                raise _DiskFull(e.errno, f"disk full while writing outputs ({e})") from e
            done(_Job(piece.idx, piece.info, _MemorySink(), 0), f"cannot write the output: {e}")
            return
        engine.start(piece, sink)

    dataset = _DecodeDataset([(i, f.path) for i, f in enumerate(work)], spec, stream_seconds, window_chunks * spec.spec_w)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=n_workers,
        pin_memory=engine.model.device.type == "cuda",
        prefetch_factor=8 if n_workers else None,
        in_order=False,  # a worker busy with a long file does not hold up the others
    )
    pending: list[_Piece] = []
    device = engine.model.device
    try:
        for group in loader:
            for item in group.unpack(device):
                if isinstance(item, _Failure):
                    if item.idx in engine.jobs:
                        engine.fail(item.idx, item.error)
                    else:
                        done(_Job(item.idx, None, _MemorySink(), 0), item.error)
                    continue
                if item.info is not None:
                    start(item)
                pending.append(item)
            if sum(len(p.chunks) for p in pending) >= engine.batch_size:
                engine.add(pending)
                pending = []
        engine.add(pending)
        engine.flush()
    except _DiskFull as e:
        summary.aborted = str(e)
    except KeyboardInterrupt:
        summary.aborted = "interrupted"
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        summary.aborted = f"a decoding worker died ({e}); rerun to resume"
    finally:
        engine.abort_all()
        bar.close()


# ============================================================================ command line


def _layers_arg(text: str) -> Layers:
    """CLI layers: "all", "last", or comma-separated 0-based block indices ("11", "0,5,11", "-1")."""
    if text in ("all", "last"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use all, last, or block indices like 11 or 0,5,11") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``atst-features embed``."""
    p = subparsers.add_parser(
        "embed",
        help="embed a folder, file or list of audio files into .npz files (resumable)",
        description=(
            "Embed every audio file under INPUT into OUT/<relative path>.npz (arrays clip, frames, timestamps), "
            "with OUT/index.jsonl (one row per input: ok / skipped / failed) and OUT/metadata.json. "
            "A rerun skips what is up to date. The exit status is 1 when a file failed."
        ),
    )
    p.add_argument(
        "input", metavar="INPUT", help="a folder (recursive), an audio file, or a list of paths (@FILE or .txt/.lst/.list)"
    )
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|DIR|FILE", help=f"model to load (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--dtype", choices=list(COMPUTE_DTYPES), help="encoder precision (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--what", default="clip,frames", help="clip, frames or clip,frames (default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (pays off on long GPU runs)")
    p.add_argument("--layers", type=_layers_arg, help="blocks for both clip and frames (all, last, or indices like 0,5,11)")
    p.add_argument("--clip-layers", type=_layers_arg, default="all", help="blocks of the clip vector (default all)")
    p.add_argument("--frame-layers", type=_layers_arg, default="last", help="blocks of the frame embeddings (default last)")
    p.add_argument("--frames-dtype", choices=list(_STORAGE_DTYPES), default="float16", help="storage of frames (default float16)")
    p.add_argument("--batch-size", type=int, help="chunks of up to 10 s per encoder pass (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes (default min(8, CPUs - 1); 0 = none)")
    p.add_argument("--shard", metavar="i/N", help="embed only shard i of N (0-based), e.g. one per node")
    p.add_argument("--force", action="store_true", help="recompute outputs that are up to date")
    p.add_argument("--stream-seconds", type=float, default=600.0, help="decode files longer than this in blocks (default 600)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)
    return p


def _cli(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    try:
        summary = embed_folder(
            args.input,
            args.out,
            model=args.model,
            device=device,
            dtype=dtype,
            what=args.what,
            clip_layers=args.layers if args.layers is not None else args.clip_layers,
            frame_layers=args.layers if args.layers is not None else args.frame_layers,
            frames_dtype=args.frames_dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            shard=args.shard,
            force=args.force,
            progress=not args.no_progress,
            stream_seconds=args.stream_seconds,
            compile=args.compile,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"atst-features embed: {e}", file=sys.stderr)
        return 2
    for rel, error in summary.failures[:20]:
        print(f"failed: {rel}: {error}", file=sys.stderr)
    if len(summary.failures) > 20:
        print(f"... and {len(summary.failures) - 20} more failures (see {summary.index_path})", file=sys.stderr)
    print(summary, file=sys.stderr)
    return summary.exit_status
