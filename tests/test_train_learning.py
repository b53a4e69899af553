"""Training learns, with its defaults, on small generated corpora (``atst_features.train.synthetic``).

- ``finetune`` with the default recipe (``--recipe audioset``: SGD at 0.5 per 256 samples, the
  recipe's warm-up fraction, layer-wise decay, mixup, binary cross-entropy) reaches a held-out
  accuracy that an untrained head cannot reach by chance. The test sets only the tiny encoder, the
  batch size and the step budget (60 steps of 16 clips).
- ATST-Frame pretraining lifts a linear probe of the frame features above the same encoder at
  random init (slow).

Why the accuracy bound cannot be met by chance: the held-out set has ``HELD_OUT`` = 20 clips of each
of ``N_CLASSES`` = 4 classes, n = 80. A head that has not learned from the labels gives predictions
that do not depend on them, so each of the n predictions is right with probability 1 / 4 and the
number right is Binomial(n, 1 / 4). The test asks for at least k right, the smallest k whose tail
P(X >= k) is below ``ALPHA`` = 1e-6: k = 41 of 80 (51 %, chance 25 %). The run reaches about 69 %.
"""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest
import torch

import atst_features as af
from atst_features import weights
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.train.__main__ import main
from atst_features.train.evaluate import accuracy, frame_statistics, probe_accuracy, read_labelled
from atst_features.train.synthetic import labelled_clip, make_corpus

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("scan_cache")]

N_CLASSES = 4
HELD_OUT = 20  # per class
ALPHA = 1e-6
TINY = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
RUNTIME = ["--device", "cpu", "--precision", "fp32", "--num-workers", "0", "--save-every", "0", "--no-progress"]


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def needed_correct(n: int, p: float, alpha: float = ALPHA) -> int:
    """The fewest right answers out of n that chance (probability p each) reaches with probability < alpha."""
    return next(k for k in range(n + 1) if binomial_tail(n, p, k) < alpha)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 pitch-band classes x 30 clips of 1 s: 40 to train on, 80 held out."""
    folder = tmp_path_factory.mktemp("corpus")
    return make_corpus(folder, n_classes=N_CLASSES, per_class=HELD_OUT + 10, held_out=HELD_OUT, seconds=1.0, snr_db=(0.0, 10.0), cue="pitch")


def test_the_bound():
    assert needed_correct(80, 0.25) == 41
    assert binomial_tail(80, 0.25, 41) < ALPHA <= binomial_tail(80, 0.25, 40)


def test_probe_and_corpus(corpus):
    """The probe finds a linear signal and none in noise; the corpus is what it says."""
    labels = [f"c{i % 4}" for i in range(80)]
    noise = torch.randn(80, 16, generator=torch.Generator().manual_seed(0))
    signal = noise.clone()
    signal[torch.arange(80), torch.arange(80) % 4] += 5.0  # class c: coordinate c raised
    assert probe_accuracy(signal, labels) > 0.95 and probe_accuracy(noise, labels) < 0.5
    train, train_labels = read_labelled(corpus.train_csv)
    test, test_labels = read_labelled(corpus.test_csv)
    assert len(train) == 40 and len(test) == 80 and not set(train) & set(test)
    assert sorted(set(test_labels)) == sorted(set(train_labels)) == [f"class{c:02d}" for c in range(N_CLASSES)]
    for cue in ("pattern", "pitch"):
        a, b = (labelled_clip(5, np.random.default_rng(1), 0.5, cue=cue) for _ in range(2))
        assert a.shape == (8000,) and np.array_equal(a, b) and 0.2 < np.abs(a).max() <= 0.9


def test_finetune_defaults_learn(corpus, tmp_path):
    out = tmp_path / "run"
    budget = ["--batch-size", "16", "--max-steps", "60"]
    assert main(["finetune", "--data", str(corpus.train_csv), "--out", str(out), *TINY, *RUNTIME, *budget]) == 0
    saved = json.loads((out / "export" / "training.json").read_text())
    assert saved["multilabel"] is False
    files, labels = read_labelled(corpus.test_csv)
    n = len(files)
    assert n == N_CLASSES * HELD_OUT
    acc = accuracy(af.load(out / "export"), files, labels)
    assert acc * n >= needed_correct(n, 1 / N_CLASSES), f"held-out accuracy {acc:.3f}, chance {1 / N_CLASSES}"


@pytest.mark.slow
def test_pretraining_beats_random_init_on_frame_features(tmp_path):
    """8 timbre x pattern classes at random pitch, 30 clips each: pretraining for 100 steps raises a
    5-fold ridge probe of the mean + std of the last block's frame features by about 9 points."""
    corpus = make_corpus(tmp_path / "corpus", n_classes=8, per_class=30, held_out=1, seconds=1.0)
    files, labels = read_labelled(corpus.all_csv)
    torch.manual_seed(0)  # what the trainer's encoder starts from (seed 0, built first)
    enc_cfg = ATSTConfig(family="frame", embed_dim=32, depth=2, num_heads=2)
    random_init = weights.build(enc_cfg, ATSTEncoder(enc_cfg).state_dict())
    before = probe_accuracy(frame_statistics(random_init, files), labels)
    out = tmp_path / "frame"
    pretrain = ["--crop-seconds", "1", "--batch-size", "16", "--lr", "2e-2", "--ema", "0.95", "--max-steps", "100"]
    heads = ["--head-hidden", "256", "--head-out", "64", "--mixup-memory", "128", "--seed", "0"]
    assert main(["frame", "--data", str(corpus.all_csv), "--out", str(out), *TINY, *RUNTIME, *pretrain, *heads]) == 0
    after = probe_accuracy(frame_statistics(af.load(out / "export"), files), labels)
    assert after >= before + 0.05, (before, after)
