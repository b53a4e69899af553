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
import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch

from . import __version__, audio, frontend, weights
from .chunks import DiskFull, EmbedResult, Engine, Job, MemorySink, Request, is_disk_full, run_waveforms
from .dtypes import COMPUTE_DTYPES, STORAGE_DTYPES, dtype_name, numpy_dtype, resolve_dtype
from .embed import DEFAULT_MODEL, ATSTModel, Layers, check_batch_size, resolve_layers
from .pieces import Piece, Plan, SourceInfo, streamed_pieces, whole_piece

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


# ============================================================================ decoding (DataLoader workers)


@dataclass
class _Failure:
    idx: int
    error: str


def _decode(idx: int, path: Path, spec: Plan, stream_seconds: float, window_frames: int) -> Iterator[Piece | _Failure]:
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
            yield whole_piece(idx, wav, spec, info)
        else:
            yield from streamed_pieces(idx, lambda: audio.stream_blocks(path), spec, info, window_frames, what=repr(str(path)))
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
    items: list[Piece | _Failure]  # pieces' segments are detached while in transit

    @classmethod
    def pack(cls, items: list[Piece | _Failure]) -> "_Group":
        pieces = [x for x in items if isinstance(x, Piece)]
        lengths = [p.segment.shape[0] for p in pieces]
        offsets = np.cumsum([0, *lengths[:-1]]).tolist()
        samples = torch.from_numpy(np.concatenate([p.segment.numpy() for p in pieces] or [np.zeros(0, np.float32)]))
        for p in pieces:
            p.segment = None
        return cls(samples, list(zip(offsets, lengths)), items)

    def pin_memory(self) -> "_Group":
        self.samples = self.samples.pin_memory()
        return self

    def unpack(self, device: torch.device) -> list[Piece | _Failure]:
        """The items; each piece's segment a view of the samples moved to ``device`` (non-blocking from pinned memory)."""
        samples = self.samples.to(device, non_blocking=True)
        spans = iter(self.spans)
        for item in self.items:
            if isinstance(item, Piece):
                offset, length = next(spans)
                item.segment = samples[offset : offset + length]
        return self.items


class _DecodeDataset(torch.utils.data.IterableDataset):
    """Decodes files into groups of pieces; worker k of W takes files k, k + W, ... (sorted by size)."""

    def __init__(self, files: list[tuple[int, Path]], spec: Plan, stream_seconds: float, window_frames: int):
        self.files, self.spec = files, spec
        self.stream_seconds, self.window_frames = stream_seconds, window_frames

    def __iter__(self) -> Iterator[_Group]:
        worker = torch.utils.data.get_worker_info()
        k, n = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        items: list[Piece | _Failure] = []
        files = samples = 0
        for idx, path in self.files[k::n]:
            files += 1
            for item in _decode(idx, path, self.spec, self.stream_seconds, self.window_frames):
                items.append(item)
                samples += item.segment.shape[0] if isinstance(item, Piece) else 0
                if samples >= _GROUP_SAMPLES:  # a long file's windows go one by one
                    yield _Group.pack(items)
                    items, files, samples = [], 0, 0
            if files >= _GROUP_FILES:
                yield _Group.pack(items)
                items, files, samples = [], 0, 0
        if items:
            yield _Group.pack(items)


# ============================================================================ outputs


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


# ============================================================================ in-memory batch API


def _check_what(what: str | Sequence[str]) -> tuple[str, ...]:
    items = tuple(w.strip() for w in what.split(",")) if isinstance(what, str) else tuple(what)
    if not items or any(w not in WHAT for w in items):
        raise ValueError(f"what={what!r} is not understood; use 'clip', 'frames' or both ('clip,frames')")
    return tuple(w for w in WHAT if w in items)


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
        self.frames_dtype = resolve_dtype(frames_dtype, STORAGE_DTYPES, "frames_dtype")
        self.batch_size = batch_size

    @property
    def request(self) -> Request:
        """What the engine computes for every input."""
        return Request(
            clip_layers=tuple(self.clip_layers) if "clip" in self.what else None,
            frame_layers=tuple(self.frame_layers) if "frames" in self.what else None,
            frames_dtype=self.frames_dtype,
        )

    def _engine(self, on_done: Callable[[Job, str | None], None], log: Callable[[str], None] = lambda m: None) -> Engine:
        return Engine(self.model, self.request, self.batch_size, on_done, log)

    def embed(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> list[EmbedResult]:
        """Embed mono float waveforms at 16 kHz (each (N,), N >= 513 samples, +-1 full scale).

        Returns:
            one ``EmbedResult`` per waveform, in order.

        Raises:
            ValueError / TypeError: a waveform that is not a finite 1-D float or PCM array of at least 513 samples.
            RuntimeError: the encoder failed (e.g. out of GPU memory with a batch of one chunk).
        """
        wavs = [audio.prepare_waveform(w, frontend.SAMPLE_RATE, f"waveform {i}") for i, w in enumerate(waveforms)]
        return run_waveforms(self.model, wavs, self.request, self.batch_size, label="waveform")


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
        compute_dtype=dtype_name(model.dtype), frames_dtype=dtype_name(embedder.frames_dtype),
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


def _row(f: InputFile, status: str, key: str, info: SourceInfo | None, n_frames: int | None, error: str | None) -> dict:
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

    def done(job: Job, error: str | None) -> None:
        f, info = work[job.idx], job.info
        n_frames = info.n_tokens if error is None and engine.want_frames else None
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
    spec = engine.plan
    frames_dtype = numpy_dtype(embedder.frames_dtype)

    def start(piece: Piece) -> None:
        try:
            sink = _NpzSink(out / work[piece.idx].output, piece.info.n_tokens, engine.frames_dim, frames_dtype)
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(e.errno, f"disk full while writing outputs ({e})") from e
            done(Job(piece.idx, piece.info, MemorySink(), 0), f"cannot write the output: {e}")
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
    pending: list[Piece] = []
    device = engine.model.device
    try:
        for group in loader:
            for item in group.unpack(device):
                if isinstance(item, _Failure):
                    if item.idx in engine.jobs:
                        engine.fail(item.idx, item.error)
                    else:
                        done(Job(item.idx, None, MemorySink(), 0), item.error)
                    continue
                if item.info is not None:
                    start(item)
                pending.append(item)
            if sum(len(p.chunks) for p in pending) >= engine.batch_size:
                engine.add(pending)
                pending = []
        engine.add(pending)
        engine.flush()
    except DiskFull as e:
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
    p.add_argument("--frames-dtype", choices=list(STORAGE_DTYPES), default="float16", help="storage of frames (default float16)")
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
