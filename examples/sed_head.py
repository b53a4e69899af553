"""Sound event detection with a small head on ATST-Frame frame embeddings.

From strongly labelled audio to a working detector, end to end on CPU:

1. generate clips of background noise with tones, chirps and noise bursts at known times;
2. embed every clip with ``embed_frames`` (one vector per 40 ms token);
3. turn the labels into frame targets (``sed.events_to_frame_targets``) and train a BiGRU
   (or linear) head on the frozen embeddings;
4. decode the test clips' frame scores into events (``sed.frame_probs_to_events``) and score
   them with the standard event-based F1 (``sed.event_based_scores``: onset collar 200 ms,
   offset collar max(200 ms, 20 % of the event's length));
5. plot one test clip's frame scores against its ground truth.

    python examples/sed_head.py                       # a random tiny encoder (no download)
    python examples/sed_head.py --model atst-frame-base  # a real model: name, directory or checkpoint
    python examples/sed_head.py --tiny                # a few seconds, for CI

Needs matplotlib for the plot (the examples extra): pip install 'atst-features[examples]'.
With a random encoder the embeddings are random features of the log-mel, which a head can
still learn from; a pretrained ATST-Frame does much better on real sounds.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import atst_features as af
from atst_features import frontend
from atst_features.sed import FRAME_S, event_based_scores, events_to_frame_targets, frame_probs_to_events

SR = frontend.SAMPLE_RATE
CLASSES = ["tone", "chirp", "burst"]
FADE_S = 0.01  # seconds of linear fade at each end of an event


# ---------------------------------------------------------------------------- data


@dataclass
class Clip:
    audio: np.ndarray  # (N,) float32 at 16 kHz
    events: list[tuple[str, float, float]]  # (class, onset_s, offset_s)


def envelope(n: int) -> np.ndarray:
    fade = min(int(FADE_S * SR), n // 2)
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade)
    env[n - fade :] = np.linspace(1, 0, fade)
    return env


def make_sound(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """One event of ``n`` samples: a steady tone, an exponential chirp, or a band of noise."""
    t = np.arange(n) / SR
    if kind == "tone":
        f = rng.uniform(400, 2000)
        x = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(2 * np.pi * 2 * f * t)
    elif kind == "chirp":
        f0, f1 = rng.uniform(300, 800), rng.uniform(2500, 6000)
        phase = 2 * np.pi * f0 * t[-1] / np.log(f1 / f0) * ((f1 / f0) ** (t / t[-1]) - 1)
        x = np.sin(phase)
    else:  # a band of noise, 1-4 kHz wide, somewhere in 0.5-7 kHz
        lo = rng.uniform(500, 3000)
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SR)
        spectrum[(freqs < lo) | (freqs > lo + rng.uniform(1000, 4000))] = 0
        x = np.fft.irfft(spectrum, n)
    x = x / (np.abs(x).max() + 1e-9)
    return x * envelope(n) * rng.uniform(0.1, 0.4)


def make_clip(seconds: float, rng: np.random.Generator, max_event_s: float) -> Clip:
    """Background noise plus 0-2 events per class at random times (one class's events never overlap)."""
    n = int(seconds * SR)
    audio = 0.01 * rng.standard_normal(n)
    audio = audio + 0.02 * np.convolve(rng.standard_normal(n), np.ones(20) / 20, mode="same")  # some low rumble
    events = []
    for kind in CLASSES:
        taken: list[tuple[float, float]] = []
        for _ in range(rng.integers(0, 3)):
            length = rng.uniform(0.25, max_event_s)
            onset = rng.uniform(0, seconds - length)
            if any(onset < b + 0.3 and a < onset + length + 0.3 for a, b in taken):
                continue  # keep 300 ms between events of one class
            taken.append((onset, onset + length))
            start, count = int(onset * SR), int(length * SR)
            audio[start : start + count] += make_sound(kind, count, rng)
            events.append((kind, round(start / SR, 4), round((start + count) / SR, 4)))
    return Clip(audio.astype(np.float32), sorted(events, key=lambda e: e[1]))


# ---------------------------------------------------------------------------- model and head


def random_tiny_model(seed: int) -> af.ATSTModel:
    """An untrained small ATST-Frame encoder: random features of the log-mel, no download."""
    torch.manual_seed(seed)
    cfg = af.ATSTConfig(family="frame", embed_dim=64, depth=2, num_heads=4)
    return af.ATSTModel(af.ATSTEncoder(cfg), name="random-tiny")


class Head(nn.Module):
    """Frame embeddings (B, T, D) -> frame logits (B, T, C): a BiGRU then a linear layer, or a linear layer."""

    def __init__(self, dim: int, n_classes: int, kind: str = "bigru", hidden: int = 32):
        super().__init__()
        self.rnn = nn.GRU(dim, hidden, batch_first=True, bidirectional=True) if kind == "bigru" else None
        self.out = nn.Linear(2 * hidden if self.rnn is not None else dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rnn is not None:
            x, _ = self.rnn(x)
        return self.out(x)


def train_head(x: torch.Tensor, y: torch.Tensor, kind: str, epochs: int, seed: int, batch_size: int = 8) -> Head:
    """Adam on frame-wise binary cross-entropy in shuffled mini-batches; x (B, T, D) standardised, y (B, T, C) 0/1."""
    torch.manual_seed(seed)
    head = Head(x.shape[-1], y.shape[-1], kind)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(x)).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(head(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if (epoch + 1) % max(1, epochs // 5) == 0:
            print(f"  epoch {epoch + 1:4d}  loss {total / len(x):.4f}")
    return head.eval()


# ---------------------------------------------------------------------------- evaluation and plot


def plot(path: str, clip: Clip, probs: np.ndarray, timestamps: np.ndarray, decoded: list, threshold: float) -> None:
    """Log-mel on top, then per class: ground truth (shaded), frame scores (line) and decoded events (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel, _ = frontend.log_mel(torch.from_numpy(clip.audio)[None])
    seconds = len(clip.audio) / SR
    fig, axes = plt.subplots(1 + len(CLASSES), 1, figsize=(10, 2 + 1.6 * len(CLASSES)), sharex=True)
    axes[0].imshow(mel[0].numpy(), origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma")
    axes[0].set_ylabel("mel bin")
    axes[0].set_title("test clip: log-mel, ground truth (shaded), frame scores (line), decoded events (bars)")
    for c, (name, ax) in enumerate(zip(CLASSES, axes[1:])):
        for kind, onset, offset in clip.events:
            if kind == name:
                ax.axvspan(onset, offset, color="tab:green", alpha=0.25, lw=0)
        ax.step(timestamps, probs[:, c], where="post", color="tab:blue", lw=1.2)
        ax.axhline(threshold, color="grey", ls="--", lw=0.8)
        for kind, onset, offset in decoded:
            if kind == name:
                ax.plot([onset, offset], [1.08, 1.08], color="tab:red", lw=4, solid_capstyle="butt")
        ax.set_ylim(-0.05, 1.15)
        ax.set_ylabel(name)
    axes[-1].set_xlabel("time (s)")
    axes[-1].set_xlim(0, seconds)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="ATST-Frame model: a name, converted directory or checkpoint file")
    ap.add_argument(
        "--random-tiny", action="store_true", help="use a random tiny encoder (the default without --model)"
    )
    ap.add_argument("--tiny", action="store_true", help="a reduced run (seconds), for CI")
    ap.add_argument("--head", choices=["bigru", "linear"], default="bigru")
    ap.add_argument("--layers", default="last", help='blocks to use: "last", "all" or a 0-based index')
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--median-filter", type=int, default=5, help="median filter window in 40 ms frames")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--plot", default="sed_head.png", help="where to save the PNG ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n_train, n_test, seconds, max_event_s = (24, 8, 4.0, 1.2) if args.tiny else (160, 40, 10.0, 2.5)
    epochs = args.epochs or (40 if args.tiny else 25)
    layers = int(args.layers) if args.layers.lstrip("-").isdigit() else args.layers
    start = time.perf_counter()

    model = random_tiny_model(args.seed) if args.random_tiny or args.model is None else af.load(args.model)
    if model.config.family != "frame":
        print(
            f"note: {model.name} is an ATST-{model.config.family.capitalize()} model; ATST-Frame is made for frame tasks"
        )
    print(f"model: {model.name} (embed_dim {model.config.embed_dim}, depth {model.config.depth}), layers={layers}")

    rng = np.random.default_rng(args.seed)
    clips = [make_clip(seconds, rng, max_event_s) for _ in range(n_train + n_test)]
    frames = model.embed_frames([c.audio for c in clips], SR, layers=layers, batch_size=8)
    timestamps = frames[0].timestamps  # equal-length clips share one grid
    x = torch.stack([f.embeddings for f in frames])  # (B, T, D)
    y = torch.stack([events_to_frame_targets(c.events, timestamps, CLASSES) for c in clips])  # (B, T, C)
    print(
        f"data: {len(clips)} clips of {seconds:g} s, {sum(len(c.events) for c in clips)} events, "
        f"frames {tuple(x.shape)} ({time.perf_counter() - start:.1f} s)"
    )

    mean, std = x[:n_train].mean(dim=(0, 1)), x[:n_train].std(dim=(0, 1)) + 1e-5
    x = (x - mean) / std
    head = train_head(x[:n_train], y[:n_train], args.head, epochs, args.seed)
    print(f"head trained ({time.perf_counter() - start:.1f} s)")

    with torch.no_grad():
        probs = torch.sigmoid(head(x[n_train:])).numpy()  # (n_test, T, C)
    test = clips[n_train:]
    decoded = [
        frame_probs_to_events(p, timestamps, CLASSES, threshold=args.threshold, median_filter=args.median_filter)
        for p in probs
    ]
    scores = event_based_scores([c.events for c in test], decoded, CLASSES)  # collars 200 ms / 20 %
    frame_acc = ((probs >= args.threshold) == y[n_train:].numpy().astype(bool)).mean()
    print(f"frame accuracy: {frame_acc:.3f} (test, {FRAME_S * 1000:.0f} ms frames)")
    print("per-class event F1: " + ", ".join(f"{c} {v:.3f}" for c, v in scores.per_class_f1.items()))
    print(
        f"event-based F1: {scores.f1:.3f} (micro; precision {scores.precision:.3f}, recall {scores.recall:.3f}, "
        f"{scores.n_ref} reference events in {len(test)} test clips)"
    )
    if args.plot:
        i = max(range(len(test)), key=lambda k: (len({e[0] for e in test[k].events}), len(test[k].events)))
        plot(args.plot, test[i], probs[i], timestamps.numpy(), decoded[i], args.threshold)  # the busiest test clip
        print(f"plot: {args.plot}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return scores.f1


if __name__ == "__main__":
    main()
