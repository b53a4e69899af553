"""Where a folder run's outputs go: one ``.npz`` per input, written to ``NAME.npz.partial`` and
renamed when complete, so a killed run never leaves a truncated ``.npz``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

PARTIAL_SUFFIX = ".partial"


class NpzSink:
    """Writes one ``.npz`` (an uncompressed zip of .npy members) to ``PATH.partial``, streaming the
    frames, and renames it to PATH when complete; ``np.load`` reads it like any ``np.savez`` file.

    An engine sink (``chunks.Engine``): ``write_frames`` rows in order, then ``finish`` (clip vector
    and timestamps) or ``abort`` (the partial file is removed).

    Args:
        path: the output file (its folder is created).
        n_tokens: rows of ``frames`` (T'); with ``frames_dim=None`` no frames are written.
        frames_dim: width of ``frames`` (L * D), or ``None``.
        dtype: the frames' numpy dtype.

    Raises:
        OSError: the partial file cannot be created.
    """

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
        """Append (n, frames_dim) rows of ``frames``."""
        self.member.write(np.ascontiguousarray(rows).tobytes())

    def finish(self, clip: np.ndarray | None, frames_dim: int | None, dtype, timestamps: np.ndarray | None) -> None:
        """Write ``clip`` (C,) and ``timestamps`` (T',) (when given), close, and rename to the output."""
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
        """Close and remove the partial file (never raises for a file that cannot be closed)."""
        try:
            if self.member is not None:
                self.member.close()
            self.zip.close()
        except (OSError, ValueError):
            pass
        self.tmp.unlink(missing_ok=True)
