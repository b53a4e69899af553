"""Which files a folder run embeds: INPUT (a folder, an audio file or a list of paths) -> sorted
``InputFile`` rows with the output each one gets, and the stable hash that splits them into shards.

What counts as audio is ``audio.AUDIO_EXTENSIONS`` / ``audio.is_audio_path``, the rule training
uses too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..audio import AUDIO_EXTENSIONS, PathLike, is_audio_path

#: An INPUT ending in one of these (or written ``@FILE``) is a list of paths, one per line.
LIST_EXTENSIONS = (".txt", ".lst", ".list")
OUTPUT_SUFFIX = ".npz"  # INPUT/a/b.wav -> OUT/a/b.wav.npz
_SHARD_FORMAT = "shard must be 'i/N' with 0 <= i < N (e.g. '0/4'), got {!r}"


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
        """The output's path relative to OUT."""
        return self.rel + OUTPUT_SUFFIX


def _stat(path: Path, rel: str) -> InputFile:
    try:
        st = path.stat()
        return InputFile(path, rel, st.st_size, st.st_mtime_ns)
    except OSError:
        return InputFile(path, rel, -1, -1)


def _list_file(source: str) -> Path | None:
    """The list file an INPUT names (``@FILE`` or a list extension), else ``None``."""
    if source.startswith("@"):
        return Path(source[1:])
    return Path(source) if source.lower().endswith(LIST_EXTENSIONS) else None


def _from_list(listed: Path) -> tuple[list[InputFile], int]:
    """The audio files a list file names, relative to the deepest folder holding them all."""
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
    return [_stat(p, p.relative_to(root).as_posix()) for p in audio_paths], len(paths) - len(audio_paths)


def _from_folder(root: Path, exclude: Path | None) -> tuple[list[InputFile], int]:
    """The audio files below a folder (hidden entries and ``exclude`` skipped), and the others' count."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d != exclude)
        for name in filenames:
            if is_audio_path(name):
                files.append(_stat(here / name, (here / name).relative_to(root).as_posix()))
            else:
                ignored += 1
    return files, ignored


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
    path = Path(source).resolve()
    if listed is not None:
        files, ignored = _from_list(listed)
    elif path.is_file():
        if not is_audio_path(path):
            raise ValueError(
                f"{source!r} is neither an audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}) nor a list file "
                f"(@FILE or {', '.join(LIST_EXTENSIONS)})"
            )
        files, ignored = [_stat(path, path.name)], 0
    elif path.is_dir():
        files, ignored = _from_folder(path, Path(exclude).resolve() if exclude is not None else None)
    else:
        raise FileNotFoundError(f"no such file or folder: {source!r}")
    return sorted(files, key=lambda f: f.rel), ignored


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/N"`` or ``(i, N)`` -> (i, N) with 0 <= i < N; ``None`` -> ``None`` (no sharding)."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in (spec.split("/") if isinstance(spec, str) else spec))
    except (ValueError, TypeError):
        raise ValueError(_SHARD_FORMAT.format(spec)) from None
    if not 0 <= i < n:
        raise ValueError(_SHARD_FORMAT.format(spec))
    return i, n


def shard_of(rel: str, n: int) -> int:
    """The shard (0..n-1) of a relative path: a stable hash (SHA-1) of the path, the same on every machine."""
    return int.from_bytes(hashlib.sha1(rel.encode("utf-8")).digest()[:8], "big") % n


def in_shard(files: Sequence[InputFile], shard: tuple[int, int] | None) -> list[InputFile]:
    """The files of shard (i, N) (``parse_shard``), or all of them for ``None``."""
    if shard is None:
        return list(files)
    i, n = shard
    return [f for f in files if shard_of(f.rel, n) == i]
