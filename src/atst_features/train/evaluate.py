"""Measuring what a run learned: held-out accuracy of a classifier, and a linear probe of frozen features.

- ``accuracy``: top-1 accuracy of a model with a classification head (``model.tag``) on labelled files.
- ``frame_statistics``: per clip, the mean and the standard deviation over time of the last block's
  frame embeddings ((N, 2 D)), the usual "mean + std" summary for a probe.
- ``probe_accuracy``: k-fold cross-validated accuracy of a ridge-regression classifier (one-hot
  targets, standardised features) on such summaries: how linearly separable the classes are.

Pure torch (no scikit-learn), deterministic for a given seed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def read_labelled(csv_path: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(files, one label per file) of a ``file,labels`` CSV (relative paths are relative to it)."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [csv_path.parent / r["file"] for r in rows], [r["labels"] for r in rows]


def accuracy(model, files: Sequence[str | os.PathLike], labels: Sequence[str], batch_size: int = 16) -> float:
    """Fraction of ``files`` whose best-scoring class (``model.tag``) is their label."""
    tags = model.tag([str(f) for f in files], batch_size=batch_size)
    hits = [t.labels[int(t.scores.argmax())] == label for t, label in zip(tags, labels)]
    return float(np.mean(hits))


def frame_statistics(model, files: Sequence[str | os.PathLike], batch_size: int = 32) -> torch.Tensor:
    """(N, 2 D) float32: [mean over time | std over time] of each file's last-block frame embeddings."""
    frames = model.embed_frames([str(f) for f in files], layers="last", batch_size=batch_size)
    return torch.stack([torch.cat([f.embeddings.mean(0), f.embeddings.std(0)]) for f in frames])


def _folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number of each item, stratified: every class is dealt round-robin over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return fold


def probe_accuracy(features: torch.Tensor, labels: Sequence[str], folds: int = 5, ridge: float = 1.0, seed: int = 0) -> float:
    """Cross-validated accuracy of a ridge-regression classifier on ``features`` (N, F).

    Per fold: standardise with the training part's mean and std, solve
    ``W = (X^T X + ridge * N_train * I)^-1 X^T Y`` for one-hot Y (with a bias column), predict the
    arg-max. Returns the accuracy over all N held-out predictions.
    """
    x_all = features.double()
    names, y_all = np.unique(np.asarray(labels), return_inverse=True)
    fold = _folds(y_all, folds, seed)
    correct = 0
    for k in range(folds):
        test = torch.from_numpy(fold == k)
        train = ~test
        mean, std = x_all[train].mean(0), x_all[train].std(0).clamp_min(1e-8)
        x = torch.cat([(x_all - mean) / std, torch.ones(len(x_all), 1, dtype=torch.float64)], dim=1)
        y = torch.nn.functional.one_hot(torch.from_numpy(y_all), len(names)).double()
        xt = x[train]
        gram = xt.T @ xt + ridge * len(xt) * torch.eye(x.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, xt.T @ y[train])
        correct += int(((x[test] @ w).argmax(1).numpy() == y_all[test.numpy()]).sum())
    return correct / len(x_all)
