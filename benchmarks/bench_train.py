"""Benchmark ATST-Frame pretraining: samples/s, peak memory and the loss curve.

Runs the real training path (``atst_features.train.trainer.Trainer``: DataLoader workers decoding
wav files, log-mel on the device, mixup, masking, student + EMA teacher, AdamW) on generated
audio for a number of steps, without writing checkpoints.

    # the measurement: ATST-Frame base, bf16, on one GPU
    python benchmarks/bench_train.py --steps 60 --batch-size 64
    # several GPUs
    torchrun --nproc_per_node 8 benchmarks/bench_train.py --steps 60 --batch-size 64
    # CPU smoke check with a tiny encoder
    python benchmarks/bench_train.py --tiny --steps 6

Writes to ``--out``: ``audio/`` (the generated clips, reused), ``run/train_log.csv`` (one row per
step: loss, lr, EMA momentum, teacher/student std, samples/s, peak memory) and
``summary.json`` / ``summary.md``. Throughput excludes the first ``--skip`` steps (start-up, warm-up).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from atst_features.train import distributed
from atst_features.train.config import TrainConfig, resolve
from atst_features.train.logs import LOG_NAME
from atst_features.train.trainer import Trainer

SAMPLE_RATE = 16000


def make_audio(folder: Path, n_files: int, seconds: float, seed: int = 0) -> Path:
    """Write ``n_files`` clips of ``seconds`` (chirps, tones and noise bursts) as 16 kHz wav files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    for i in range(n_files):
        path = folder / f"gen{i:05d}.wav"
        if path.is_file():
            continue
        f0, f1 = rng.uniform(100, 4000, size=2)
        chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
        tones = sum(np.sin(2 * np.pi * rng.uniform(80, 6000) * t + rng.uniform(0, 6.3)) for _ in range(3))
        bursts = (rng.random(n) < 0.0005).astype(np.float64)
        noise = np.convolve(bursts, np.hanning(800), mode="same") * rng.standard_normal(n)
        wav = 0.3 * chirp + 0.1 * tones + 0.2 * noise + 0.01 * rng.standard_normal(n)
        tmp = path.with_name(path.name + ".part")  # other processes count finished files only
        sf.write(tmp, (wav / np.abs(wav).max() * 0.8).astype(np.float32), SAMPLE_RATE, format="WAV")
        os.replace(tmp, path)
    return folder


def read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_train_out", help="output folder (audio, log, summary)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default 64; 4 with --tiny)")
    p.add_argument("--arch", choices=["small", "base"], default="base")
    p.add_argument("--tiny", action="store_true", help="32-dim, 2-block encoder for a CPU smoke check")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--files", type=int, default=None, help="generated clips (default: enough for 2 epochs per process)")
    p.add_argument("--seconds", type=float, default=10.5, help="length of each generated clip")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)

    env = distributed.env_from_torchrun()
    batch = args.batch_size or (4 if args.tiny else 64)
    n_files = args.files or max(2 * batch * env.world_size, 16)
    out = Path(args.out)
    audio = out / "audio"
    if env.is_main:
        make_audio(audio, n_files, 1.5 if args.tiny else args.seconds)
    if env.distributed:  # the others wait for the audio through a file, before any process group exists
        import time

        while len(list(audio.glob("*.wav"))) < n_files:
            time.sleep(0.5)

    extra = (
        {"embed_dim": 32, "depth": 2, "num_heads": 2, "head_hidden": 64, "head_out": 32, "crop_seconds": 1.0, "mixup_memory": 64}
        if args.tiny
        else {}
    )
    cfg = resolve(
        TrainConfig(
            command="frame",
            data=str(audio),
            out=str(out / "run"),
            arch=args.arch,
            batch_size=batch,
            max_steps=args.steps,
            device=args.device,
            precision=args.precision,
            num_workers=args.num_workers,
            gradient_checkpointing=args.gradient_checkpointing,
            log_every=1,
            save_every=0,
            **extra,
        ),
        torch.cuda.is_available(),
    )
    trainer = Trainer(cfg, env=env)
    try:
        trainer.fit(save_checkpoints=False)
    finally:
        trainer.close()
    if not env.is_main:
        return 0

    rows = read_rows(out / "run" / LOG_NAME)
    measured = rows[args.skip :] if len(rows) > args.skip else rows[-1:]
    global_batch = batch * env.world_size
    step_s = [global_batch / r["samples_per_s"] for r in measured]
    device = trainer.device
    if device.type == "cuda":
        peak = {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30, "gpu": torch.cuda.get_device_name(device)}
    else:
        peak = {
            "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "cpu": platform.processor() or platform.machine(),
        }
    summary = {
        "model": "tiny (32/2/2)" if args.tiny else f"ATST-Frame {args.arch}",
        "device": str(device),
        **peak,
        "processes": env.world_size,
        "precision": cfg.precision,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "batch_per_process": batch,
        "crop_seconds": cfg.crop_seconds,
        "steps": len(rows),
        "measured_steps": len(measured),
        "samples_per_s": global_batch / statistics.mean(step_s),
        "median_step_s": statistics.median(step_s),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "loss_curve_csv": str(out / "run" / LOG_NAME),
        "torch": torch.__version__,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| metric | value |", "|---|---|"] + [
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
