"""``python -m atst_features.train COMMAND ...`` / ``atst-features train COMMAND ...``.

Commands: ``frame`` (ATST-Frame pretraining), ``clip`` (ATST-Clip pretraining), ``finetune``
(clip-level classification from a labelled CSV), ``c2f`` (ATST-C2F distillation). Several GPUs
or nodes: launch the same command with ``torchrun --nproc_per_node N -m atst_features.train ...``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import checkpoint
from .config import ARCHS, DATA_RECIPES, LOSSES, TrainConfig, check, merge_for_resume, resolve

HELP = {
    "frame": "ATST-Frame pretraining (masked frame-level BYOL)",
    "clip": "ATST-Clip pretraining (segment-level BYOL on [CLS])",
    "finetune": "clip-level classification from a labelled CSV (gives the ATST-C2F teacher)",
    "c2f": "ATST-C2F: fine-tune ATST-Frame with distillation from a fine-tuned teacher",
}


def _add_common(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # only explicitly given options reach the config (recipes fill the rest)
    g = p.add_argument_group("run")
    g.add_argument("--data", default=S, help="folder of audio, .txt/.lst file list, or CSV (file[,labels])")
    g.add_argument("--out", default=S, help="run directory: checkpoints/, export/, train_log.csv")
    g.add_argument("--resume", default=S, help="checkpoint file to continue from, or 'auto' (latest in --out, if any)")
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:N; under torchrun cuda means cuda:LOCAL_RANK")
    g.add_argument("--precision", choices=["bf16", "fp32"], default=S, help="bf16 autocast (default on CUDA) or fp32")
    g.add_argument("--max-steps", type=int, default=S, help="optimizer steps (default: the recipe's)")
    g.add_argument("--batch-size", type=int, default=S, help="samples per process and step")
    g.add_argument("--num-workers", type=int, default=S, help="DataLoader workers decoding audio (default 4)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (0: only at the end; default 1000)")
    g.add_argument("--keep-checkpoints", type=int, default=S, help="newest checkpoints kept (default 3)")
    g.add_argument("--log-every", type=int, default=S, help="CSV row every N steps (default 10)")
    g.add_argument("--tensorboard", action="store_true", default=S, help="also write TensorBoard events")
    g.add_argument("--gradient-checkpointing", action="store_true", default=S, help="recompute block activations in backward")
    g.add_argument(
        "--strict-data",
        action="store_true",
        default=S,
        help="stop when the data scan finds unreadable, empty or too-short files (default: skip them, listed in OUT/data_report.csv)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="log lines instead of a progress bar")
    a = p.add_argument_group("architecture")
    a.add_argument("--arch", choices=sorted(ARCHS), default=S, help="small (384/6/12) or base (768/12/12, default)")
    a.add_argument("--embed-dim", type=int, default=S)
    a.add_argument("--depth", type=int, default=S)
    a.add_argument("--num-heads", type=int, default=S)
    a.add_argument("--drop-path", type=float, default=S, help="stochastic depth rate (default 0.1)")
    a.add_argument("--init", default=S, help="start from this encoder (converted dir, official or training checkpoint)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=S, help="peak lr per 256 samples (scaled by global batch / 256)")
    o.add_argument("--min-lr", type=float, default=S, help="final lr of the cosine (default 1e-6)")
    o.add_argument("--warmup-steps", type=int, default=S, help="linear warm-up steps (default: the recipe's)")
    o.add_argument("--weight-decay", type=float, default=S)
    o.add_argument(
        "--clip-grad", type=float, default=S, help="gradient norm clipping (default: off for pretraining, 3.0 otherwise)"
    )
    d = p.add_argument_group("data and augmentation")
    d.add_argument(
        "--crop-seconds",
        type=float,
        default=S,
        help="random crop length (the recipe's: frame 10 s, clip anchor 6 or 9 s, finetune 12 s, c2f 10 or 12 s)",
    )
    d.add_argument("--no-rrc", dest="rrc", action="store_false", default=S, help="no random-resize-crop")


def _add_pretraining(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = p.add_argument_group("pretraining")
    g.add_argument("--ema", type=float, default=S, help="initial EMA momentum (cosine to 1)")
    g.add_argument(
        "--weight-decay-end", type=float, default=S, help="final weight decay (cosine from --weight-decay; 0.04 -> 0.4)"
    )
    g.add_argument("--mixup-ratio", type=float, default=S, help="mixup weight upper bound (default 0.4)")
    g.add_argument("--mixup-memory", type=int, default=S, help="examples kept for mixup per process (default 2000)")
    g.add_argument("--head-hidden", type=int, default=S, help="projector / predictor hidden width (default 4096)")
    g.add_argument("--head-out", type=int, default=S, help="projector / predictor output width (default 256)")


def _add_supervised(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    g = p.add_argument_group("classification")
    g.add_argument(
        "--recipe",
        choices=DATA_RECIPES,
        default=S,
        help="official recipe the defaults come from: audioset (AS-2M, default) or as20k (the 20k balanced set; small data)",
    )
    g.add_argument("--epochs", type=float, default=S, help="passes over the data (default: the recipe's; or give --max-steps)")
    g.add_argument("--warmup-epochs", type=float, default=S, help="linear warm-up, in epochs (default: the recipe's)")
    g.add_argument("--layer-decay", type=float, default=S, help="layer-wise lr decay (default 0.75)")
    g.add_argument("--mixup-prob", type=float, default=S, help="probability that a clip is mixed (default: the recipe's)")
    g.add_argument("--mixup-alpha", type=float, default=S, help="mixup lambda ~ Beta(alpha, alpha) (default: the recipe's)")
    g.add_argument(
        "--loss",
        choices=LOSSES,
        default=S,
        help="bce or ce (single-label only); default as the reference: bce for multi-label data and for "
        "single-label finetune with mixup, ce for single-label c2f",
    )
    g.add_argument("--label-sep", default=S, help="separator of the labels column (default ';')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atst-features train",
        description="Pretrain (ATST-Frame, ATST-Clip), fine-tune, or distil (ATST-C2F) ATST encoders. "
        "Multi-GPU / multi-node: torchrun --nproc_per_node N -m atst_features.train COMMAND ...",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("frame", "clip", "finetune", "c2f"):
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _add_common(p)
        if name in ("frame", "clip"):
            _add_pretraining(p)
        else:
            _add_supervised(p)
        if name == "frame":
            p.add_argument("--mask-ratio", type=float, default=argparse.SUPPRESS, help="block mask probability (default 0.65)")
            p.add_argument("--mask-span", type=int, default=argparse.SUPPRESS, help="patches per mask span (default 5)")
        if name == "clip":
            p.add_argument("--positive-seconds", type=float, default=argparse.SUPPRESS, help="second crop length (default 6)")
        if name == "finetune":
            p.add_argument(
                "--family",
                choices=["clip", "frame"],
                default=argparse.SUPPRESS,
                help="encoder family without --init (default clip)",
            )
            lab = p.add_mutually_exclusive_group()
            lab.add_argument("--multilabel", dest="multilabel", action="store_true", default=argparse.SUPPRESS)
            lab.add_argument("--single-label", dest="multilabel", action="store_false", default=argparse.SUPPRESS)
        if name == "c2f":
            p.add_argument(
                "--teacher", default=argparse.SUPPRESS, help="fine-tuned teacher: a `finetune` checkpoint or its export/"
            )
            p.add_argument(
                "--distill-weight",
                type=float,
                default=argparse.SUPPRESS,
                help="lambda of the distillation term (default: the recipe's, 1.0 audioset, 0.5 as20k)",
            )
    return parser


def config_from_args(argv: list[str]) -> tuple[TrainConfig, dict | None]:
    """Parse ``argv`` into a resolved config and, when resuming, the checkpoint to continue from."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    command = given.pop("command")
    resume = given.pop("resume", None)
    path = None
    if resume == "auto":
        if "out" not in given:
            parser.error("--resume auto needs --out (the run directory to look in)")
        path = checkpoint.latest_checkpoint(given["out"])
    elif resume is not None:
        path = resume
    if path is not None:
        saved = checkpoint.read(path)
        if saved["command"] != command:
            parser.error(f"{path} is a `{saved['command']}` checkpoint, not `{command}`")
        saved["path"] = str(path)
        cfg = merge_for_resume(TrainConfig.from_dict(saved["config"]), given)
        check(cfg)
        return cfg, saved
    arch_flags = sorted(f"--{k.replace('_', '-')}" for k in ("arch", "embed_dim", "depth", "num_heads", "family") if k in given)
    if "init" in given and arch_flags:
        parser.error(f"--init sets the architecture; drop {', '.join(arch_flags)}")
    missing = [f"--{k}" for k in ("data", "out") if k not in given]
    if missing:
        parser.error(f"{command} needs {' and '.join(missing)}")
    return resolve(TrainConfig(command=command, **given), torch.cuda.is_available()), None


def _error(message: object, status: int) -> int:
    print(f"atst-features train: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run one training command; returns the exit status (2 for bad settings or data, 1 for a run
    that failed while training)."""
    from .data import DataUnavailable
    from .trainer import Trainer

    try:
        cfg, saved = config_from_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, permissions, ...
        return _error(e, 2)
    try:
        trainer = Trainer(cfg, saved)
    except (ValueError, OSError, ImportError) as e:
        return _error(e, 2)
    try:
        trainer.fit()
    except (FloatingPointError, DataUnavailable) as e:
        return _error(e, 1)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
