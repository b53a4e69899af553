"""Benchmark training: pretraining throughput, and what pretraining, fine-tuning and C2F learn.

Everything runs through the real training path (``atst_features.train.trainer.Trainer``: the data
scan, DataLoader workers decoding wav files, log-mel on the device, augmentation, the optimizer) on
a generated corpus (``atst_features.train.synthetic``), without network access.

``--part throughput``: ATST-Frame pretraining (``--arch``, bf16 on a GPU) for ``--steps`` steps on
10.5 s clips; samples/s (excluding the first ``--skip`` steps), peak memory, the loss curve.

``--part learning``: 8 classes x 50 clips of 2 s (80 held out), a 128-d, 4-block, 4-head encoder:

1. probe of a random-init ATST-Frame encoder: 5-fold ridge classifier on the mean + std over
   time of the last block's frame features (``train.evaluate.probe_accuracy``), all 400 clips;
2. ATST-Frame pretraining on the 320 training clips (``--pretrain-steps``), the same probe;
3. ``finetune`` (ATST-Clip from scratch) with the default recipe for ``--finetune-steps`` steps of
   ``--finetune-batch-size`` clips: train loss first -> last and held-out accuracy (chance 1/8);
4. ``c2f`` from the pretrained ATST-Frame with that teacher, default recipe: the same.

``--baseline`` also runs 3. and 4. with the settings used before the official fine-tuning recipes
(``BASELINE``: lr 5e-4 per 256 samples, warm-up 1300/39010 of the steps, cross-entropy for
single-label data, mixup 0.5 / Beta(10, 10), 10 s crops, C2F lambda 0.5), the same teacher and budget.
Every run reports its samples/s.

    python benchmarks/bench_train.py --part throughput --steps 60 --batch-size 64   # one GPU
    torchrun --nproc_per_node 8 benchmarks/bench_train.py --part throughput --steps 60
    python benchmarks/bench_train.py                                                 # CPU: the learning part
    python benchmarks/bench_train.py --baseline                                      # ... and the former defaults
    python benchmarks/bench_train.py --tiny --steps 6                                 # CPU smoke check

Writes to ``--out``: the corpora, each run's directory (``train_log.csv``, ``export/``) and
``summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import atst_features as af
from atst_features import weights
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.train import distributed
from atst_features.train.__main__ import main as train_main
from atst_features.train.config import TrainConfig, resolve
from atst_features.train.evaluate import accuracy, frame_statistics, probe_accuracy, read_labelled
from atst_features.train.logs import LOG_NAME
from atst_features.train.synthetic import make_corpus
from atst_features.train.trainer import Trainer

LEARNING_ENCODER = ["--embed-dim", "128", "--depth", "4", "--num-heads", "4"]
#: Pretraining settings of the learning part (the recipes are for AudioSet-sized runs).
LEARNING_PRETRAIN = [
    "--crop-seconds", "2", "--batch-size", "32", "--lr", "1e-2", "--ema", "0.99",
    "--head-hidden", "512", "--head-out", "128", "--mixup-memory", "256",
]  # fmt: skip
#: The fine-tuning settings before the official recipes (taken from a distillation command line),
#: for ``--baseline``; with 300 steps the warm-up is round(300 * 1300 / 39010) = 10 steps.
BASELINE_LR, BASELINE_WARMUP = 5e-4, 1300 / 39010
BASELINE = ["--lr", str(BASELINE_LR), "--loss", "ce", "--mixup-prob", "0.5", "--mixup-alpha", "10", "--crop-seconds", "10"]


def read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30, "gpu": torch.cuda.get_device_name(device)}
    return {"peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu": platform.processor() or platform.machine()}


def throughput(args, env: distributed.DistEnv) -> dict:
    """ATST-Frame pretraining for ``args.steps`` steps; samples/s, peak memory, loss curve."""
    batch = args.batch_size or (4 if args.tiny else 64)
    n_files = args.files or max(2 * batch * env.world_size, 16)
    out = Path(args.out)
    corpus_dir = out / "audio"
    if env.is_main:
        make_corpus(corpus_dir, n_classes=8, per_class=math.ceil(n_files / 8), held_out=0, seconds=1.5 if args.tiny else args.seconds)
    while not (corpus_dir / "all.csv").is_file():  # the others wait, before any process group exists
        time.sleep(0.5)
    extra = (
        {"embed_dim": 32, "depth": 2, "num_heads": 2, "head_hidden": 64, "head_out": 32, "crop_seconds": 1.0, "mixup_memory": 64}
        if args.tiny
        else {}
    )
    cfg = resolve(
        TrainConfig(
            command="frame",
            data=str(corpus_dir / "all.csv"),
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
        return {}
    rows = read_rows(out / "run" / LOG_NAME)
    measured = rows[args.skip :] if len(rows) > args.skip else rows[-1:]
    global_batch = batch * env.world_size
    step_s = [global_batch / r["samples_per_s"] for r in measured]
    return {
        "model": "tiny (32/2/2)" if args.tiny else f"ATST-Frame {args.arch}",
        "device": str(trainer.device),
        **device_info(trainer.device),
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
    }


def _train(command: str, out: Path, *args: str) -> dict:
    """Run one training command; (seconds, first/last loss, samples/s of the run)."""
    start = time.perf_counter()
    if train_main([command, "--out", str(out), "--save-every", "0", "--log-every", "10", "--no-progress", *args]) != 0:
        raise SystemExit(f"`{command}` failed; see above")
    rows = read_rows(out / LOG_NAME)
    return {
        "seconds": time.perf_counter() - start,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
    }


def learning(args) -> dict:
    """The learning part (see the module docstring)."""
    out = Path(args.out) / "learning"
    corpus = make_corpus(out / "corpus", n_classes=8, per_class=50, held_out=10, seconds=2.0)
    files, labels = read_labelled(corpus.all_csv)
    test_files, test_labels = read_labelled(corpus.test_csv)
    runtime = ["--device", args.device, "--num-workers", str(args.num_workers)]
    if args.precision:
        runtime += ["--precision", args.precision]

    torch.manual_seed(0)
    enc_cfg = ATSTConfig(family="frame", embed_dim=128, depth=4, num_heads=4)
    random_init = weights.build(enc_cfg, ATSTEncoder(enc_cfg).state_dict())
    result = {"probe_random_init": probe_accuracy(frame_statistics(random_init, files), labels)}

    steps = ["--max-steps", str(args.pretrain_steps)]
    frame = _train("frame", out / "frame", "--data", str(corpus.train_csv), *LEARNING_ENCODER, *LEARNING_PRETRAIN, *steps, *runtime)
    result["frame_pretraining"] = frame
    result["probe_pretrained"] = probe_accuracy(frame_statistics(af.load(out / "frame" / "export"), files), labels)

    steps = ["--max-steps", str(args.finetune_steps), "--batch-size", str(args.finetune_batch_size)]
    variants = {"": []}
    if args.baseline:
        variants["_baseline"] = [*BASELINE, "--warmup-steps", str(round(args.finetune_steps * BASELINE_WARMUP))]
    for suffix, settings in variants.items():
        name = f"finetune{suffix}"
        ft = _train("finetune", out / name, "--data", str(corpus.train_csv), *LEARNING_ENCODER, *steps, *settings, *runtime)
        ft["test_accuracy"] = accuracy(af.load(out / name / "export"), test_files, test_labels)
        result[name] = ft
    # C2F: the pretrained ATST-Frame student, the teacher fine-tuned with the default recipe.
    init, teacher = out / "frame" / "export", out / "finetune" / "export"
    c2f_args = ["--data", str(corpus.train_csv), "--init", str(init), "--teacher", str(teacher), *steps, *runtime]
    for suffix, settings in variants.items():
        name = f"c2f{suffix}"
        c2f = _train("c2f", out / name, *c2f_args, *settings, *(["--distill-weight", "0.5"] if settings else []))
        c2f["test_accuracy"] = accuracy(af.load(out / name / "export"), test_files, test_labels)
        result[name] = c2f
    result["chance"] = 1 / corpus.n_classes
    return result


def markdown(summary: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]

    def add(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                add(f"{prefix}{k}.", v)
            else:
                lines.append(f"| {prefix}{k} | {v:.4g} |" if isinstance(v, float) else f"| {prefix}{k} | {v} |")

    add("", summary)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--part",
        choices=["auto", "throughput", "learning", "all"],
        default="auto",
        help="auto (default): learning on a CPU (its runs report samples/s too), both with CUDA",
    )
    p.add_argument("--out", default="bench_train_out", help="output folder (corpora, runs, summary)")
    p.add_argument("--steps", type=int, default=60, help="throughput: steps")
    p.add_argument("--skip", type=int, default=10, help="throughput: first steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=None, help="throughput: per process (default 64; 4 with --tiny)")
    p.add_argument("--arch", choices=["small", "base"], default="base", help="throughput: the encoder")
    p.add_argument("--tiny", action="store_true", help="throughput: 32-dim, 2-block encoder for a CPU smoke check")
    p.add_argument("--files", type=int, default=None, help="throughput: generated clips (default: 2 epochs per process)")
    p.add_argument("--seconds", type=float, default=10.5, help="throughput: length of each generated clip")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--pretrain-steps", type=int, default=300, help="learning: ATST-Frame pretraining steps")
    p.add_argument("--finetune-steps", type=int, default=300, help="learning: finetune and c2f steps")
    p.add_argument("--finetune-batch-size", type=int, default=64, help="learning: finetune and c2f clips per step")
    p.add_argument("--baseline", action="store_true", help="learning: also finetune and c2f with the former defaults")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--num-workers", type=int, default=4)
    args = p.parse_args(argv)

    env = distributed.env_from_torchrun()
    if args.part == "auto":
        args.part = "all" if torch.cuda.is_available() and args.device != "cpu" else "learning"
    summary: dict = {"torch": torch.__version__}
    if args.part in ("throughput", "all"):
        summary["throughput"] = throughput(args, env)
    if args.part in ("learning", "all") and env.is_main and not env.distributed:
        summary["learning"] = learning(args)
    if not env.is_main:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
