"""Where a folder run's outputs go: one ``.npz`` per input, streamed into a new temporary file
(``atomic.AtomicFile``: exclusive, no-follow, random name) and renamed over ``NAME.npz`` when
complete, so a killed run never leaves a truncated ``.npz`` and no link is ever written through."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..atomic import TEMP_SUFFIX, AtomicFile
from .index import output_digest

PARTIAL_SUFFIX = TEMP_SUFFIX  # temporary files are .NAME.<16 hex digits>.partial


class NpzSink:
    """Writes one ``.npz`` (an uncompressed zip of .npy members), streaming the frames into a
    temporary file beside ``path``, and renames it to ``path`` when complete; ``np.load`` reads it
    like any ``np.savez`` file.

    An engine sink (``chunks.Engine``): ``write_frames`` rows in order, then ``finish`` (clip vector
    and timestamps) or ``abort`` (the temporary file is removed). After ``finish``, ``digest`` is
    (size in bytes, ``index.output_digest``) of the output.

    Args:
        path: the output file (its folder is created).
        n_tokens: rows of ``frames`` (T'); with ``frames_dim=None`` no frames are written.
        frames_dim: width of ``frames`` (L * D), or ``None``.
        dtype: the frames' numpy dtype.
        frames_name: the member the rows go to ("frames", or "scores" for a head's scores).
        extras: further arrays written on ``finish`` (e.g. ``labels``), by member name.

    Raises:
        OSError: the temporary file cannot be created.
    """

    def __init__(
        self,
        path: Path,
        n_tokens: int | None,
        frames_dim: int | None,
        dtype: np.dtype,
        frames_name: str = "frames",
        extras: dict[str, np.ndarray] | None = None,
    ):
        self.path = path
        self.extras = dict(extras or {})
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = AtomicFile(path, "wb")
        self.digest: tuple[int, str] | None = None
        self.member = None
        try:
            self.zip = zipfile.ZipFile(self.file.file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            if frames_dim is not None:
                self.member = self.zip.open(f"{frames_name}.npy", "w", force_zip64=True)
                descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
                header = {"descr": descr, "fortran_order": False, "shape": (n_tokens, frames_dim)}
                np.lib.format.write_array_header_1_0(self.member, header)
        except BaseException:
            self.file.discard()
            raise

    @property
    def tmp(self) -> Path:
        """The temporary file being written."""
        return self.file.tmp

    def write_frames(self, rows: np.ndarray) -> None:
        """Append (n, frames_dim) rows of ``frames``."""
        self.member.write(np.ascontiguousarray(rows).tobytes())

    def finish(self, clip: np.ndarray | None, frames_dim: int | None, dtype, timestamps: np.ndarray | None) -> None:
        """Write ``clip`` (C,) and ``timestamps`` (T',) (when given), close, and rename to the output."""
        if self.member is not None:
            self.member.close()
            self.member = None
        for name, array in (("clip", clip), ("timestamps", timestamps), *self.extras.items()):
            if array is not None:
                with self.zip.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
        self.zip.close()
        self.file.file.flush()
        self.digest = output_digest(self.file.file.fileno())
        self.file.commit()

    def abort(self) -> None:
        """Close and remove the temporary file (never raises for a file that cannot be closed)."""
        try:
            if self.member is not None:
                self.member.close()
            self.zip.close()
        except (OSError, ValueError):
            pass
        self.file.discard()
