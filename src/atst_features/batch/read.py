"""Read a folder run back: OUT -> the paths embedded and their clip vectors or frames
(``read_embeddings``), or one Parquet table of them (``to_parquet``, the ``parquet`` extra).

Only inputs whose latest index row (over every ``index*.jsonl``: ``index.read_index``) is ``ok``
or ``skipped`` (embedded by an earlier run, still up to date) count, and only when their output is
the file the row recorded (``index.output_matches``); the others are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np

from ..atomic import open_atomic
from ..audio import PathLike
from .index import STATUS_OK, STATUS_SKIPPED, output_matches, read_index

PARQUET_NAME = "embeddings.parquet"  # `atst-features embed --format parquet` writes OUT/embeddings.parquet
PARQUET_EXTRA = "pip install 'atst-features[parquet]'"


def verified_outputs(out: PathLike) -> list[tuple[str, Path]]:
    """(input path relative to its root, output file) of every verified output in ``out``, sorted by path."""
    out = Path(out)
    rows = read_index(out)
    if not rows:
        raise FileNotFoundError(f"{str(out)!r} holds no index (index*.jsonl): not the OUT of `atst-features embed`")
    return [
        (rel, out / row["output"])
        for rel, row in sorted(rows.items())
        if row.get("status") in (STATUS_OK, STATUS_SKIPPED) and output_matches(out, row)
    ]


def _array(path: Path, name: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        if name not in npz.files:
            raise ValueError(f"{str(path)!r} has no {name!r} array (the run's --what left it out)")
        return npz[name]


class Frames(Sequence):
    """The frames of a run, one input at a time: ``frames[i]`` loads input ``i``'s
    ((T', D) frame embeddings, (T',) float64 start times in seconds) from its ``.npz``."""

    def __init__(self, outputs: Sequence[Path]):
        self.outputs = list(outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    @overload
    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...
    @overload
    def __getitem__(self, i: slice) -> Frames: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Frames(self.outputs[i])
        path = self.outputs[i]
        return _array(path, "frames"), _array(path, "timestamps")


def read_embeddings(out: PathLike, what: str = "clip") -> tuple[list[str], np.ndarray | Frames]:
    """The embeddings a folder run wrote to ``out`` (verified outputs only, sorted by path).

    Args:
        out: the OUT folder of ``embed_folder`` / ``atst-features embed`` (every shard's index is read).
        what: "clip" or "frames".

    Returns:
        (paths, clip) for "clip": input paths relative to their root and an (N, C) float32 matrix
        (row i = paths[i]); (paths, frames) for "frames": ``Frames``, a sequence whose item i loads
        ((T', D) frames, (T',) timestamps in seconds) of paths[i] when asked for.

    Raises:
        FileNotFoundError: ``out`` holds no index.
        ValueError: a bad ``what``, or outputs written without it.
    """
    if what not in ("clip", "frames"):
        raise ValueError(f"what must be 'clip' or 'frames', got {what!r}")
    found = verified_outputs(out)
    paths = [rel for rel, _ in found]
    if what == "frames":
        return paths, Frames([p for _, p in found])
    clips = [_array(p, "clip") for _, p in found]
    return paths, np.stack(clips).astype(np.float32, copy=False) if clips else np.zeros((0, 0), np.float32)


def to_parquet(out: PathLike, path: PathLike | None = None) -> Path:
    """Gather the verified outputs of ``out`` into one Parquet table, written atomically.

    Columns: ``path`` (string), ``clip`` (list<float32>) when the run wrote clip vectors, and
    ``frames`` (list<list<float32>>, one list per 40 ms token) and ``timestamps`` (list<float64>,
    seconds) when it wrote frames. The table is built in memory. Needs pyarrow (the ``parquet`` extra).

    Args:
        out: the OUT folder of a run.
        path: the file to write (default ``OUT/embeddings.parquet``).

    Returns:
        the path written.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"writing Parquet needs pyarrow: {PARQUET_EXTRA}") from None
    path = Path(out) / PARQUET_NAME if path is None else Path(path)
    found = verified_outputs(out)
    columns: dict[str, list] = {"path": [rel for rel, _ in found]}
    for _, output in found:
        with np.load(output, allow_pickle=False) as npz:
            for name in ("clip", "frames", "timestamps"):
                if name in npz.files:
                    columns.setdefault(name, []).append(npz[name])
    n = len(found)
    types = {"clip": pa.list_(pa.float32()), "frames": pa.list_(pa.list_(pa.float32())), "timestamps": pa.list_(pa.float64())}
    arrays = {"path": pa.array(columns["path"], pa.string())}
    for name, values in columns.items():
        if name == "path":
            continue
        if len(values) != n:
            raise ValueError(f"only {len(values)} of the {n} outputs in {str(out)!r} have {name!r}: mixed runs")
        arrays[name] = pa.array([v.tolist() for v in values], types[name])
    table = pa.table(arrays)
    with open_atomic(path, "wb") as f:
        pq.write_table(table, f)
    return path
