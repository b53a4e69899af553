"""A linear probe on ATST clip embeddings: how well do frozen embeddings separate sound classes?

1. generate clips of background noise, each holding one sound of four kinds (harmonic tone,
   frequency sweep, band of noise, click train) with random pitch, length, position and level;
2. embed every clip with ``embed_clip`` (the official clip vector, every block);
3. fit a logistic regression on standardised embeddings (scikit-learn when installed, otherwise
   the same model in torch) and report test accuracy.

    python examples/linear_probe.py                         # a random tiny encoder (no download)
    python examples/linear_probe.py --model atst-frame-base   # a real model: name, directory or checkpoint
    python examples/linear_probe.py --tiny                  # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import atst_features as af
from atst_features import frontend

SR = frontend.SAMPLE_RATE
CLASSES = ["harmonic", "sweep", "noise_band", "clicks"]


def make_sound(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """One sound of ``n`` samples, peak-normalised, with 10 ms fades."""
    t = np.arange(n) / SR
    if kind == "harmonic":
        f = rng.uniform(150, 1000)
        x = sum(np.sin(2 * np.pi * k * f * t) / k for k in range(1, 6))
    elif kind == "sweep":
        f0, f1 = rng.uniform(200, 1000), rng.uniform(2000, 6000)
        if rng.random() < 0.5:
            f0, f1 = f1, f0
        x = np.sin(2 * np.pi * np.cumsum(np.linspace(f0, f1, n)) / SR)
    elif kind == "noise_band":
        lo = rng.uniform(300, 4000)
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SR)
        spectrum[(freqs < lo) | (freqs > lo + rng.uniform(500, 3000))] = 0
        x = np.fft.irfft(spectrum, n)
    else:  # clicks: short decaying bursts at a random rate
        x = np.zeros(n)
        period = int(SR / rng.uniform(4, 30))
        click = rng.standard_normal(80) * np.exp(-np.arange(80) / 15)
        for start in range(int(rng.integers(0, period)), n - 80, period):
            x[start : start + 80] += click
    fade = min(int(0.01 * SR), n // 2)
    env = np.ones(n)
    env[:fade], env[n - fade :] = np.linspace(0, 1, fade), np.linspace(1, 0, fade)
    return x / (np.abs(x).max() + 1e-9) * env


def make_clip(label: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Background noise with one sound of class ``label`` somewhere in it, at a random level."""
    n = int(seconds * SR)
    audio = rng.uniform(0.003, 0.03) * rng.standard_normal(n)
    length = int(rng.uniform(0.3, 0.8) * n)
    start = int(rng.integers(0, n - length))
    audio[start : start + length] += rng.uniform(0.05, 0.5) * make_sound(CLASSES[label], length, rng)
    return audio.astype(np.float32)


def random_tiny_model(seed: int) -> af.ATSTModel:
    """An untrained small ATST-Frame encoder: random features of the log-mel, no download."""
    torch.manual_seed(seed)
    cfg = af.ATSTConfig(family="frame", embed_dim=64, depth=2, num_heads=4)
    return af.ATSTModel(af.ATSTEncoder(cfg), name="random-tiny")


def fit_and_score(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[float, str]:
    """Standardise, fit a multinomial logistic regression, return (test accuracy, what was used)."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return _torch_probe(x_train, y_train, x_test, y_test), "torch logistic regression"
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, y_train)
    return float((clf.predict(x_test) == y_test).mean()), "scikit-learn LogisticRegression"


def _torch_probe(x_train, y_train, x_test, y_test, weight_decay: float = 1e-3) -> float:
    """The same model without scikit-learn: a linear layer, cross-entropy + L2, fitted with L-BFGS."""
    xt, yt = torch.from_numpy(x_train).float(), torch.from_numpy(y_train).long()
    linear = torch.nn.Linear(xt.shape[1], len(CLASSES))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        predicted = linear(torch.from_numpy(x_test).float()).argmax(dim=1).numpy()
    return float((predicted == y_test).mean())


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ATST model: a name, converted directory or checkpoint file")
    ap.add_argument(
        "--random-tiny", action="store_true", help="use a random tiny encoder (the default without --model)"
    )
    ap.add_argument("--tiny", action="store_true", help="a reduced run (seconds), for CI")
    ap.add_argument("--layers", default="all", help='blocks to use: "all", "last" or a 0-based index')
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n_train, n_test, seconds = (48, 32, 1.5) if args.tiny else (400, 200, 3.0)
    layers = int(args.layers) if args.layers.lstrip("-").isdigit() else args.layers
    start = time.perf_counter()
    model = random_tiny_model(args.seed) if args.random_tiny or args.model is None else af.load(args.model)
    print(
        f"model: {model.name} ({model.config.family}, embed_dim {model.config.embed_dim}, depth {model.config.depth})"
    )

    rng = np.random.default_rng(args.seed)
    labels = np.arange(n_train + n_test) % len(CLASSES)
    rng.shuffle(labels)
    clips = [make_clip(int(label), seconds, rng) for label in labels]
    x = model.embed_clip(clips, SR, layers=layers, batch_size=16)
    x = torch.stack(x).numpy()  # (clips, clip_dim)
    print(
        f"data: {len(clips)} clips of {seconds:g} s, {len(CLASSES)} classes, embeddings {x.shape} "
        f"({time.perf_counter() - start:.1f} s)"
    )

    accuracy, probe = fit_and_score(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:])
    print(f"probe: {probe} on {n_train} training clips")
    print(f"accuracy: {accuracy:.3f} on {n_test} test clips (chance {1 / len(CLASSES):.2f})")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return accuracy


if __name__ == "__main__":
    main()
