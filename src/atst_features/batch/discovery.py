"""Which files a folder run embeds: one or several INPUTs (folders, audio files, lists of paths,
``-`` for a list on stdin) -> sorted ``InputFile`` rows with the output each one gets, and the stable
hash that splits them into shards.

What counts as audio is ``audio.AUDIO_EXTENSIONS`` / ``audio.is_audio_path``, the rule training
uses too; containers (``audio.AV_EXTENSIONS``: m4a, MP4, WebM, WMA, ...) count as well when PyAV
(the ``av`` extra) is installed, and are counted apart (``Inputs.containers``) when it is not.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .. import audio
from ..audio import AUDIO_EXTENSIONS, AV_EXTENSIONS, PathLike, is_audio_path

#: An INPUT ending in one of these (or written ``@FILE``) is a list of paths, one per line.
LIST_EXTENSIONS = (".txt", ".lst", ".list")
STDIN = "-"  # an INPUT written ``-``: a list of paths read from standard input
AV_HINT = "pip install 'atst-features[av]'"  # what embeds the container files (PyAV)
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


def _is_container(path: PathLike) -> bool:
    """Whether a file is a container decoded through PyAV (``AV_EXTENSIONS``, hidden files never are)."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in AV_EXTENSIONS


class _Kinds:
    """Sorts names into inputs, containers that cannot be decoded here (no PyAV) and other files."""

    def __init__(self):
        self.av = audio._pyav() is not None
        self.ignored = self.containers = 0

    def take(self, path: PathLike) -> bool:
        """Whether ``path`` is an input; counts it as ignored or as a left-out container otherwise."""
        if is_audio_path(path) or (self.av and _is_container(path)):
            return True
        if _is_container(path):
            self.containers += 1
        else:
            self.ignored += 1
        return False


def _list_file(source: str) -> Path | None:
    """The list file an INPUT names (``@FILE`` or a list extension), else ``None``."""
    if source.startswith("@"):
        return Path(source[1:])
    return Path(source) if source.lower().endswith(LIST_EXTENSIONS) else None


def _from_lines(lines: Iterable[str], base: Path, kinds: _Kinds) -> tuple[list[InputFile], Path]:
    """The audio files a list names (relative paths from ``base``), relative to the deepest folder
    holding them all, and that folder."""
    paths = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line).expanduser()
            paths.append((p if p.is_absolute() else base / p).resolve())
    audio_paths = [p for p in dict.fromkeys(paths) if kinds.take(p)]
    root = Path(os.path.commonpath([str(p.parent) for p in audio_paths])) if audio_paths else base.resolve()
    return [_stat(p, p.relative_to(root).as_posix()) for p in audio_paths], root


def _from_list(listed: Path, kinds: _Kinds) -> tuple[list[InputFile], Path]:
    if not listed.is_file():
        raise FileNotFoundError(f"list file {str(listed)!r} does not exist")
    return _from_lines(listed.read_text(encoding="utf-8").splitlines(), listed.parent, kinds)


def _from_folder(root: Path, exclude: Path | None, kinds: _Kinds) -> list[InputFile]:
    """The audio files below a folder (hidden entries and ``exclude`` skipped)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d != exclude)
        for name in filenames:
            if kinds.take(name):
                files.append(_stat(here / name, (here / name).relative_to(root).as_posix()))
    return files


def _one(source: PathLike, exclude: Path | None, kinds: _Kinds) -> tuple[list[InputFile], Path]:
    """(files relative to the INPUT's root, its anchor): with several INPUTs, outputs are
    relative to the deepest folder holding every anchor (a folder's or file's parent, a list's root)."""
    source = os.fspath(source)
    if source == STDIN:
        files, root = _from_lines(sys.stdin.read().splitlines(), Path.cwd(), kinds)
        return files, root
    listed = _list_file(source)
    path = Path(source).resolve()
    if listed is not None:
        files, root = _from_list(listed, kinds)
        return files, root
    if path.is_file():
        if not (is_audio_path(path) or _is_container(path)):
            raise ValueError(
                f"{source!r} is neither an audio file ({', '.join(sorted(AUDIO_EXTENSIONS))}) nor a list file "
                f"(@FILE, {', '.join(LIST_EXTENSIONS)} or - for standard input)"
            )
        return ([_stat(path, path.name)] if kinds.take(path) else []), path.parent
    if path.is_dir():
        return _from_folder(path, exclude, kinds), path.parent  # the folder's name stays in the outputs' paths
    raise FileNotFoundError(f"no such file or folder: {source!r}")


class ContainersSkipped(UserWarning):
    """Warned by ``embed_folder`` when container files were left out because PyAV is not installed;
    ``count`` says how many."""

    def __init__(self, count: int):
        self.count = count
        super().__init__(
            f"{count} container file{'s' if count != 1 else ''} ({', '.join(sorted(AV_EXTENSIONS))}) skipped: "
            f"decoding them needs PyAV ({AV_HINT})"
        )


@dataclass(frozen=True)
class Inputs:
    """What ``find_inputs_many`` found.

    Attributes:
        files: the inputs, sorted by relative path (unique).
        ignored: files that are not audio.
        containers: container files (``AV_EXTENSIONS``) left out because PyAV is not installed
            (``AV_HINT`` installs it); 0 when it is, as they are then among ``files``.
    """

    files: list[InputFile]
    ignored: int
    containers: int


def find_inputs_many(sources: PathLike | Sequence[PathLike], exclude: PathLike | None = None) -> Inputs:
    """The audio files named by one or several INPUTs (see ``find_inputs``), as ``Inputs``.

    One INPUT keeps the paths of ``find_inputs``. With several, each file's relative path (its
    output's path under OUT) is taken from the deepest folder holding every INPUT: a folder keeps
    its own name (``embed a/ b/`` -> ``OUT/a/...``, ``OUT/b/...``), a file or list its paths below
    that folder. A file named twice is embedded once.

    Raises:
        FileNotFoundError: an INPUT (or a list file) does not exist.
        ValueError: no INPUT; a file that is neither audio nor a list; ``-`` given twice; two
            inputs whose outputs would be the same path.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("no INPUT given")
    if sum(os.fspath(s) == STDIN for s in sources) > 1:
        raise ValueError("'-' (paths on standard input) can be given once")
    kinds = _Kinds()
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = [_one(s, excluded, kinds) for s in sources]
    if len(found) == 1:
        files = found[0][0]
    else:
        try:
            base = Path(os.path.commonpath([str(anchor) for _, anchor in found]))
        except ValueError:  # different drives
            raise ValueError("the INPUTs have no common folder (different drives); run them one at a time") from None
        files = [replace(f, rel=f.path.relative_to(base).as_posix()) for part, _ in found for f in part]
    files = list({f.path: f for f in files}.values())  # a file named twice is embedded once
    by_rel: dict[str, Path] = {}
    for f in files:
        other = by_rel.setdefault(f.rel, f.path)
        if other != f.path:
            raise ValueError(f"{str(other)!r} and {str(f.path)!r} would both be written to {f.output!r}; "
                             "embed them into different OUT folders")
    return Inputs(sorted(files, key=lambda f: f.rel), kinds.ignored, kinds.containers)


def find_inputs(source: PathLike, exclude: PathLike | None = None) -> tuple[list[InputFile], int]:
    """The audio files named by ``source``, sorted by relative path, and the number of files ignored.

    Args:
        source: a folder (searched recursively, hidden entries skipped), an audio file, or a list
            file: a path written ``@FILE`` or ending in .txt / .lst / .list (or ``-``: standard
            input), holding one path per line (blank lines and lines starting with ``#`` are
            skipped; relative paths are taken from the list file's folder, or the current one for
            ``-``). Listed files keep paths relative to the deepest folder that holds them all.
            Several INPUTs: ``find_inputs_many``.
        exclude: a folder not to search (the output folder, when it lies inside ``source``).

    Returns:
        (files, ignored): files with an audio extension (and the containers of ``AV_EXTENSIONS``
        when PyAV is installed); ``ignored`` counts the other files.

    Raises:
        FileNotFoundError: ``source`` (or the list file) does not exist.
        ValueError: a single file that is neither audio nor a list.
    """
    found = find_inputs_many([source], exclude)
    return found.files, found.ignored + found.containers


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
