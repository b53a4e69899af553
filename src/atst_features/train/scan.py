"""The data scan before step 1: which files are unusable, found in parallel and cached per corpus.

Every training file's header is read (``audio.audio_info``; no decoding) by a pool of threads. A
file is unusable when it is missing, cannot be opened as audio, holds no samples, or is too short
for one 40 ms patch (fewer than ``frontend.MIN_SAMPLES`` samples at 16 kHz). Unusable files are
listed in ``OUT/data_report.csv`` (``file,reason,when``) and left out of the run, or, with
``--strict-data``, stop it before anything is built.

The result is cached per corpus (per ``--data`` source) in ``$ATST_FEATURES_CACHE/train-scan/``
(``weights.cache_dir``): one entry per file with its size and modification time, so a second run
on the same corpus only reads the headers of new or changed files. Under ``torchrun`` every process
scans an equal share of the uncached files and the shares are merged, so all processes keep the
same list.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .. import atomic, weights
from ..audio import audio_info
from ..frontend import MIN_SAMPLES, SAMPLE_RATE

REPORT_NAME = "data_report.csv"
CACHE_DIR = "train-scan"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """An unusable training file and why (``when``: "scan" or "step N")."""

    path: str
    reason: str
    when: str = "scan"


@dataclass(frozen=True)
class ScanResult:
    """Indices (into the scanned list) of the usable files, the problems, and how many came from the cache."""

    keep: list[int]
    problems: list[Problem]
    cached: int


def probe(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be trained on, or ``None`` when its header is fine."""
    try:
        if os.path.getsize(path) == 0:
            return "empty: 0 bytes"
        info = audio_info(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return "unreadable: " + str(e).replace(repr(os.fspath(path)), "the file")
    if info.frames <= 0:
        return "empty: no samples"
    samples = info.frames * SAMPLE_RATE / info.sample_rate
    if samples < MIN_SAMPLES:
        return f"too short: {info.duration * 1000:.1f} ms, at least {MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms needed"
    return None


def _stamp(path: str) -> list[int] | None:
    """(size in bytes, modification time in ns) of a file; ``None`` if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_path(source: str | os.PathLike) -> Path:
    """Where the scan of the corpus ``source`` (the ``--data`` argument) is cached."""
    key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:20]
    return weights.cache_dir() / CACHE_DIR / f"{key}.json"


def _read_cache(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("files")
    return entries if isinstance(entries, dict) else {}


def _write_cache(path: Path, source: str, entries: dict[str, list]) -> None:
    """Write the cache; a cache that cannot be written costs a warning, not the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "source": source, "files": entries}, separators=(",", ":"))
        atomic.write_text_atomic(path, text)
    except OSError as e:
        warnings.warn(f"cannot write the data-scan cache {str(path)!r}: {e}", stacklevel=2)


def probe_all(paths: Sequence[str], workers: int, show: bool = False) -> list[str | None]:
    """``probe`` each path with ``workers`` threads (headers only, so threads suffice); in order."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(probe, paths)
        return list(tqdm(results, total=len(paths), desc="scanning data", unit="file", disable=not show, leave=False))


def scan(
    files: Sequence[Path],
    source: str,
    workers: int,
    share: tuple[int, int] = (0, 1),
    merge: Callable[[dict[str, str | None]], list[dict[str, str | None]]] | None = None,
    show: bool = False,
    use_cache: bool = True,
) -> ScanResult:
    """Check every file of a corpus (see the module docstring).

    Args:
        files: the training files, in training order.
        source: the ``--data`` argument (the cache key).
        workers: threads reading headers.
        share: (rank, world size): this process probes every world-th uncached file.
        merge: gathers every process's {path: reason} (a collective), or ``None`` for one process.
        show: a progress bar (rank 0).
        use_cache: read and (``share[0] == 0``) write the per-corpus cache.
    """
    names = [str(f) for f in files]
    stamps = {n: _stamp(n) for n in dict.fromkeys(names)}
    cache = cache_path(source) if use_cache else None
    cached = _read_cache(cache) if cache is not None else {}
    known = {n: e[2] for n, e in cached.items() if n in stamps and stamps[n] is not None and e[:2] == stamps[n]}
    todo = [n for n in stamps if n not in known]
    rank, world = share
    mine = todo[rank::world]
    found = dict(zip(mine, probe_all(mine, workers, show)))
    if merge is not None:
        for part in merge(found):
            found.update(part)
    reasons = {**known, **found}
    if cache is not None and rank == 0 and found:
        _write_cache(cache, source, {n: [*stamps[n], reasons[n]] for n in stamps if stamps[n] is not None})
    keep = [i for i, n in enumerate(names) if reasons[n] is None]
    problems = [Problem(n, reasons[n]) for n in dict.fromkeys(names) if reasons[n] is not None]
    return ScanResult(keep=keep, problems=problems, cached=len(known))


def write_report(path: str | os.PathLike, problems: Sequence[Problem]) -> Path:
    """Write ``OUT/data_report.csv`` afresh: one row per unusable file (an empty table when none)."""
    with atomic.open_atomic(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "reason", "when"])
        w.writerows([p.path, p.reason, p.when] for p in problems)
    return Path(path)


def append_report(path: str | os.PathLike, problems: Sequence[Problem]) -> None:
    """Add files that failed during training to the report."""
    with atomic.open_append(path, newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([p.path, p.reason, p.when] for p in problems)


def summary(n_files: int, result: ScanResult, report: Path | None) -> str:
    """One line: how many files are used, how many were left out and where they are listed."""
    n_bad = len(result.problems)
    line = f"data: {len(result.keep)} of {n_files} files usable"
    if n_bad:
        where = f", listed in {report}" if report is not None else ""
        line += f"; {n_bad} skipped (unreadable, empty or too short{where})"
    if result.cached:
        line += f" ({result.cached} from the scan cache)"
    return line
