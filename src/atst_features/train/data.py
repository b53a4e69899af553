"""Training data: which files, which crops, in which order.

Audio is decoded in DataLoader workers with ``atst_features.audio.load_audio`` (mono, resampled
to 16 kHz) and cropped there; the log-mel is computed later on the training device. Each item's
random crop comes from a generator seeded by (seed, epoch, index), so it does not depend on the
number of workers and a resumed run sees the same crops.

Files are checked before the first step (``scan``); one that still fails to decode later (a disk
that changed) is replaced by the next file of the list, and the batch says which (``skipped``), so
a bad file costs one warning, never the run.

Data sources (``--data``):
- a folder: every audio file below it (recursive), sorted; what is audio is the package's one rule
  (``audio.is_audio_path``: an extension of ``audio.AUDIO_EXTENSIONS``, not a hidden file);
- a ``.txt`` / ``.lst`` file: one path per line (relative paths are relative to the list file);
- a ``.csv`` file with a ``file`` column and, for fine-tuning, a ``labels`` column holding the
  clip's labels separated by ``;`` (relative paths are relative to the CSV file).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ..audio import AUDIO_EXTENSIONS, is_audio_path, load_audio
from ..frontend import MIN_SAMPLES, SAMPLE_RATE

LIST_SUFFIXES = frozenset({".txt", ".lst"})


def _resolve(entry: str, base: Path) -> Path:
    path = Path(entry).expanduser()
    return path if path.is_absolute() else base / path


def list_audio(source: str | os.PathLike) -> list[Path]:
    """The audio files of a folder (recursive, sorted), a ``.txt``/``.lst`` list or a CSV's ``file`` column."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if is_audio_path(p) and p.is_file())
        if not files:
            raise ValueError(f"no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}) found under {str(source)!r}")
        return files
    if not source.is_file():
        raise FileNotFoundError(f"--data {str(source)!r} is neither a folder nor a file")
    if source.suffix.lower() == ".csv":
        return read_label_csv(source, require_labels=False)[0]
    if source.suffix.lower() in LIST_SUFFIXES:
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
        files = [_resolve(ln, source.parent) for ln in lines if ln and not ln.startswith("#")]
        if not files:
            raise ValueError(f"the file list {str(source)!r} is empty")
        return files
    raise ValueError(f"--data {str(source)!r}: expected a folder of audio, a .txt/.lst file list or a .csv with a 'file' column")


def read_label_csv(path: str | os.PathLike, sep: str = ";", require_labels: bool = True) -> tuple[list[Path], list[list[str]]]:
    """Read a CSV with columns ``file`` and ``labels`` (labels joined by ``sep``): (files, label lists)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "file" not in fields or (require_labels and "labels" not in fields):
            need = "'file' and 'labels'" if require_labels else "'file'"
            raise ValueError(f"{str(path)!r} must have a header with columns {need}; found {fields}")
        files, labels = [], []
        for i, row in enumerate(reader, start=2):
            if not row.get("file"):
                raise ValueError(f"{str(path)!r} line {i}: empty 'file'")
            files.append(_resolve(row["file"], path.parent))
            names = [s.strip() for s in (row.get("labels") or "").split(sep) if s.strip()]
            if require_labels and not names:
                raise ValueError(f"{str(path)!r} line {i}: no labels for {row['file']!r}")
            labels.append(names)
    if not files:
        raise ValueError(f"{str(path)!r} lists no files")
    return files, labels


def multi_hot(labels: Sequence[Sequence[str]], classes: Sequence[str]) -> torch.Tensor:
    """Label lists -> (N, C) float multi-hot targets over ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    out = torch.zeros(len(labels), len(classes))
    for n, names in enumerate(labels):
        for name in names:
            if name not in index:
                raise ValueError(f"label {name!r} is not one of the {len(classes)} classes ({', '.join(classes[:10])}, ...)")
            out[n, index[name]] = 1.0
    return out


@dataclass(frozen=True)
class Crop:
    """One random crop of ``seconds``; shorter clips are zero-padded to it when ``pad``, else kept whole."""

    seconds: float
    pad: bool = False

    @property
    def samples(self) -> int:
        return round(self.seconds * SAMPLE_RATE)


def random_crop(wav: np.ndarray, crop: Crop, rng: np.random.Generator) -> np.ndarray:
    """A (n,) crop of a (N,) waveform at a uniform random offset; n = crop.samples, or N if shorter and not padded."""
    n = crop.samples
    if wav.shape[0] > n:
        start = int(rng.integers(0, wav.shape[0] - n + 1))
        return wav[start : start + n]
    if crop.pad and wav.shape[0] < n:
        return np.pad(wav, (0, n - wav.shape[0]))
    return wav


#: Files tried in a row after one fails to decode before the data is declared gone.
MAX_SUBSTITUTES = 100


class DataUnavailable(RuntimeError):
    """``MAX_SUBSTITUTES`` training files in a row could not be read: the data has gone away."""


class CropDataset(Dataset):
    """Decoded, cropped clips. Indexed by ``(index, epoch)`` (what ``ResumableSampler`` yields).

    Each item is ``{"crops": [tensor (n_v,) per crop], "target": (C,) if targets, "skipped":
    [(path, reason), ...]}``: one crop per entry of ``crops``, drawn independently (ATST-Clip's two
    views) or just one (ATST-Frame, fine-tuning). Waveforms shorter than the front end's minimum
    are zero-padded to it. A file that cannot be decoded is replaced by the next one in the list
    (deterministically, so a resumed run sees the same), and named in ``skipped``.
    """

    def __init__(self, files: Sequence[Path], crops: Sequence[Crop], seed: int, targets: torch.Tensor | None = None):
        if targets is not None and len(targets) != len(files):
            raise ValueError(f"{len(files)} files but {len(targets)} targets")
        self.files = list(files)
        self.crops = list(crops)
        self.seed = seed
        self.targets = targets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        skipped: list[tuple[str, str]] = []
        for attempt in range(min(MAX_SUBSTITUTES, len(self.files))):
            i = (index + attempt) % len(self.files)
            try:
                wav = load_audio(self.files[i])
            except (OSError, ValueError) as e:
                skipped.append((str(self.files[i]), str(e)))
                continue
            return self._item(i, epoch, wav, skipped)
        raise DataUnavailable(
            f"{len(skipped)} training files in a row cannot be read (first {skipped[0][0]!r}: {skipped[0][1]}); "
            "has the data gone away?"
        )

    def _item(self, index: int, epoch: int, wav: np.ndarray, skipped: list[tuple[str, str]]) -> dict:
        rng = np.random.default_rng([self.seed, epoch, index])
        crops = []
        for crop in self.crops:
            c = random_crop(wav, crop, rng)
            if c.shape[0] < MIN_SAMPLES:
                c = np.pad(c, (0, MIN_SAMPLES - c.shape[0]))
            crops.append(torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)))
        item = {"crops": crops, "skipped": skipped}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def collate(items: list[dict]) -> dict:
    """Batch items: ``views`` = [(wav (B, N) zero-padded, lengths (B,)) per crop], ``target`` (B, C),
    ``skipped`` = [(path, reason)] of the files replaced because they could not be read."""
    views = []
    for v in range(len(items[0]["crops"])):
        wavs = [it["crops"][v] for it in items]
        lengths = torch.tensor([w.shape[0] for w in wavs], dtype=torch.long)
        views.append((torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths))
    batch = {"views": views, "skipped": [s for it in items for s in it.get("skipped", ())]}
    if "target" in items[0]:
        batch["target"] = torch.stack([it["target"] for it in items])
    return batch


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled per epoch, equal share per process, tail dropped) that can
    start mid-epoch and yields ``(index, epoch)`` so items can seed their own crops."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Start at ``epoch`` after its first ``batches_done`` batches."""
        self.set_epoch(epoch)
        self.skip = batches_done * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in islice(super().__iter__(), self.skip, None):
            yield index, self.epoch

    def batch_keys(self, epoch: int, batch: int) -> list[tuple[int, int]]:
        """The ``(index, epoch)`` keys of this process's batch number ``batch`` of ``epoch``
        (what iterating from ``set_position(epoch, batch)`` yields first); the position is kept."""
        kept = self.epoch, self.skip
        self.set_epoch(epoch)
        self.skip = 0
        try:
            indices = list(islice(super().__iter__(), batch * self.batch_size, (batch + 1) * self.batch_size))
        finally:
            self.epoch, self.skip = kept
        return [(i, epoch) for i in indices]

    def __len__(self) -> int:
        return self.num_samples - self.skip
