"""The one way the package writes a file: whole, in one step, or not at all.

Every output (converted weights, heads, labels, checksums, folder-run outputs, indexes and
metadata, training checkpoints and logs) goes through ``atomic_write``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's umask (read by setting a common one for an instant and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` in one step: ``write(tmp)`` fills a new, uniquely named temporary file in the
    same folder (``tempfile.mkstemp``), which then replaces ``path`` (``os.replace``).

    Readers and concurrent writers (threads or processes) never see a partial file; if ``write``
    fails the temporary file is removed and ``path`` is left as it was. The file gets the usual
    permissions (``0o666`` less the umask), not ``mkstemp``'s owner-only ones. Returns ``path``.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after writing: some writers replace the file they are given
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file with ``atomic_write``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
