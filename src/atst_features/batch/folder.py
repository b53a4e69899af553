"""The output folder of a run: one writer at a time, no links followed, no leftovers, clear errors.

- ``FolderLock``: a run holds an OS lock (``fcntl.lockf``, a POSIX record lock: held by the process,
  not by the decoding workers it forks, and released by the kernel when it exits or dies; shared
  file systems such as NFS support it) on its own lock file, ``OUT/.index.jsonl.lock`` or, for shard i of N,
  ``OUT/.index.shard-i-of-N.jsonl.lock``, for the whole run, with its pid, host, start time, shard
  and settings key written in it. Runs start one at a time (a brief lock on ``OUT/.atst-features.lock``)
  and a new run is refused (``FolderBusy``: "another run (pid N, started T) is writing to OUT") when
  a live run holds its lock file, or when it is unsharded and any run is live, or when shards of a
  different N or with different settings are live. Shards of one N with the same settings share a
  folder: shard membership is a hash of the input's path, so no two of them write the same output.
- ``clean_leftovers``: temporary files (``atomic.is_temp_name``, and ``NAME.npz.partial`` of earlier
  versions) a killed run left behind are removed at the next start: only inside OUT, links removed
  as links, linked folders not entered; a shard removes only those of its own outputs.
- ``output_dir``: an output's folder below OUT, created without following links.
- ``OutputFolderError``: OUT cannot be used (a file, not writable, a full disk), in one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..atomic import is_temp_name, open_no_follow, read_at, temp_target
from .discovery import OUTPUT_SUFFIX, shard_of
from .index import index_name

try:
    import fcntl
except ImportError:  # Windows: byte-range locks instead
    fcntl = None
    import msvcrt

SETUP_LOCK = ".atst-features.lock"  # held for a moment while a run starts
SETUP_WAIT_S = 30.0  # a run waits this long for another run's start (model loading is outside it)
_RUN_LOCK = re.compile(r"^\.index(?:\.shard-(\d+)-of-(\d+))?\.jsonl\.lock$")
_LEGACY_PARTIAL = OUTPUT_SUFFIX + ".partial"  # NAME.npz.partial, written by versions before 0.2
_WINDOWS_LOCK_BYTE = 1 << 20  # the byte msvcrt locks, past the holder's record
_BUSY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK)
_START_ERRORS = {
    errno.ENOSPC: "no space left on its device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a folder above it is a file",
    errno.ELOOP: "a symbolic link is in the way",
}


class OutputFolderError(RuntimeError):
    """The output folder cannot be used: a file, not writable, a full disk, busy (``FolderBusy``).
    The run did nothing and left nothing behind."""


class FolderBusy(OutputFolderError):
    """Another live run is writing to the output folder."""


def run_lock_name(shard: tuple[int, int] | None) -> str:
    """The lock file of a run: ``.index.jsonl.lock`` or ``.index.shard-i-of-N.jsonl.lock``."""
    return f".{index_name(shard)}.lock"


def start_error(e: OSError, out: Path) -> OutputFolderError:
    """One line for an ``OSError`` met while preparing ``out``."""
    reason = _START_ERRORS.get(e.errno, e.strerror or str(e))
    where = f" ({os.fsdecode(e.filename)!r})" if e.filename and Path(os.fsdecode(e.filename)) != out else ""
    return OutputFolderError(f"cannot write to the output folder {str(out)!r}: {reason}{where}")


# ============================================================================ OS locks


def _try_lock(fd: int, shared: bool = False) -> bool:
    """Lock an open file without waiting; False when another open file holds a conflicting lock."""
    try:
        if fcntl is not None:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)  # the whole file
        else:
            os.lseek(fd, _WINDOWS_LOCK_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in _BUSY:
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (a run that held it may have removed it)."""
    try:
        st, here = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _open_lock_file(path: Path) -> int:
    """Open (create) a lock file for writing without following a link; a link there is removed."""
    try:
        return open_no_follow(path, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno != errno.ELOOP or not path.is_symlink():
            raise
        path.unlink()
        return open_no_follow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)


def _take(path: Path, wait_s: float = 0.0) -> int | None:
    """An exclusive lock on the file ``path`` (created), waiting up to ``wait_s``; the open
    descriptor, or None when another process holds it."""
    deadline = time.monotonic() + wait_s
    while True:
        fd = _open_lock_file(path)
        if _try_lock(fd):
            if _same_file(fd, path):
                return fd
        elif time.monotonic() >= deadline:
            os.close(fd)
            return None
        else:
            time.sleep(0.05)
        os.close(fd)


def _remove_held(fd: int, path: Path) -> None:
    """Remove the lock file we hold and release it (others then lock a new file: ``_same_file``)."""
    try:
        if _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    os.close(fd)


@dataclass(frozen=True)
class Holder:
    """A live run, as written in its lock file."""

    pid: int | None
    host: str | None
    started: str | None
    shard: tuple[int, int] | None
    settings: str | None

    def busy(self, out: Path, why: str = "") -> FolderBusy:
        """The refusal of a new run: 'another run (pid N, started T) is writing to OUT'."""
        about = [f"pid {self.pid if self.pid is not None else '?'}"]
        if self.host and self.host != socket.gethostname():
            about[0] += f" on {self.host}"
        about.append(f"started {self.started or '?'}")
        if self.shard is not None:
            about.append(f"shard {self.shard[0]}/{self.shard[1]}")
        text = f"another run ({', '.join(about)}) is writing to {str(out)!r}"
        return FolderBusy(text + (f" {why}" if why else ""))


def _live_holder(path: Path) -> Holder | None:
    """The run holding the lock file ``path``, or None when no live process holds it."""
    m = _RUN_LOCK.match(path.name)
    try:
        fd = open_no_follow(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, shared=True):
            return None
        try:
            record = json.loads(read_at(fd, 4096, 0) or b"{}")
        except (ValueError, OSError):
            record = {}
    finally:
        os.close(fd)
    record = record if isinstance(record, dict) else {}
    shard = (int(m.group(1)), int(m.group(2))) if m and m.group(1) is not None else None
    return Holder(record.get("pid"), record.get("host"), record.get("started"), shard, record.get("settings"))


# ============================================================================ the run's lock


class FolderLock:
    """The lock of one run on its output folder (see the module docstring). A lock of the process:
    two runs in one process on one folder at once are not told apart.

    ``acquire()`` creates OUT when missing and takes the run's lock (or raises ``FolderBusy`` /
    ``OutputFolderError``, leaving nothing behind); ``agree(key, write_metadata)`` checks the
    settings against live shards and writes ``metadata.json``; ``release(undo)`` lets go (``undo``:
    after a failed start, also removes what ``acquire`` created).

    Args:
        out: the output folder.
        shard: (i, N) of a sharded run, or None.
    """

    def __init__(self, out: Path, shard: tuple[int, int] | None):
        self.out, self.shard = out, shard
        self.path = out / run_lock_name(shard)
        self.fd: int | None = None
        self.created: list[Path] = []  # folders made by acquire(), outermost first
        self.record = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "shard": list(shard) if shard else None, "settings": None,
        }

    @contextmanager
    def _starting(self) -> Iterator[None]:
        """Hold the folder's start lock (runs start one at a time); OS errors become ``OutputFolderError``."""
        path = self.out / SETUP_LOCK
        try:
            fd = _take(path, SETUP_WAIT_S)
        except OSError as e:
            raise start_error(e, self.out) from e
        if fd is None:
            raise FolderBusy(f"another run has been starting in {str(self.out)!r} for {SETUP_WAIT_S:.0f} s")
        try:
            yield
        except OSError as e:
            raise start_error(e, self.out) from e
        finally:
            _remove_held(fd, path)  # a tidy folder; a run waiting for it locks a new file (``_same_file``)

    def _others(self) -> list[Holder]:
        """The other live runs in OUT."""
        try:
            names = [n for n in os.listdir(self.out) if _RUN_LOCK.match(n) and n != self.path.name]
        except OSError:
            return []
        return [h for h in map(_live_holder, (self.out / n for n in sorted(names))) if h is not None]

    def _write_record(self) -> None:
        data = json.dumps(self.record).encode()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, data)

    def acquire(self) -> None:
        """Create OUT (when missing), take this run's lock, and remove the leftovers of killed runs
        that are this run's to remove (``clean_leftovers``).

        Raises:
            FolderBusy: another live run conflicts (see the module docstring).
            OutputFolderError: OUT is a file, cannot be created or written, or its disk is full.
        """
        try:
            self.created = _make_folders(self.out)
            with self._starting():
                fd = _take(self.path)
                if fd is None:
                    holder = _live_holder(self.path) or Holder(None, None, None, self.shard, None)
                    raise holder.busy(self.out)
                self.fd = fd
                for other in self._others():
                    if self.shard is None or other.shard is None or other.shard[1] != self.shard[1]:
                        raise other.busy(self.out)
                self._write_record()
            clean_leftovers(self.out, self.shard)
        except OSError as e:
            self.release(undo=True)
            raise start_error(e, self.out) from e
        except BaseException:
            self.release(undo=True)
            raise

    def agree(self, key: str, write_metadata: Callable[[], None]) -> None:
        """Record this run's settings ``key``; refuse (``FolderBusy``) when a live shard has other
        settings; then ``write_metadata()`` (no other run starts meanwhile)."""
        with self._starting():
            for other in self._others():
                if other.settings not in (None, key):
                    raise other.busy(self.out, "with other settings (use the same settings for every shard)")
            self.record["settings"] = key
            self._write_record()
            for name in os.listdir(self.out):  # leftovers of metadata.json writes: only ever written here
                if is_temp_name(name) and temp_target(name) == "metadata.json":
                    _remove_leftover(self.out / name)
            write_metadata()

    def release(self, undo: bool = False) -> None:
        """Let go of the lock (removing the lock file); with ``undo``, also remove the folders
        ``acquire`` created, when empty."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                with self._starting():
                    _remove_held(fd, self.path)
            except OutputFolderError:
                _remove_held(fd, self.path)
        if undo:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:
                    break
            self.created = []


def _make_folders(out: Path) -> list[Path]:
    """Create ``out`` and missing folders above it; the ones created, outermost first.

    Raises:
        OutputFolderError: ``out`` is a file, or cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"the output folder {str(out)!r} is a file, not a folder")
    missing = []
    here = out
    while not here.is_dir():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as e:
        for folder in reversed(created):
            folder.rmdir()
        if isinstance(e, FileExistsError):  # not a folder, yet there: a file or a broken link
            raise OutputFolderError(
                f"cannot create the output folder {str(out)!r}: {os.fsdecode(e.filename)!r} is a file or a broken link"
            ) from e
        raise start_error(e, out) from e
    return created


# ============================================================================ inside the folder


def output_dir(out: Path, rel: str, known: set[str]) -> Path:
    """The folder of output ``rel`` (POSIX, relative to ``out``), created when missing without
    following links; ``known`` caches folders already checked.

    Raises:
        OSError: a folder on the way is a symbolic link (ELOOP) or a file (ENOTDIR).
    """
    parent = Path(rel).parent
    here = out
    for part in parent.parts:
        here = here / part
        key = here.relative_to(out).as_posix()
        if key in known:
            continue
        try:
            here.mkdir()
        except FileExistsError:
            mode = os.lstat(here).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, "is a symbolic link; outputs are not written through links", str(here)) from None
            if not stat.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(here)) from None
        known.add(key)
    return here


def _remove_leftover(path: Path) -> bool:
    """Remove a leftover temporary file or link (never a folder, never a link's target)."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            os.unlink(path)
            return True
    except FileNotFoundError:
        pass
    return False


def _leftover_target(name: str) -> str | None:
    """The final name a leftover temporary file was for; "" when unknown (a cut name); None: not a leftover."""
    if is_temp_name(name):
        return temp_target(name) or ""
    if name.endswith(_LEGACY_PARTIAL) and not name.startswith("."):  # hidden inputs have no outputs
        return name[: -len(".partial")]
    return None


def clean_leftovers(out: Path, shard: tuple[int, int] | None) -> int:
    """Remove the temporary files killed runs left in ``out`` (see the module docstring); with a
    shard, only those of the shard's own outputs and index. Returns how many were removed."""
    own_index = index_name(shard)
    removed = 0
    for dirpath, dirnames, filenames in os.walk(out):  # linked folders are listed, not entered
        here = Path(dirpath)
        for name in [*filenames, *dirnames]:
            target = _leftover_target(name)
            if target is None:
                continue
            if shard is not None:
                rel = (here / target).relative_to(out).as_posix() if target else ""
                mine = rel == own_index or (
                    rel.endswith(OUTPUT_SUFFIX) and shard_of(rel[: -len(OUTPUT_SUFFIX)], shard[1]) == shard[0]
                )
                if not mine:
                    continue
            removed += _remove_leftover(here / name)
    return removed
