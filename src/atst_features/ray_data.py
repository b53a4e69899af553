"""Ray Data integration: embed a corpus on a cluster with ``Dataset.map_batches``.

Needs the ``ray`` extra (``pip install 'atst-features[ray]'``)::

    import ray
    from atst_features.ray_data import embed_dataset, read_audio_files

    ds = read_audio_files("/data/corpus")             # or ray.data.read_binary_files(..., include_paths=True)
    ds = embed_dataset(ds, model="atst-frame-base", num_gpus=1, concurrency=4)
    ds.write_parquet("/data/embeddings")

Each actor loads the model once (``ATSTEmbedder``) and embeds its batches with
``batch.Embedder``, so the arrays are exactly those ``embed_folder`` writes. A row that cannot
be decoded gets its error in the ``error`` column instead of failing the job.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from . import audio, frontend
from .batch import WHAT, Embedder, find_inputs, parse_shard
from .batch.discovery import in_shard
from .dtypes import numpy_dtype, resolve_dtype
from .embed import DEFAULT_MODEL, ATSTModel, Layers

PathLike = str | os.PathLike
INPUT_COLUMNS = ("bytes", "path", "audio")  # checked in this order
_DROPPED = ("bytes", "audio")  # large inputs not carried into the output


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the Ray Data integration needs the ray extra: pip install 'atst-features[ray]' ({e})") from None
    return ray


class ATSTEmbedder:
    """A callable class for ``Dataset.map_batches``: one model per actor, batches in, embeddings out.

    Input batches (``batch_format="numpy"``) need one of these columns:
    ``bytes`` (encoded files, e.g. from ``ray.data.read_binary_files``), ``path`` (files every
    worker can read), or ``audio`` (1-D waveforms) with ``sample_rate`` (Hz).

    Output: the input's columns (minus ``bytes`` / ``audio``) plus, per row,
    ``clip`` (C,) float32, ``frames`` (T', L * D), ``timestamps`` (T',) float64 seconds (as
    ``what`` asks), ``duration`` (seconds) and ``error`` ("" when the row was embedded; a failed
    row has a NaN clip vector and empty frames).

    Args:
        model: a name, converted directory or checkpoint file, or an ``ATSTModel``.
        device: "cpu" (default) or "cuda" (give the actors GPUs with ``num_gpus``).
        dtype: encoder precision, "float32", "bfloat16" or "float16".
        what, clip_layers, frame_layers, frames_dtype, batch_size: as ``batch.Embedder``.
    """

    def __init__(
        self,
        model: str | PathLike | ATSTModel = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        what: str | Sequence[str] = WHAT,
        clip_layers: Layers = "all",
        frame_layers: Layers = "last",
        frames_dtype: str = "float16",
        batch_size: int = 16,
    ):
        if not isinstance(model, ATSTModel):
            from .weights import load

            model = load(model, device=device, dtype=resolve_dtype(dtype))
        self.embedder = Embedder(
            model, what=what, clip_layers=clip_layers, frame_layers=frame_layers, frames_dtype=frames_dtype, batch_size=batch_size
        )
        self.clip_dim = model.clip_dim(self.embedder.clip_layers)
        self.frame_dim = model.frame_dim(self.embedder.frame_layers)

    def _waveforms(self, batch: dict[str, np.ndarray]) -> tuple[int, list[np.ndarray | None], list[str]]:
        column = next((c for c in INPUT_COLUMNS if c in batch), None)
        if column is None:
            raise KeyError(f"a batch needs a 'bytes', 'path' or 'audio' column, got columns {sorted(batch)}")
        if column == "audio" and "sample_rate" not in batch:
            raise KeyError("an 'audio' column needs a 'sample_rate' column (Hz) beside it")
        n = len(batch[column])
        wavs: list[np.ndarray | None] = [None] * n
        errors = [""] * n
        for i in range(n):
            try:
                if column == "bytes":
                    wav, sr = audio.read_audio(bytes(batch["bytes"][i]))  # encoded file contents
                elif column == "path":
                    wav, sr = audio.read_audio(str(batch["path"][i]))
                else:
                    wav, sr = np.asarray(batch["audio"][i]), float(batch["sample_rate"][i])
                wavs[i] = audio.prepare_waveform(wav, sr, f"row {i}").numpy()  # resampled to 16 kHz, checked
            except Exception as e:  # one bad row must not fail the job
                errors[i] = f"{type(e).__name__}: {e}"
        return n, wavs, errors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, wavs, errors = self._waveforms(batch)
        good = [i for i in range(n) if wavs[i] is not None]
        results = dict(zip(good, self.embedder.embed([wavs[i] for i in good]))) if good else {}
        out = {k: v for k, v in batch.items() if k not in _DROPPED}
        what = self.embedder.what
        frames_dtype = numpy_dtype(self.embedder.frames_dtype)
        no_clip = np.full(self.clip_dim, np.nan, np.float32)
        no_frames, no_times = np.zeros((0, self.frame_dim), frames_dtype), np.zeros(0)
        if "clip" in what:
            out["clip"] = np.stack([results[i].clip if i in results else no_clip for i in range(n)])
        if "frames" in what:
            out["frames"] = _ragged([results[i].frames if i in results else no_frames for i in range(n)])
            out["timestamps"] = _ragged([results[i].timestamps if i in results else no_times for i in range(n)])
        out["duration"] = np.array([w.shape[0] / frontend.SAMPLE_RATE if w is not None else np.nan for w in wavs])
        out["error"] = np.array(errors, dtype=object)
        return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of different lengths (an object array; Ray stores it as a variable-shaped tensor)."""
    column = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        column[i] = a
    return column


def read_audio_files(source: PathLike, *, shard: str | tuple[int, int] | None = None, **read_kwargs):
    """A Ray dataset with one row per audio file of a folder, file or list (``batch.find_inputs``).

    Columns: ``path`` (absolute, for workers that share the file system) and ``rel`` (path
    relative to the input root, e.g. to name outputs). ``shard="i/N"`` keeps one shard.
    ``read_kwargs`` go to ``ray.data.from_items``.
    """
    ray = _require_ray()
    files = in_shard(find_inputs(source)[0], parse_shard(shard))
    return ray.data.from_items([{"path": str(f.path), "rel": f.rel} for f in files], **read_kwargs)


def embed_dataset(
    ds,
    model: str | PathLike | ATSTModel = DEFAULT_MODEL,
    *,
    num_gpus: float | None = None,
    concurrency: int | tuple[int, int] = 1,
    rows_per_batch: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    **embedder_kwargs,
):
    """``ds.map_batches`` with ``ATSTEmbedder`` actors; returns the lazy embedded dataset.

    Args:
        ds: a Ray dataset with a ``bytes``, ``path`` or ``audio`` (+ ``sample_rate``) column.
        model: as ``ATSTEmbedder``.
        num_gpus: GPUs per actor (e.g. 1, or 0.5 to share a GPU between two actors); the actors then
            run on "cuda" in bfloat16 unless ``device`` / ``dtype`` say otherwise.
        concurrency: actors (or a (min, max) range for autoscaling).
        rows_per_batch: rows per ``map_batches`` batch (files handed to an actor at once).
        device, dtype: override the defaults ("cpu" / "float32" without GPUs).
        **embedder_kwargs: what, clip_layers, frame_layers, frames_dtype, batch_size (``ATSTEmbedder``).
    """
    ray = _require_ray()
    gpu = bool(num_gpus)
    low, high = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    kwargs = dict(embedder_kwargs, device=device or ("cuda" if gpu else "cpu"), dtype=dtype or ("bfloat16" if gpu else "float32"))
    return ds.map_batches(
        ATSTEmbedder,
        fn_constructor_args=(model,),
        fn_constructor_kwargs=kwargs,
        batch_size=rows_per_batch,
        batch_format="numpy",
        num_gpus=num_gpus,
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
    )
