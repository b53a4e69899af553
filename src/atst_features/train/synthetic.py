"""A generated labelled corpus: a smoke test of a training setup, and the data of the tests and benchmark.

Every clip is a sound with one of two timbres (a harmonic tone, or a band of noise-like partials
around its centre) in one of four temporal patterns (steady, pulsed at 3-7 Hz, gliding up by half to
one octave, tremolo at 3-7 Hz), in white or brown noise at a random signal-to-noise ratio; number
and strength of harmonics, pattern rate, noise and level are drawn per clip. What the class is:

- ``cue="pattern"`` (default): timbre x pattern (class ``c``: timbre ``c % 2``, pattern ``c // 2``),
  at a random pitch over 2.5 octaves. The class lies in how the sound moves and what it is made of,
  not in its pitch or level, which ATST's augmentations teach the encoder to ignore: the corpus on
  which pretraining should help a probe.
- ``cue="pitch"``: a harmonic tone in a pitch band (150-260 Hz x 1.5^c), in a random pattern: a
  spectral cue that a classifier learns from scratch in a few dozen steps.

    from atst_features.train.synthetic import make_corpus
    corpus = make_corpus("synthetic", n_classes=8, per_class=50)   # 400 clips, 80 held out
    # python -m atst_features.train finetune --data synthetic/train.csv --out runs/ft ...
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..frontend import SAMPLE_RATE

PATTERNS = 4  # steady, pulsed, gliding, tremolo
TIMBRES = 2  # harmonic, noise band
MAX_CLASSES = PATTERNS * TIMBRES
CUES = ("pattern", "pitch")


def _source(timbre: int, phase: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The sound before its envelope: harmonics of ``phase`` (radians of the fundamental, (N,)), or
    16 partials spread over +-20 % around it (a noise band)."""
    if timbre == 0:
        n_harmonics = int(rng.integers(2, 6))
        return sum(rng.uniform(0.2, 1.0) / h * np.sin(h * phase + rng.uniform(0, 2 * np.pi)) for h in range(1, n_harmonics + 1))
    ratios = rng.uniform(0.8, 1.2, size=16)
    return sum(np.sin(r * phase + rng.uniform(0, 2 * np.pi)) for r in ratios)


def labelled_clip(
    label: int, rng: np.random.Generator, seconds: float, snr_db: tuple[float, float] = (-6.0, 6.0), cue: str = "pattern"
) -> np.ndarray:
    """One clip of class ``label``: (seconds * 16000,) float32 in [-0.9, 0.9] (see the module docstring)."""
    if cue not in CUES or not 0 <= label < MAX_CLASSES:
        raise ValueError(f"cue must be one of {CUES} and label in 0..{MAX_CLASSES - 1}, got {cue!r}, {label}")
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if cue == "pattern":
        timbre, pattern = label % TIMBRES, label // TIMBRES
        f0 = 150.0 * 2.0 ** rng.uniform(0.0, 2.5)
    else:
        timbre, pattern = 0, int(rng.integers(PATTERNS))
        f0 = rng.uniform(150.0, 260.0) * 1.5**label
    glide = 2.0 ** (rng.uniform(0.5, 1.0) * t / seconds) if pattern == 2 else np.ones(n)
    x = _source(timbre, 2 * np.pi * np.cumsum(f0 * glide) / SAMPLE_RATE, rng)
    rate = rng.uniform(3.0, 7.0)
    if pattern == 1:  # on/off pulses, smoothed over 10 ms
        gate = (np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) > 0.3).astype(np.float64)
        x = x * np.convolve(gate, np.hanning(161) / np.hanning(161).sum(), mode="same")
    elif pattern == 3:  # deep tremolo
        x = x * (0.55 + 0.45 * np.sin(2 * np.pi * rate * t))
    x = x / (np.abs(x).max() + 1e-9)
    noise = rng.standard_normal(n)
    if rng.random() < 0.5:  # brown noise, without its drift
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
    noise /= noise.std() + 1e-9
    y = x * 10 ** (rng.uniform(*snr_db) / 20) + 0.3 * noise
    return (y / np.abs(y).max() * rng.uniform(0.3, 0.9)).astype(np.float32)


@dataclass(frozen=True)
class Corpus:
    """Where a generated corpus lies: CSVs (``file,labels``) of the training and held-out clips, and all of them."""

    folder: Path
    train_csv: Path
    test_csv: Path
    all_csv: Path
    n_classes: int


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "labels"])
        w.writerows(rows)
    return path


def make_corpus(
    folder: str | os.PathLike,
    n_classes: int = 8,
    per_class: int = 50,
    held_out: int = 10,
    seconds: float = 2.0,
    seed: int = 0,
    snr_db: tuple[float, float] = (-6.0, 6.0),
    cue: str = "pattern",
) -> Corpus:
    """Write ``n_classes x per_class`` 16 kHz wav clips of ``seconds`` and their CSVs to ``folder``.

    The first ``held_out`` clips of each class go to ``test.csv``, the rest to ``train.csv``;
    ``all.csv`` lists every clip. Files that exist are kept (the same seed writes the same audio).
    """
    if not 1 <= n_classes <= MAX_CLASSES or not 0 <= held_out < per_class:
        raise ValueError(f"n_classes must be in 1..{MAX_CLASSES} and held_out in 0..per_class-1")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(n_classes):
        for i in range(per_class):
            name = f"class{c:02d}_{i:04d}.wav"
            wav = labelled_clip(c, rng, seconds, snr_db, cue)  # drawn even when the file exists: same stream
            if not (root / name).is_file():
                sf.write(root / name, wav, SAMPLE_RATE, subtype="FLOAT")
            (test if i < held_out else train).append((name, f"class{c:02d}"))
    return Corpus(
        folder=root,
        train_csv=_write_csv(root / "train.csv", train),
        test_csv=_write_csv(root / "test.csv", test),
        all_csv=_write_csv(root / "all.csv", train + test),
        n_classes=n_classes,
    )
