"""Embed a clip and its frames with an ATST model.

    python examples/quickstart.py                      # the default model, atst-frame-base
    python examples/quickstart.py --model DIR_OR_FILE  # a converted directory or an official checkpoint
    python examples/quickstart.py --audio dog.flac     # your own file instead of a generated chirp
"""

from __future__ import annotations

import argparse

import numpy as np

import atst_features as af


def chirp(seconds: float = 3.0, sr: int = 22050) -> np.ndarray:
    """A 200 Hz -> 4 kHz linear chirp at ``sr`` Hz (resampled to 16 kHz by the library)."""
    t = np.arange(int(seconds * sr)) / sr
    f = 200 + (4000 - 200) * t / seconds
    return (0.3 * np.sin(2 * np.pi * np.cumsum(f) / sr)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="atst-frame-base")
    ap.add_argument("--audio", default=None, help="an audio file; default: a generated 3 s chirp")
    args = ap.parse_args()

    model = af.load(args.model)
    audio, sr = (args.audio, None) if args.audio else (chirp(), 22050)
    clip = model.embed_clip(audio, sample_rate=sr)
    frames = model.embed_frames(audio, sample_rate=sr, layers="last")
    print(model)
    print(f"clip vector: {tuple(clip.shape)}")
    print(f"frames: {tuple(frames.embeddings.shape)}, first timestamps (s): {frames.timestamps[:4].tolist()}")


if __name__ == "__main__":
    main()
