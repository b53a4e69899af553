"""The one way the package writes a file: whole, in one step, or not at all, never through a link.

Every output (converted weights, heads, labels, checksums, folder-run outputs, indexes and
metadata, training checkpoints and logs) is written to a new temporary file beside it and renamed
over its final name:

- the temporary file is created with an exclusive, no-follow open (``O_CREAT | O_EXCL |
  O_NOFOLLOW``) under a random name, ``.NAME.<16 hex digits>.partial`` (``temp_name``), so a link or
  file planted at any name is never written through or truncated;
- ``os.replace`` renames it over ``NAME``; a symbolic link at ``NAME`` is replaced itself, its
  target is untouched (``rename`` never follows its destination);
- readers and concurrent writers never see a partial file; a failed write removes the temporary
  file and leaves ``NAME`` as it was.

``AtomicFile`` / ``open_atomic`` hand out the temporary file as an open file object (streaming
writers: the ``.npz`` sink, ``torch.save``, CSV); ``atomic_write`` passes its path to writers that
only take a file name (safetensors). ``open_append`` appends to a file without following a link
(an index that grows row by row). ``is_temp_name`` recognises leftovers of a killed process.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".partial"  # .NAME.<16 hex digits>.partial
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}" + re.escape(TEMP_SUFFIX) + r"$", re.DOTALL)
_NAME_BYTES = 160  # of NAME kept in a temporary name, so it stays within the usual 255-byte limit
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def temp_name(name: str) -> str:
    """A new random temporary name for a file to be renamed to ``name``: ``.NAME.<16 hex>.partial``
    (``NAME`` cut to 160 bytes)."""
    kept = os.fsdecode(os.fsencode(name)[:_NAME_BYTES])
    return f".{kept}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of ``temp_name``'s."""
    return _TEMP.match(name) is not None


def temp_target(name: str) -> str | None:
    """The final name a temporary name was made for (possibly cut short), or ``None`` for other names."""
    m = _TEMP.match(name)
    return m.group("name") if m else None


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC)``: a symbolic link at ``path`` raises
    ``OSError`` (ELOOP) instead of being followed. Returns the file descriptor."""
    return os.open(path, flags | _NOFOLLOW, mode)


def read_at(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of an open file from ``offset`` (``os.pread``; a seek and a read where it is missing)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file beside ``path`` (exclusive, no-follow; ``0o666`` less the
    umask, the permissions of any new file). Returns (descriptor open for reading and writing, its path)."""
    while True:
        tmp = path.with_name(temp_name(path.name))
        try:
            return open_no_follow(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL), tmp
        except FileExistsError:  # 2**64 names: only a planted file gets here
            continue


class AtomicFile:
    """A file written in one step: ``file`` is a new temporary file beside ``path``; ``commit()``
    renames it over ``path``, ``discard()`` removes it. As a context manager it commits on success
    and discards on an exception.

    Args:
        path: the final name (its folder must exist).
        mode: ``open`` mode of ``file``: ``"wb"`` (default) or ``"w"``; the file is open for
            reading too (``read_at(file.fileno(), ...)`` once flushed).
        **kwargs: passed to ``open`` (``encoding``, ``newline``, ...).

    Raises:
        OSError: the temporary file cannot be created (missing folder, permissions, a full disk).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", **kwargs):
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes new files: mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        fd, self.tmp = _create_temp(self.path)
        try:
            self.file: IO = os.fdopen(fd, mode.replace("w", "w+"), **kwargs)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> Path:
        """Close the file and rename it over ``path`` (a link there is replaced, not followed); returns ``path``.
        On failure the temporary file is removed."""
        try:
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary file; ``path`` is left as it was (never raises for the close)."""
        try:
            self.file.close()
        except (OSError, ValueError):
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def open_atomic(path: str | os.PathLike, mode: str = "wb", **kwargs) -> AtomicFile:
    """``with open_atomic(path, "w", encoding="utf-8") as f: f.write(...)``: ``path`` appears, complete,
    when the block ends without an exception (``AtomicFile``)."""
    return AtomicFile(path, mode, **kwargs)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` in one step through a writer that takes a file name: ``write(tmp)`` fills a new
    temporary file beside ``path``, which then replaces ``path``. Prefer ``open_atomic`` for writers
    that take a file object: they never reopen the file by name.

    If ``write`` fails the temporary file is removed and ``path`` is left as it was. The file keeps
    the usual permissions (``0o666`` less the umask) even when the writer replaced the file it was
    given; a temporary file turned into a link is refused. Returns ``path``.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        st = os.lstat(tmp)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ELOOP, "the temporary file was replaced by something else than a file", str(tmp))
        if stat.S_IMODE(st.st_mode) != mode:  # some writers replace the file they are given
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file with ``open_atomic``; returns ``path``."""
    with open_atomic(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def open_append(path: str | os.PathLike, **kwargs) -> IO:
    """Open a text file for appending (created when missing) without following a link: a symbolic
    link at ``path`` is removed (its target is untouched) and a new file takes its place.
    ``kwargs`` go to ``open`` (``encoding``, ``newline``)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        fd = open_no_follow(path, flags)
    except OSError as e:
        if e.errno != errno.ELOOP or not os.path.islink(path):
            raise
        os.unlink(path)
        fd = open_no_follow(path, flags | os.O_EXCL)
    return os.fdopen(fd, "a", **kwargs)
