"""The run configuration and the official recipes it defaults to.

``TrainConfig`` is a frozen dataclass holding every setting of a run; it is stored in each
checkpoint. Settings left unset (``None``) take the recipe of the command (and ``--arch``,
``--recipe``, the encoder family):

Pretraining (AdamW, per step; ``PRETRAIN_RECIPES``, from the official ``train_small.sh`` /
``train_base.sh`` and README commands):

| recipe (per 256 samples)   | lr     | warm-up | steps   | EMA    | crop (s) | batch / GPU |
|----------------------------|--------|---------|---------|--------|----------|-------------|
| ATST-Frame small           | 4e-4   | 1950    | 58500   | 0.997  | 10       | 256         |
| ATST-Frame base            | 8e-5   | 19900   | 398000  | 0.9996 | 10       | 144         |
| ATST-Clip small            | 5e-4   | 1300    | 39100   | 0.99   | 9 + 6    | 384         |
| ATST-Clip base             | 2e-4   | 15860   | 318000  | 0.9995 | 6 + 6    | 256         |

Fine-tuning and C2F (``SUPERVISED_RECIPES``, one row per command, encoder family and data
recipe; from the official fine-tuning and distillation shell scripts, see ``docs/train.md``):
SGD (momentum 0.9, no weight decay), layer-wise lr decay 0.75, gradient clipping 3.0, a cosine
schedule over whole epochs with a linear warm-up, batch mixup, and binary cross-entropy (the
official loss for multi-label data, and for single-label fine-tuning whenever mixup is on;
single-label C2F uses cross-entropy, see ``default_loss``).

The learning rate is given per 256 samples and scaled by (processes x batch size) / 256. When
``--max-steps`` is set and ``--warmup-steps`` is not, the warm-up keeps the recipe's fraction.
Epoch-based recipes become steps once the data is known (``finalize``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..frontend import FRAMES_PER_S, MIN_SAMPLES, SAMPLE_RATE, num_frames
from ..model import ATSTConfig

COMMANDS = ("frame", "clip", "finetune", "c2f")
SUPERVISED = ("finetune", "c2f")
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


@dataclass(frozen=True)
class SupervisedRecipe:
    """One fine-tuning / C2F recipe of the official scripts.

    ``lr`` is the peak per 256 samples; ``epochs`` and ``warmup_epochs`` are passes over the
    training data; ``mixup_prob`` is the chance that a clip is mixed, with lambda ~
    Beta(``mixup_alpha``, ``mixup_alpha``); ``distill_weight`` is C2F's lambda.
    """

    lr: float
    epochs: float
    warmup_epochs: float
    batch_size: int
    crop_seconds: float
    mixup_prob: float
    mixup_alpha: float
    distill_weight: float | None = None
    optimizer: str = "sgd"  # momentum 0.9, no weight decay
    layer_decay: float = 0.75
    clip_grad: float = 3.0
    loss: str = "bce"  # binary cross-entropy on AudioSet (multi-label); see default_loss for other data
    source: str = ""


_SH = "atst/shell/downtream/finetune/", "atstframe/shell/downtream/finetune/", "atstframe/shell/distill/"

#: (command, encoder family, data recipe) -> recipe. ``audioset``: the AudioSet (AS-2M) runs
#: behind the released fine-tuned models and the C2F teacher; ``as20k``: the balanced AudioSet
#: subset (about 20k clips), the recipe for small labelled sets. Sources: the audiossl shell scripts
#: (``eval_audioset*.sh`` give lr, epochs, warm-up, mixup; ``eval_env.sh`` / ``eval_batch.sh`` the
#: batch), where a script sweeps several lrs, the first (for AS-20k ATST-Clip, the C2F teacher's).
SUPERVISED_RECIPES: dict[tuple[str, str, str], SupervisedRecipe] = {
    # key                              lr   epochs warm-up batch crop mixup p, alpha, C2F lambda
    ("finetune", "clip", "audioset"): SupervisedRecipe(0.5, 10, 2, 128, 12.0, 0.5, 10.0,
        source=f"{_SH[0]}eval_audioset.sh (lr 0.5 | 1.0 | 2.0), eval_env.sh; mixup 0.5 / 10: FinetuneTargetTransformAudioset"),
    ("finetune", "frame", "audioset"): SupervisedRecipe(0.5, 11, 2, 128, 12.0, 0.5, 10.0,
        source=f"{_SH[1]}eval_audioset.sh (lr 0.5 | 1.0; layer decay 0.75, mixup 0.5 / 10), eval_batch.sh"),
    ("finetune", "clip", "as20k"): SupervisedRecipe(1.0, 200, 5, 128, 12.0, 1.0, 0.5,
        source=f"{_SH[0]}eval_audioset_b.sh (lr 2.0 ... 0.1; 1.0: the C2F teacher, {_SH[2]}eval_audioset_b.sh); alpha 0.5"),
    ("finetune", "frame", "as20k"): SupervisedRecipe(1.0, 200, 5, 128, 12.0, 1.0, 10.0,
        source=f"{_SH[1]}eval_audioset_b.sh (lr 1.0 | 2.0 | 0.8 | 0.5 | 0.2); alpha 10 (train_finetune.py default)"),
    ("c2f", "frame", "audioset"): SupervisedRecipe(0.5, 11, 2, 320, 10.0, 0.5, 10.0, 1.0,
        source=f"{_SH[2]}eval_audioset.sh (lr 0.5 | 1.0), eval_env.sh; lambda 1, mixup, 10 s crops: module_distill.py"),
    ("c2f", "frame", "as20k"): SupervisedRecipe(3.0, 200, 5, 320, 12.0, 1.0, 0.5, 0.5,
        source=f"{_SH[2]}eval_audioset_b.sh (lr 3.0, alpha 0.5), eval_env.sh; lambda 0.5: module_distill_other.py"),
}  # fmt: skip
DATA_RECIPES = ("audioset", "as20k")
DEFAULT_DATA_RECIPE = "audioset"
LR_REFERENCE_BATCH = 256
LOSSES = ("bce", "ce")

#: Settings that may differ when a run is resumed (paths and bookkeeping, not the math).
RUNTIME_FIELDS = frozenset(
    {
        "data",
        "out",
        "init",
        "teacher",
        "device",
        "num_workers",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "tensorboard",
        "strict_data",
        "progress",
    }
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
    recipe: str | None = None  # finetune / c2f: "audioset" or "as20k" (SUPERVISED_RECIPES)
    max_steps: int | None = None
    warmup_steps: int | None = None
    epochs: float | None = None  # finetune / c2f: passes over the data (gives max_steps)
    warmup_epochs: float | None = None
    batch_size: int | None = None  # per process
    lr: float | None = None  # per 256 samples
    min_lr: float = 1e-6
    weight_decay: float | None = None
    weight_decay_end: float | None = None
    ema: float | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None
    loss: str | None = None  # finetune / c2f: "bce" or "ce" (single-label only)
    # data and augmentation
    crop_seconds: float | None = None
    positive_seconds: float = 6.0
    mask_ratio: float = 0.65
    mask_span: int = 5
    mixup_ratio: float = 0.4
    mixup_memory: int = 2000
    mixup_prob: float | None = None
    mixup_alpha: float | None = None
    rrc: bool = True
    multilabel: bool | None = None
    label_sep: str = ";"
    distill_weight: float | None = None
    strict_data: bool = False  # unreadable, empty or too-short files are an error instead of skipped
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
    progress: bool = True  # a tqdm progress bar on rank 0

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
    """The official pretraining defaults of ``command`` ("frame" or "clip") for ``arch``."""
    return PRETRAIN_RECIPES[(command, arch)]


def supervised_recipe(command: str, family: str, data_recipe: str) -> SupervisedRecipe:
    """The official fine-tuning / C2F defaults for an encoder ``family`` and a data recipe."""
    key = (command, family, data_recipe)
    if key not in SUPERVISED_RECIPES:
        raise ValueError(f"no {command} recipe {data_recipe!r} for ATST-{family} (recipes: {', '.join(DATA_RECIPES)})")
    return SUPERVISED_RECIPES[key]


def _given(value, default):
    return default if value is None else value


def _family(cfg: TrainConfig) -> str | None:
    """The encoder family when the settings alone fix it (``None``: read from ``--init`` later)."""
    if cfg.command in ("frame", "c2f"):
        return "frame"
    if cfg.command == "clip":
        return "clip"
    if cfg.init is not None:
        return None
    return cfg.family or "clip"


def resolve(cfg: TrainConfig, cuda_available: bool) -> TrainConfig:
    """Fill every setting the command's recipe fixes and check them all; returns a new config.

    What depends on the data (epochs -> steps) or on the ``--init`` encoder (its family) stays
    unset until ``finalize``; everything given is checked here, before any data or model is read.
    """
    if cfg.command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {cfg.command!r}")
    if cfg.arch not in ARCHS:
        raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {cfg.arch!r}")
    dims = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in ARCHS[cfg.arch].items()}
    precision = cfg.precision
    if precision is None:
        uses_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and cuda_available)
        precision = "bf16" if uses_cuda else "fp32"
    out = replace(cfg, **dims, family=_family(cfg), precision=precision)
    out = _resolve_pretraining(out) if cfg.pretraining else _resolve_supervised(out)
    check(out)
    return out


def _resolve_pretraining(cfg: TrainConfig) -> TrainConfig:
    r = recipe(cfg.command, cfg.arch)
    max_steps = _given(cfg.max_steps, r["max_steps"])
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = r["warmup_steps"] if cfg.max_steps is None else round(r["warmup_steps"] * max_steps / r["max_steps"])
    weight_decay = _given(cfg.weight_decay, 0.04)
    return replace(
        cfg,
        max_steps=max_steps,
        warmup_steps=warmup,
        batch_size=_given(cfg.batch_size, r["batch_size"]),
        lr=_given(cfg.lr, r["lr"]),
        ema=_given(cfg.ema, r["ema"]),
        crop_seconds=_given(cfg.crop_seconds, r["crop_seconds"]),
        weight_decay=weight_decay,
        weight_decay_end=_given(cfg.weight_decay_end, 0.4),
    )


def _resolve_supervised(cfg: TrainConfig) -> TrainConfig:
    data_recipe = _given(cfg.recipe, DEFAULT_DATA_RECIPE)
    if data_recipe not in DATA_RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(DATA_RECIPES)}, got {data_recipe!r}")
    pairs = (("epochs", "max_steps"), ("warmup_epochs", "warmup_steps"))  # a run counts epochs or steps
    both = [f"--{a} and --{b}".replace("_", "-") for a, b in pairs if getattr(cfg, a) is not None and getattr(cfg, b) is not None]
    if both:
        raise ValueError(f"give one of {' / '.join(both)}, not both")
    # Only FAMILY_FIELDS differ between the clip and frame rows; the rest is read from either.
    r = supervised_recipe(cfg.command, cfg.family or "frame", data_recipe)
    weight_decay = _given(cfg.weight_decay, 0.0)
    out = replace(
        cfg,
        recipe=data_recipe,
        batch_size=_given(cfg.batch_size, r.batch_size),
        lr=_given(cfg.lr, r.lr),
        layer_decay=_given(cfg.layer_decay, r.layer_decay),
        clip_grad=_given(cfg.clip_grad, r.clip_grad),
        crop_seconds=_given(cfg.crop_seconds, r.crop_seconds),
        mixup_prob=_given(cfg.mixup_prob, r.mixup_prob),
        distill_weight=_given(cfg.distill_weight, r.distill_weight) if cfg.command == "c2f" else None,
        weight_decay=weight_decay,
        weight_decay_end=_given(cfg.weight_decay_end, weight_decay),
    )
    return _fill_family(out, cfg.family) if cfg.family is not None else out


#: The recipe values that differ between the ATST-Clip and ATST-Frame rows of a recipe.
FAMILY_FIELDS = ("epochs", "warmup_epochs", "mixup_alpha")


def _fill_family(cfg: TrainConfig, family: str) -> TrainConfig:
    """Fill the unset ``FAMILY_FIELDS`` from the ``family`` row (idempotent). With ``--max-steps``
    (or ``--warmup-steps``) the run is counted in steps and the epochs stay unset."""
    r = supervised_recipe(cfg.command, family, cfg.recipe)
    in_steps = cfg.max_steps is not None
    keep_warmup = cfg.warmup_epochs is not None or in_steps or cfg.warmup_steps is not None
    return replace(
        cfg,
        family=family,
        mixup_alpha=_given(cfg.mixup_alpha, r.mixup_alpha),
        epochs=cfg.epochs if cfg.epochs is not None or in_steps else r.epochs,
        warmup_epochs=cfg.warmup_epochs if keep_warmup else r.warmup_epochs,
    )


def default_loss(command: str, multilabel: bool, mixup_prob: float) -> str:
    """The reference's classification loss: binary cross-entropy ("bce") for multi-label data; for
    single-label data, ``finetune`` uses it whenever mixup is on (cross-entropy, "ce", without),
    ``c2f`` uses cross-entropy (the distillation code for tasks other than AudioSet)."""
    if multilabel or (command == "finetune" and mixup_prob > 0):
        return "bce"
    return "ce"


def finalize(cfg: TrainConfig, family: str, batches_per_epoch: int, multilabel: bool | None) -> TrainConfig:
    """The complete config of a run once the encoder family, the data size and the label kind are known.

    Supervised recipes count epochs; here they become ``max_steps`` / ``warmup_steps``
    (``round(epochs * batches_per_epoch)``); with ``--max-steps`` the warm-up keeps the recipe's
    fraction. The loss is the official rule (``default_loss``). A complete config comes back unchanged.
    """
    if cfg.pretraining:
        return cfg
    if cfg.family is not None and cfg.family != family:
        raise ValueError(f"`{cfg.command}` was set up for ATST-{cfg.family}, but the encoder is ATST-{family}")
    if batches_per_epoch < 1:
        raise ValueError("the training data gives no full batch per epoch; pass more data or a smaller --batch-size")
    out = _fill_family(cfg, family)
    max_steps = out.max_steps if out.max_steps is not None else max(1, round(out.epochs * batches_per_epoch))
    warmup = out.warmup_steps
    if warmup is None and out.warmup_epochs is not None:
        warmup = min(round(out.warmup_epochs * batches_per_epoch), max_steps)
    elif warmup is None:  # counted in steps: the recipe's warm-up fraction
        r = supervised_recipe(out.command, family, out.recipe)
        warmup = round(max_steps * r.warmup_epochs / r.epochs)
    loss = out.loss if out.loss is not None else default_loss(out.command, bool(multilabel), out.mixup_prob)
    if loss == "ce" and multilabel:
        raise ValueError("--loss ce is for single-label data; multi-label training uses bce")
    out = replace(out, max_steps=max_steps, warmup_steps=warmup, loss=loss)
    check(out)
    return out


def crop_problem(seconds: float, encoder: ATSTConfig, what: str = "--crop-seconds", min_tokens: int = 1) -> str | None:
    """Why a pretraining crop of ``seconds`` does not fit one forward pass of ``encoder``, or gives
    fewer than ``min_tokens`` patches (``None`` when it fits). Crops shorter than the front end's
    minimum are zero-padded to it (``frontend.MIN_SAMPLES``), as the data loader does."""
    tokens = num_frames(max(round(seconds * SAMPLE_RATE), MIN_SAMPLES)) // encoder.patch_w
    if tokens > encoder.max_tokens:
        longest = encoder.max_tokens * encoder.patch_w / FRAMES_PER_S
        return f"{what} {seconds} gives {tokens} patches; the encoder takes at most {encoder.max_tokens} (crops of {longest:g} s)"
    if tokens < min_tokens:
        shortest = (min_tokens * encoder.patch_w - 1) / FRAMES_PER_S
        return f"{what} {seconds} gives {tokens} patches; at least {min_tokens} are needed (crops of {shortest:g} s or more)"
    return None


def crop_problems(cfg: TrainConfig, encoder: ATSTConfig) -> list[str]:
    """Why the pretraining crops of ``cfg`` do not suit ``encoder`` (empty when they do, and for
    fine-tuning, whose crops are chunked). ATST-Frame needs more patches than one mask span."""
    if not cfg.pretraining:
        return []
    crops = [("--crop-seconds", cfg.crop_seconds)]
    if cfg.command == "clip":
        crops.append(("--positive-seconds", cfg.positive_seconds))
    least = cfg.mask_span + 1 if cfg.command == "frame" else 1
    return [m for flag, seconds in crops if (m := crop_problem(seconds, encoder, flag, least))]


def _float_problems(cfg: TrainConfig) -> list[str]:
    problems = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    return problems


def _range_problems(cfg: TrainConfig) -> list[str]:
    """Numbers outside what works, as messages."""
    p = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

    if cfg.max_steps is not None:
        need(cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}")
        if cfg.warmup_steps is not None:
            need(0 <= cfg.warmup_steps <= cfg.max_steps, f"--warmup-steps must be in 0..max-steps ({cfg.max_steps}), got {cfg.warmup_steps}")
    elif cfg.warmup_steps is not None:
        need(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.epochs is not None:
        need(cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}")
    if cfg.warmup_epochs is not None:
        need(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
        if cfg.epochs is not None:
            need(cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs ({cfg.warmup_epochs}) must not exceed --epochs ({cfg.epochs})")
    need(cfg.batch_size >= 2, f"--batch-size must be >= 2 (batch norm needs two samples), got {cfg.batch_size}")
    need(cfg.lr > 0 and cfg.min_lr >= 0, f"--lr must be > 0 and --min-lr >= 0, got {cfg.lr}, {cfg.min_lr}")
    need(cfg.weight_decay >= 0 and cfg.weight_decay_end >= 0, "--weight-decay and --weight-decay-end must be >= 0")
    need(cfg.precision in ("bf16", "fp32"), f"--precision must be bf16 or fp32, got {cfg.precision!r}")
    if cfg.pretraining:
        need(0.0 < cfg.ema < 1.0, f"--ema must be in (0, 1), got {cfg.ema}")
        need(0.0 <= cfg.mixup_ratio <= 1.0, f"--mixup-ratio must be in [0, 1], got {cfg.mixup_ratio}")
        need(cfg.mixup_memory >= 0, f"--mixup-memory must be >= 0, got {cfg.mixup_memory}")
        need(cfg.head_hidden >= 1 and cfg.head_out >= 1, "--head-hidden and --head-out must be >= 1")
        need(0.0 <= cfg.mask_ratio <= 1.0 and cfg.mask_span >= 1, "--mask-ratio must be in [0, 1] and --mask-span >= 1")
    else:
        need(0.0 < cfg.layer_decay <= 1.0, f"--layer-decay must be in (0, 1], got {cfg.layer_decay}")
        need(0.0 <= cfg.mixup_prob <= 1.0, f"--mixup-prob must be in [0, 1], got {cfg.mixup_prob}")
        if cfg.mixup_alpha is not None:
            need(cfg.mixup_alpha > 0, f"--mixup-alpha must be > 0, got {cfg.mixup_alpha}")
        need(cfg.loss in (None, *LOSSES), f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
        if cfg.command == "c2f":
            need(0.0 <= cfg.distill_weight <= 1.0, f"--distill-weight must be in [0, 1], got {cfg.distill_weight}")
    if cfg.clip_grad is not None:
        need(cfg.clip_grad > 0, f"--clip-grad must be > 0, got {cfg.clip_grad}")
    need(0.0 <= cfg.drop_path < 1.0, f"--drop-path must be in [0, 1), got {cfg.drop_path}")
    need(cfg.crop_seconds > 0 and cfg.positive_seconds > 0, "crop lengths must be positive seconds")
    need(cfg.num_workers >= 0, f"--num-workers must be >= 0, got {cfg.num_workers}")
    need(bool(cfg.label_sep), "--label-sep must not be empty")
    need(
        cfg.save_every >= 0 and cfg.log_every >= 1 and cfg.keep_checkpoints >= 1,
        "--save-every must be >= 0, --log-every >= 1, --keep-checkpoints >= 1",
    )
    need(min(cfg.embed_dim, cfg.depth, cfg.num_heads) >= 1, "--embed-dim, --depth and --num-heads must be >= 1")
    if cfg.num_heads >= 1:
        need(cfg.embed_dim % cfg.num_heads == 0, f"--embed-dim {cfg.embed_dim} is not divisible by --num-heads {cfg.num_heads}")
    return p


def _path_problems(cfg: TrainConfig) -> list[str]:
    p = []
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        p.append(f"--out {cfg.out!r} is a file; it must be a directory (it is created if missing)")
    elif not out.exists():
        parent = next((a for a in out.absolute().parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            p.append(f"--out {cfg.out!r} cannot be created: {str(parent)!r} is a file")
    if not Path(cfg.data).exists():
        p.append(f"--data {cfg.data!r} does not exist")
    for flag, value in (("--init", cfg.init), ("--teacher", cfg.teacher)):
        if value is not None and not Path(value).exists():
            p.append(f"{flag} {value!r} does not exist")
    return p


def check(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, saying what is accepted (all problems at once)."""
    problems = _float_problems(cfg)
    if not problems:
        problems = _range_problems(cfg)
    if cfg.family not in (None, "clip", "frame"):
        problems.append(f"--family must be clip or frame, got {cfg.family!r}")
    if cfg.command == "c2f" and cfg.teacher is None:
        problems.append("c2f needs --teacher (a fine-tuned checkpoint from `finetune`, or its export/ folder)")
    if cfg.command == "c2f" and cfg.init is None:
        problems.append("c2f fine-tunes a pretrained ATST-Frame: pass --init (a frame checkpoint or model directory)")
    if cfg.pretraining and not problems:  # the official patch and table sizes (what --init files have too)
        problems += crop_problems(cfg, ATSTConfig(family=cfg.family))
    problems += _path_problems(cfg)
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
