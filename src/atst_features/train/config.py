"""The run configuration and the official recipes it defaults to.

``TrainConfig`` is a frozen dataclass holding every setting of a run; it is stored in each
checkpoint. Settings left unset (``None``) take the recipe of the command and ``--arch``:

| recipe (per 256 samples)   | lr     | warm-up | steps   | EMA    | crop (s) | batch / GPU |
|----------------------------|--------|---------|---------|--------|----------|-------------|
| ATST-Frame small           | 4e-4   | 1950    | 58500   | 0.997  | 10       | 256         |
| ATST-Frame base            | 8e-5   | 19900   | 398000  | 0.9996 | 10       | 144         |
| ATST-Clip small            | 5e-4   | 1300    | 39100   | 0.99   | 9 + 6    | 384         |
| ATST-Clip base             | 2e-4   | 15860   | 318000  | 0.9995 | 6 + 6    | 256         |
| fine-tuning and C2F        | 5e-4   | 1300    | 39010   | -      | 10       | 64          |

The learning rate is given per 256 samples and scaled by (processes x batch size) / 256. When
``--max-steps`` is set and ``--warmup-steps`` is not, the warm-up keeps the recipe's fraction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

COMMANDS = ("frame", "clip", "finetune", "c2f")
ARCHS = {
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}
PRETRAIN_RECIPES = {
    ("frame", "small"): {
        "lr": 4e-4,
        "warmup_steps": 1950,
        "max_steps": 58500,
        "ema": 0.997,
        "crop_seconds": 10.0,
        "batch_size": 256,
    },
    ("frame", "base"): {
        "lr": 8e-5,
        "warmup_steps": 19900,
        "max_steps": 398000,
        "ema": 0.9996,
        "crop_seconds": 10.0,
        "batch_size": 144,
    },
    ("clip", "small"): {
        "lr": 5e-4,
        "warmup_steps": 1300,
        "max_steps": 39100,
        "ema": 0.99,
        "crop_seconds": 9.0,
        "batch_size": 384,
    },
    ("clip", "base"): {
        "lr": 2e-4,
        "warmup_steps": 15860,
        "max_steps": 318000,
        "ema": 0.9995,
        "crop_seconds": 6.0,
        "batch_size": 256,
    },
}
SUPERVISED_RECIPE = {"lr": 5e-4, "warmup_steps": 1300, "max_steps": 39010, "ema": None, "crop_seconds": 10.0, "batch_size": 64}
LR_REFERENCE_BATCH = 256

#: Settings that may differ when a run is resumed (paths and bookkeeping, not the math).
RUNTIME_FIELDS = frozenset(
    {"data", "out", "init", "teacher", "device", "num_workers", "save_every", "keep_checkpoints", "log_every", "tensorboard"}
)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (see ``python -m atst_features.train COMMAND --help``)."""

    command: str
    data: str
    out: str
    # architecture
    arch: str = "base"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    family: str | None = None  # encoder family to fine-tune from scratch ("clip" or "frame")
    drop_path: float = 0.1
    head_hidden: int = 4096  # BYOL projector / predictor width
    head_out: int = 256
    init: str | None = None  # encoder to start from (converted dir, official file, training checkpoint)
    teacher: str | None = None  # c2f: the fine-tuned teacher (a finetune checkpoint or its export/)
    # optimisation
    max_steps: int | None = None
    warmup_steps: int | None = None
    batch_size: int | None = None  # per process
    lr: float | None = None  # per 256 samples
    min_lr: float = 1e-6
    weight_decay: float | None = None
    weight_decay_end: float | None = None
    ema: float | None = None
    layer_decay: float = 0.75
    clip_grad: float | None = None
    # data and augmentation
    crop_seconds: float | None = None
    positive_seconds: float = 6.0
    mask_ratio: float = 0.65
    mask_span: int = 5
    mixup_ratio: float = 0.4
    mixup_memory: int = 2000
    mixup_prob: float = 0.5
    mixup_alpha: float = 10.0
    rrc: bool = True
    multilabel: bool | None = None
    label_sep: str = ";"
    distill_weight: float = 0.5
    # runtime
    device: str = "auto"
    precision: str | None = None
    gradient_checkpointing: bool = False
    num_workers: int = 4
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool = False

    @property
    def pretraining(self) -> bool:
        return self.command in ("frame", "clip")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**data)


def recipe(command: str, arch: str) -> dict:
    """The official defaults of ``command`` for ``arch`` ("small" or "base")."""
    if command in ("frame", "clip"):
        return PRETRAIN_RECIPES[(command, arch)]
    return SUPERVISED_RECIPE


def resolve(cfg: TrainConfig, cuda_available: bool) -> TrainConfig:
    """Fill every unset setting from the recipe and check the combination; returns a new config."""
    if cfg.command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {cfg.command!r}")
    if cfg.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {cfg.arch!r}")
    r = recipe(cfg.command, cfg.arch)
    dims = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in ARCHS[cfg.arch].items()}
    max_steps = cfg.max_steps if cfg.max_steps is not None else r["max_steps"]
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = r["warmup_steps"] if cfg.max_steps is None else round(r["warmup_steps"] * max_steps / r["max_steps"])
    family = cfg.family
    if cfg.command in ("frame", "c2f"):
        family = "frame"
    elif cfg.command == "clip":
        family = "clip"
    precision = cfg.precision
    if precision is None:
        uses_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and cuda_available)
        precision = "bf16" if uses_cuda else "fp32"
    out = replace(
        cfg,
        **dims,
        family=family,
        max_steps=max_steps,
        warmup_steps=warmup,
        batch_size=cfg.batch_size if cfg.batch_size is not None else r["batch_size"],
        lr=cfg.lr if cfg.lr is not None else r["lr"],
        ema=cfg.ema if cfg.ema is not None else r["ema"],
        crop_seconds=cfg.crop_seconds if cfg.crop_seconds is not None else r["crop_seconds"],
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else (0.04 if cfg.pretraining else 0.0),
        weight_decay_end=cfg.weight_decay_end if cfg.weight_decay_end is not None else (0.4 if cfg.pretraining else None),
        clip_grad=cfg.clip_grad if cfg.clip_grad is not None else (None if cfg.pretraining else 3.0),
        precision=precision,
    )
    if out.weight_decay_end is None:
        out = replace(out, weight_decay_end=out.weight_decay)
    check(out)
    return out


def check(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, saying what is accepted."""
    problems = []
    if cfg.max_steps < 1:
        problems.append(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if not 0 <= cfg.warmup_steps <= cfg.max_steps:
        problems.append(f"--warmup-steps must be in 0..max-steps ({cfg.max_steps}), got {cfg.warmup_steps}")
    if cfg.batch_size < 2:
        problems.append(f"--batch-size must be >= 2 (batch norm needs two samples), got {cfg.batch_size}")
    if cfg.lr <= 0 or cfg.min_lr < 0:
        problems.append(f"--lr must be > 0 and --min-lr >= 0, got {cfg.lr}, {cfg.min_lr}")
    if cfg.precision not in ("bf16", "fp32"):
        problems.append(f"--precision must be bf16 or fp32, got {cfg.precision!r}")
    if cfg.pretraining and not 0.0 < cfg.ema < 1.0:
        problems.append(f"--ema must be in (0, 1), got {cfg.ema}")
    if not 0.0 <= cfg.distill_weight <= 1.0:
        problems.append(f"--distill-weight must be in [0, 1], got {cfg.distill_weight}")
    if cfg.crop_seconds <= 0 or cfg.positive_seconds <= 0:
        problems.append("crop lengths must be positive seconds")
    if cfg.family not in (None, "clip", "frame"):
        problems.append(f"--family must be clip or frame, got {cfg.family!r}")
    if cfg.command == "c2f" and (cfg.teacher is None):
        problems.append("c2f needs --teacher (a fine-tuned checkpoint from `finetune`, or its export/ folder)")
    if cfg.save_every < 0 or cfg.log_every < 1 or cfg.keep_checkpoints < 1:
        problems.append("--save-every must be >= 0, --log-every >= 1, --keep-checkpoints >= 1")
    if cfg.embed_dim % cfg.num_heads:
        problems.append(f"--embed-dim {cfg.embed_dim} is not divisible by --num-heads {cfg.num_heads}")
    if problems:
        raise ValueError("; ".join(problems))


def merge_for_resume(saved: TrainConfig, given: dict) -> TrainConfig:
    """The saved config with the explicitly given runtime settings; other changes are refused."""
    changed = {k: v for k, v in given.items() if k != "command" and getattr(saved, k) != v}
    refused = sorted(k for k in changed if k not in RUNTIME_FIELDS)
    if refused:
        detail = ", ".join(f"{k}: {getattr(saved, k)!r} -> {changed[k]!r}" for k in refused)
        raise ValueError(
            f"cannot change these settings when resuming (the run would not continue exactly): {detail}; "
            f"only {', '.join(sorted(RUNTIME_FIELDS))} may change"
        )
    return replace(saved, **changed)
