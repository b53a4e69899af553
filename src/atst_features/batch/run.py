"""``embed_folder``: discover the inputs, skip what is up to date, decode in DataLoader workers,
embed through the engine (``chunks.Engine``), write ``.npz`` outputs and index rows."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .. import weights
from ..atomic import open_append, write_text_atomic
from ..audio import PathLike, audio_info
from ..chunks import DiskFull, Engine, Job, is_disk_full
from ..dtypes import dtype_name, numpy_dtype, resolve_dtype
from ..embed import DEFAULT_MODEL, ATSTModel, Layers
from ..pieces import Piece
from .decode import DecodeDataset, Failure, Group
from .discovery import (
    ContainersSkipped,
    InputFile,
    find_inputs_many,
    in_shard,
    parse_shard,
)
from .embedder import WHAT, Embedder, check_what
from .folder import FolderLock, output_dir
from .index import (
    METADATA_NAME,
    STATUS_FAILED,
    STATUS_SKIPPED,
    BatchSummary,
    Settings,
    index_name,
    index_paths,
    index_row,
    metadata,
    open_no_follow_text,
    output_matches,
    read_index,
    tensors_sha256,
    up_to_date,
    weights_sha256,
)
from .sinks import NpzSink

OnDone = Callable[[Job, "str | None"], None]  # called once per input: (its job, None or why it failed)


def embed_folder(
    input: PathLike | Sequence[PathLike],
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
    hop_s: float | None = None,
) -> BatchSummary:
    """Embed every audio file of a folder, file or list into ``out`` (see ``atst_features.batch``).

    Args:
        input: a folder (recursive), an audio file, a list file (``@FILE`` or .txt/.lst/.list; ``-``
            reads the list from stdin), or a sequence of those (``discovery.find_inputs_many``: outputs
            mirror the paths below the deepest folder holding them all). Containers (m4a, MP4, WebM,
            ...) are embedded when PyAV is installed; otherwise they are skipped with a
            ``ContainersSkipped`` warning that counts them.
        out: output folder (created).
        model: a name, converted directory or checkpoint file (loaded with ``load``), or an ``ATSTModel``.
        device: where the front end and encoder run ("cpu", "cuda", ...); ignored for an ``ATSTModel``.
        dtype: encoder precision, "float32" (default), "bfloat16" or "float16"; ignored for an ``ATSTModel``.
        what: "clip", "frames" or both.
        clip_layers, frame_layers: blocks of the clip vector (default all) and of the frames (default last).
        frames_dtype: storage dtype of frames: "float16" (default) or "float32". Clip vectors are float32.
        batch_size: chunks (of up to 10.01 s) per encoder pass; default 64 on CUDA, 16 otherwise.
            Halved for the rest of the run when CUDA runs out of memory.
        workers: decoding processes; 0 decodes in this process; default min(8, CPUs - 1), 0 with <= 2 CPUs.
        shard: ``"i/N"``: embed only the files whose relative path hashes to shard i of N (0-based).
        force: recompute outputs that are up to date.
        progress: show a tqdm progress bar (stderr) in seconds of audio (from the files' headers).
        stream_seconds: files longer than this are decoded in blocks, twice, in bounded memory.
        window_chunks: 1001-frame chunks per window of a streamed file.
        compile: run the encoder through ``torch.compile`` (``ATSTModel.compile``); pays off on
            long GPU runs.
        hop_s: frames from overlapping 10 s windows every ``hop_s`` seconds
            (``ATSTModel.embed_frames(hop_s=...)``); ``None``: the official chunks.

    ``what="scores"`` stores the frame-level head's scores of the last block instead of embeddings
    (``scores`` (T', classes) float32, ``timestamps``, ``labels``): what ``atst-features detect`` runs.

    Returns:
        a ``BatchSummary``; ``summary.exit_status`` is non-zero when a file failed.

    Raises:
        FolderBusy: another run is writing to ``out`` (a shard of the same N and settings may).
        OutputFolderError: ``out`` is a file, cannot be created or written, or its disk is full
            (the run did nothing and left nothing behind).
        ValueError, FileNotFoundError: bad arguments, a missing input or model.
    """
    t0 = time.perf_counter()
    out = Path(out)
    what = check_what(what)
    shard = parse_shard(shard)
    if not isinstance(window_chunks, int) or window_chunks < 1:
        raise ValueError(f"window_chunks must be a positive integer, got {window_chunks!r}")
    if not stream_seconds > 0:
        raise ValueError(f"stream_seconds must be a positive number of seconds, got {stream_seconds!r}")
    sources = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    found = find_inputs_many(sources, exclude=out)
    files, ignored = in_shard(found.files, shard), found.ignored + found.containers
    if found.containers:
        warnings.warn(ContainersSkipped(found.containers), stacklevel=2)
    lock = FolderLock(out, shard)
    lock.acquire()  # refused at once when busy; leftovers of killed runs removed
    try:  # until the run starts, a failure leaves nothing behind
        if not isinstance(model, ATSTModel):
            model = weights.load(model, device=device, dtype=resolve_dtype("float32" if dtype is None else dtype))
        if compile:
            model.compile()
        if batch_size is None:
            batch_size = 64 if model.device.type == "cuda" else 16
        embedder = Embedder(
            model, what=what, clip_layers=clip_layers, frame_layers=frame_layers, frames_dtype=frames_dtype,
            batch_size=batch_size, hop_s=hop_s,
        )
        settings, meta = _metadata(embedder, " ".join(os.fspath(s) for s in sources), stream_seconds)
        lock.agree(settings.key, lambda: _write_metadata(out, meta))
    except BaseException:
        lock.release(undo=True)
        raise
    try:
        return _resume(files, ignored, embedder, out, settings.key, shard, force, workers, progress,
                       stream_seconds, window_chunks, t0)
    finally:
        lock.release()


def _resume(
    files: list[InputFile],
    ignored: int,
    embedder: Embedder,
    out: Path,
    key: str,
    shard: tuple[int, int] | None,
    force: bool,
    workers: int | None,
    progress: bool,
    stream_seconds: float,
    window_chunks: int,
    t0: float,
) -> BatchSummary:
    """Skip what is up to date, embed the rest, and rewrite this run's index from what is on disk."""
    previous = read_index(out)
    summary = BatchSummary(ignored=ignored, out_dir=out, index_path=out / index_name(shard))
    summary.inputs = {f.rel: f.path for f in files}
    rows: dict[str, dict] = summary.rows
    work: list[InputFile] = []
    for f in files:
        row = previous.get(f.rel)
        if not force and up_to_date(row, f, key, out):
            rows[f.rel] = {**row, "status": STATUS_SKIPPED}
            summary.skipped += 1
        else:
            work.append(f)
    work.sort(key=lambda f: (f.size, f.rel))  # similar lengths next to each other

    own_index = summary.index_path
    own_paths = index_paths(own_index)
    old_own = {r: row for r, row in previous.items() if r in own_paths}  # kept if this run stops early
    completed = False
    try:
        if work:
            with open_append(own_index, encoding="utf-8") as log:
                _run(work, embedder, out, key, summary, rows, log, workers, progress, stream_seconds, window_chunks)
        completed = summary.aborted is None
    finally:
        _write_index(own_index, rows if completed else {**_still_there(out, old_own), **rows}, summary)
        summary.wall_seconds = time.perf_counter() - t0
    return summary


def _still_there(out: Path, rows: dict[str, dict]) -> dict[str, dict]:
    """The rows that still describe the folder: failures, and outputs that are as their row recorded."""
    return {r: row for r, row in rows.items() if row.get("status") == STATUS_FAILED or output_matches(out, row)}


def _write_index(path: Path, rows: dict[str, dict], summary: BatchSummary) -> None:
    """Rewrite a run's index with ``rows`` (by path); a full disk leaves the rows appended so far."""
    try:
        write_text_atomic(path, "".join(json.dumps(rows[r]) + "\n" for r in sorted(rows)))
    except OSError as e:
        if not is_disk_full(e):
            raise
        note = f"disk full: the index was not rewritten ({e}); rerun to resume"
        summary.aborted = f"{summary.aborted}; {note}" if summary.aborted else note


def _metadata(embedder: Embedder, input: str, stream_seconds: float) -> tuple[Settings, str]:
    """The run's ``Settings`` and the text of its ``metadata.json``."""
    model = embedder.model
    sha, hashed = weights_sha256(model)
    settings = Settings(
        model=str(model.name), weights_sha256=sha, config=model.config.to_dict(), what=embedder.what,
        clip_layers=tuple(embedder.clip_layers), frame_layers=tuple(embedder.frame_layers),
        compute_dtype=dtype_name(model.dtype), frames_dtype=dtype_name(embedder.frames_dtype),
        head=None if embedder.head is None else tensors_sha256(embedder.head.state_dict()),
        hop_tokens=embedder.hop_tokens,
        backend=None if model.backend == "torch" else model.backend,
    )
    return settings, json.dumps(metadata(settings, hashed, model.source, input, stream_seconds), indent=2) + "\n"


def _write_metadata(out: Path, meta: str) -> None:
    """(Re)write ``out/metadata.json`` when it differs from ``meta`` (a link there is replaced, not followed)."""
    path = out / METADATA_NAME
    f = open_no_follow_text(path)
    if f is not None:
        with f:
            if f.read() == meta:
                return
    write_text_atomic(path, meta)


def _default_workers() -> int:
    """min(8, CPUs - 1); none with <= 2 CPUs, where a decoding process slows the encoder down."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


class _Recorder:
    """The engine's ``on_done``: one index row per finished or failed input, counted in the summary."""

    def __init__(
        self,
        work: list[InputFile],
        key: str,
        summary: BatchSummary,
        rows: dict[str, dict],
        log: TextIO,
        bar: Any,  # a tqdm progress bar
        want_frames: bool,
        seconds: dict[int, float],  # the bar's estimate of each input's duration (file headers), by index
    ):
        self.work, self.key, self.summary, self.rows, self.log = work, key, summary, rows, log
        self.bar, self.want_frames, self.t0 = bar, want_frames, time.perf_counter()
        self.seconds = dict(seconds)

    def __call__(self, job: Job, error: str | None) -> None:
        f, info, summary = self.work[job.idx], job.info, self.summary
        n_frames = info.n_tokens if error is None and self.want_frames else None
        digest = getattr(job.sink, "digest", None) if error is None else None
        row = index_row(f, self.key, info, n_frames, error, digest)
        self.rows[f.rel] = row
        try:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(e.errno, f"disk full while writing the index ({e})") from e
            raise
        if error:
            summary.failed += 1
            summary.failures.append((f.rel, error))
        else:
            summary.ok += 1
            summary.audio_seconds += info.duration
        self._advance(job.idx, info.duration if error is None else 0.0)
        rate = summary.audio_seconds / 3600 / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix({"audio h/s": f"{rate:.3f}", "failed": summary.failed}, refresh=False)


    def _advance(self, idx: int, seconds: float) -> None:
        """Move the bar by a finished input's seconds: its header's estimate, or (none known) the
        duration embedded, which then joins the total."""
        estimate = self.seconds.pop(idx, None)
        if estimate is None:
            self.bar.total = (self.bar.total or 0.0) + seconds
            estimate = seconds
        self.bar.update(estimate)


def _header_seconds(work: list[InputFile]) -> dict[int, float]:
    """Each input's duration in seconds by its header (``audio.audio_info``); unreadable ones are left out."""
    seconds = {}
    for i, f in enumerate(work):
        try:
            seconds[i] = audio_info(f.path).duration
        except (OSError, ValueError, RuntimeError):
            pass
    return seconds


def _starter(engine: Engine, out: Path, work: list[InputFile], done: OnDone) -> Callable[[Piece], None]:
    """``start(piece)``: open the output of a piece's input and register the input with the engine."""
    frames_dtype = numpy_dtype(engine.request.frames_dtype)
    folders: set[str] = set()  # output folders made or checked (links are refused)

    head = engine.request.frame_head
    name, extras = ("frames", None) if head is None else ("scores", {"labels": np.array(head.labels or [], dtype=str)})

    def open_sink(piece: Piece) -> NpzSink:
        rel = work[piece.idx].output
        path = output_dir(out, rel, folders) / Path(rel).name
        return NpzSink(path, piece.info.n_tokens, engine.frames_dim, frames_dtype, name, extras)

    def start(piece: Piece) -> None:
        engine.start(piece, lambda: open_sink(piece))

    return start


def _feed(groups: Iterable[Group], engine: Engine, start: Callable[[Piece], None], done: OnDone) -> None:
    """Hand decoded groups to the engine, ``engine.batch_size`` chunks at a time, and flush it."""
    pending: list[Piece] = []
    device = engine.model.device
    for group in groups:
        for item in group.unpack(device):
            if isinstance(item, Failure):
                if item.idx in engine.jobs:
                    engine.fail(item.idx, item.error)
                else:
                    done(Job(item.idx, None, None, 0), item.error)
                continue
            if item.info is not None:
                start(item)
            pending.append(item)
        if sum(len(p.chunks) for p in pending) >= engine.batch_size:
            engine.add(pending)
            pending = []
    engine.add(pending)
    engine.flush()


def _run(
    work: list[InputFile],
    embedder: Embedder,
    out: Path,
    key: str,
    summary: BatchSummary,
    rows: dict[str, dict],
    log: TextIO,
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
    seconds = _header_seconds(work) if progress else {}
    bar = tqdm(
        total=sum(seconds.values()), unit="s", disable=not progress, dynamic_ncols=True,
        smoothing=0.05, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]",
    )
    done = _Recorder(work, key, summary, rows, log, bar, want_frames=embedder.request.frame_layers is not None, seconds=seconds)
    engine = embedder.engine(done, log=bar.write)
    plan = engine.plan
    dataset = DecodeDataset([(i, f.path) for i, f in enumerate(work)], plan, stream_seconds, window_chunks * plan.spec_w)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=n_workers,
        pin_memory=engine.model.device.type == "cuda",
        prefetch_factor=8 if n_workers else None,
        in_order=False,  # a worker busy with a long file does not hold up the others
    )
    try:
        _feed(loader, engine, _starter(engine, out, work, done), done)
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
