"""``embed_folder``: discover the inputs, skip what is up to date, decode in DataLoader workers,
embed through the engine (``chunks.Engine``), write ``.npz`` outputs and index rows."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from .. import weights
from ..atomic import write_text_atomic
from ..audio import PathLike
from ..chunks import DiskFull, Engine, Job
from ..dtypes import dtype_name, numpy_dtype, resolve_dtype
from ..embed import DEFAULT_MODEL, ATSTModel, Layers
from ..pieces import Piece
from .decode import DecodeDataset, Failure, Group
from .discovery import InputFile, find_inputs, in_shard, parse_shard
from .embedder import WHAT, Embedder, check_what
from .index import (
    METADATA_NAME,
    STATUS_SKIPPED,
    BatchSummary,
    Settings,
    index_name,
    index_paths,
    index_row,
    metadata,
    read_index,
    up_to_date,
    weights_sha256,
)
from .sinks import NpzSink

OnDone = Callable[[Job, "str | None"], None]  # called once per input: (its job, None or why it failed)


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
    """Embed every audio file of a folder, file or list into ``out`` (see ``atst_features.batch``).

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
    what = check_what(what)
    shard = parse_shard(shard)
    if not isinstance(window_chunks, int) or window_chunks < 1:
        raise ValueError(f"window_chunks must be a positive integer, got {window_chunks!r}")
    if not stream_seconds > 0:
        raise ValueError(f"stream_seconds must be a positive number of seconds, got {stream_seconds!r}")
    files, ignored = find_inputs(input, exclude=out)
    files = in_shard(files, shard)
    if not isinstance(model, ATSTModel):
        model = weights.load(model, device=device, dtype=resolve_dtype("float32" if dtype is None else dtype))
    if compile:
        model.compile()
    if batch_size is None:
        batch_size = 64 if model.device.type == "cuda" else 16
    embedder = Embedder(
        model, what=what, clip_layers=clip_layers, frame_layers=frame_layers, frames_dtype=frames_dtype, batch_size=batch_size
    )
    key = _write_metadata(out, embedder, os.fspath(input), stream_seconds)

    previous = read_index(out)
    summary = BatchSummary(ignored=ignored, out_dir=out, index_path=out / index_name(shard))
    rows: dict[str, dict] = {}
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
            with open(own_index, "a", encoding="utf-8") as log:
                _run(work, embedder, out, key, summary, rows, log, workers, progress, stream_seconds, window_chunks)
        completed = summary.aborted is None
    finally:
        final = dict(rows) if completed else {**old_own, **rows}  # rows of inputs that no longer exist go
        write_text_atomic(own_index, "".join(json.dumps(final[r]) + "\n" for r in sorted(final)))
        summary.wall_seconds = time.perf_counter() - t0
    return summary


def _write_metadata(out: Path, embedder: Embedder, input: str, stream_seconds: float) -> str:
    """Create ``out`` and (re)write its ``metadata.json`` when it changed; returns the settings key."""
    model = embedder.model
    sha, hashed = weights_sha256(model)
    settings = Settings(
        model=str(model.name), weights_sha256=sha, config=model.config.to_dict(), what=embedder.what,
        clip_layers=tuple(embedder.clip_layers), frame_layers=tuple(embedder.frame_layers),
        compute_dtype=dtype_name(model.dtype), frames_dtype=dtype_name(embedder.frames_dtype),
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(metadata(settings, hashed, model.source, input, stream_seconds), indent=2) + "\n"
    path = out / METADATA_NAME
    if not path.is_file() or path.read_text(encoding="utf-8") != meta:
        write_text_atomic(path, meta)
    return settings.key


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


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
    ):
        self.work, self.key, self.summary, self.rows, self.log = work, key, summary, rows, log
        self.bar, self.want_frames, self.t0 = bar, want_frames, time.perf_counter()

    def __call__(self, job: Job, error: str | None) -> None:
        f, info, summary = self.work[job.idx], job.info, self.summary
        n_frames = info.n_tokens if error is None and self.want_frames else None
        row = index_row(f, self.key, info, n_frames, error)
        self.rows[f.rel] = row
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()
        if error:
            summary.failed += 1
            summary.failures.append((f.rel, error))
        else:
            summary.ok += 1
            summary.audio_seconds += info.duration
        self.bar.update(1)
        rate = summary.audio_seconds / 3600 / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix({"audio h/s": f"{rate:.3f}", "failed": summary.failed}, refresh=False)


def _starter(engine: Engine, out: Path, work: list[InputFile], done: OnDone) -> Callable[[Piece], None]:
    """``start(piece)``: open the output of a piece's input and register the input with the engine."""
    frames_dtype = numpy_dtype(engine.request.frames_dtype)

    def start(piece: Piece) -> None:
        engine.start(piece, lambda: NpzSink(out / work[piece.idx].output, piece.info.n_tokens, engine.frames_dim, frames_dtype))

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
    bar = tqdm(total=len(work), unit="file", disable=not progress, dynamic_ncols=True, smoothing=0.05)
    done = _Recorder(work, key, summary, rows, log, bar, want_frames="frames" in embedder.what)
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
