"""Folder embedding throughput: end to end (``embed_folder``) against the encoder alone.

On a generated folder of noise clips (random weights of a chosen geometry, or a real model),
measures in one run:
  decode       ``audio.load_audio`` of every file, one process: what the workers have to do;
  encoder      ``batch.Embedder.embed`` on pre-decoded 16 kHz waveforms: front end + encoder +
               pooling, no files (the ceiling for a folder run);
  end to end   ``batch.embed_folder``: discovery, decoding in DataLoader workers, front end,
               encoder, .npz and index writing.
The ratio end to end / encoder shows what decoding and writing cost on top of the model.

Run:  python benchmarks/bench_folder.py [--files 32] [--seconds 10] [--sample-rate 16000]
          [--format wav] [--device cpu] [--dtype float32] [--workers 1] [--batch-size 16]
          [--embed-dim 384 --depth 12 --heads 6 | --model NAME|DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from atst_features import audio, batch, weights
from atst_features.dtypes import COMPUTE_DTYPES, resolve_dtype
from atst_features.model import ATSTConfig, ATSTEncoder


def make_folder(root: Path, n_files: int, seconds: float, sample_rate: int, fmt: str) -> list[Path]:
    """Noise clips of ``seconds`` (±10 %, so batches see mixed lengths) in two sub-folders."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_files):
        n = int(sample_rate * seconds * rng.uniform(0.9, 1.1))
        path = root / f"part{i % 2}" / f"clip{i:05d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (rng.standard_normal(n) * 0.1).astype(np.float32), sample_rate)
        paths.append(path)
    return paths


def load_model(args: argparse.Namespace):
    dtype = resolve_dtype(args.dtype)
    if args.model:
        return weights.load(args.model, device=args.device, dtype=dtype)
    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    return weights.build(cfg, ATSTEncoder(cfg).state_dict(), name="random").to(device=args.device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    """The fastest of ``repeats`` runs of ``fn(run_index)``, in seconds."""
    best = float("inf")
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--format", default="wav", choices=["wav", "flac", "ogg"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(COMPUTE_DTYPES))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="chunks per encoder pass")
    p.add_argument("--model", help="a model name or directory (default: random weights of the geometry below)")
    p.add_argument("--embed-dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is reported")
    args = p.parse_args()

    model = load_model(args)
    device = model.device
    tmp = Path(tempfile.mkdtemp(prefix="bench_folder_"))
    try:
        paths = make_folder(tmp / "in", args.files, args.seconds, args.sample_rate, args.format)
        embedder = batch.Embedder(model, batch_size=args.batch_size)
        embedder.embed([np.zeros(16000, np.float32)])  # warm-up

        wavs: list[np.ndarray] = []

        def decode_all(i: int) -> None:
            wavs[:] = [audio.load_audio(path) for path in paths]

        t_decode = best_time(decode_all, args.repeats, device)
        hours = sum(w.shape[0] for w in wavs) / 16000 / 3600
        t_encoder = best_time(lambda i: embedder.embed(wavs), args.repeats, device)

        def folder_run(i: int) -> None:
            summary = batch.embed_folder(
                tmp / "in", tmp / f"out{i}", model=model, workers=args.workers, batch_size=args.batch_size, progress=False
            )
            assert summary.ok == args.files, summary

        t_folder = best_time(folder_run, args.repeats, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cfg = model.config
    print(
        f"device {device} ({torch.get_num_threads()} threads), encoder {args.dtype}, "
        f"D={cfg.embed_dim} depth={cfg.depth}, {args.files} x {args.seconds:g} s {args.format} at {args.sample_rate} Hz, "
        f"batch {args.batch_size} chunks, {args.workers} workers, best of {args.repeats}"
    )
    print(f"{'stage':<34} {'seconds':>8} {'files/s':>9} {'audio h/s':>10} {'x realtime':>11}")
    rows = [
        ("decode (1 process)", t_decode),
        ("encoder alone (pre-decoded)", t_encoder),
        (f"end to end ({args.workers} workers)", t_folder),
    ]
    for name, t in rows:
        print(f"{name:<34} {t:8.2f} {args.files / t:9.2f} {hours / t:10.4f} {hours * 3600 / t:11.1f}")
    print(f"end to end / encoder alone: {t_folder / t_encoder:.2f}x the time")


if __name__ == "__main__":
    main()
