"""Official ATST checkpoints -> our config, encoder state dict and classification head.

Pure (dict in, dict out), strict and loud. ``convert(ckpt)`` takes an official checkpoint as
``torch.load`` returns it and

1. unpacks the container: a Lightning file (``state_dict`` + ``hyper_parameters``), the DINO-style
   ATST-Clip base file (``teacher`` + ``args``), the CRNN dicts of ATST-SED, or a bare state dict;
2. recognises the layout of the state dict from a marker key (``LAYOUTS``);
3. gives every key a role by the first rule of that layout whose prefix matches it: the encoder,
   the classification head, or a part that is deliberately not converted (student copies,
   projectors, predictors, distillation teachers, SED heads, front-end buffers). A key that no
   rule names is an error;
4. checks the encoder key by key and shape by shape against the config read off its shapes.

Our parameter names differ from the official ones in two places only:
``patch_embed.patch_embed.*`` -> ``patch_embed.*`` and ``norm_frame.*`` (ATST-Frame) -> ``norm.*``.
Classification heads keep the official ``LinearHead`` names (``norm.*`` BatchNorm statistics,
``linear.*``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .model import ATSTConfig, ATSTEncoder

ARCH_HEADS = {"small": 6, "base": 12}  # official factories: 384 / 6 heads, 768 / 12 heads
ARCH_ALIASES = {"ast": "small", "ast_small": "small", "ast_base": "base", "small": "small", "base": "base"}
WIDTH_HEADS = {384: 6, 768: 12}  # head dim 64, as in every released model
DEFAULT_TRAIN_LEN_S = 6.0  # ATST-Clip crop length when a file does not record one
FRAMES_PER_S = 100  # mel frames per second (hop 10 ms)
HEAD_LEVELS = ("clip", "frame")
TRAIN_FORMAT = "atst-features-train"  # the "format" entry of checkpoints written by atst_features.train
PROFILER_SUFFIXES = ("total_ops", "total_params")  # counters that thop adds to every module


class CheckpointError(ValueError):
    """A checkpoint that does not hold a complete, well-shaped ATST encoder in a known layout."""


# ---------------------------------------------------------------------------- layouts as data


@dataclass(frozen=True)
class Rule:
    """Keys under ``prefix`` play ``role``: "encoder", "head" or "skip" (recognised, not converted)."""

    prefix: str
    role: str
    what: str


@dataclass(frozen=True)
class Layout:
    """One official state-dict layout, recognised by ``marker`` (a key only this layout has).

    ``head_level`` is the level of the layout's classification head when the layout fixes it
    ("clip": one vector per clip, "frame": one per 40 ms token); ``None`` = read off the head.
    """

    name: str
    description: str
    marker: str
    rules: tuple[Rule, ...]
    head_level: str | None = None


def _skip(prefix: str, what: str) -> Rule:
    return Rule(prefix, "skip", what)


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "atst-sed",
        "ATST-SED (CRNN with an ATST-Frame branch, mean-teacher training)",
        "sed_teacher.atst_frame.atst.pos_embed",
        (
            Rule("sed_teacher.atst_frame.atst.", "encoder", "the SED teacher's ATST-Frame encoder"),
            _skip("sed_teacher.", "the SED teacher's CNN, RNN and classifiers (the SED head is not converted)"),
            _skip("sed_student.", "the SED student (the mean teacher is the evaluated model)"),
            _skip("mel_spec.", "front-end buffers of the CNN branch (recomputed, not weights)"),
        ),
    ),
    Layout(
        "c2f-as2m",
        "ATST-C2F distilled on AudioSet-2M (ATST-Frame student, fine-tuned ATST-Clip teacher)",
        "model.student.pos_embed",
        (
            Rule("model.student.", "encoder", "the ATST-Frame student: the C2F model"),
            Rule("model.linear.", "head", "the student's clip-level classifier"),
            _skip("model.teacher.encoder.", "the fine-tuned ATST-Clip teacher used for distillation"),
            _skip("model.teacher.head.", "the ATST-Clip teacher's classifier"),
        ),
        head_level="clip",
    ),
    Layout(
        "c2f-frame",
        "ATST-C2F at frame level (ATST-Frame student distilled from a frozen fine-tuned model)",
        "encoder.encoder.frame_encoder.pos_embed",
        (
            Rule("encoder.encoder.frame_encoder.", "encoder", "the ATST-Frame student"),
            _skip("encoder.encoder.teacher_module.", "the frozen fine-tuned teacher used for distillation"),
            Rule("head.", "head", "the frame-level classifier"),
        ),
        head_level="frame",
    ),
    Layout(
        "finetuned",
        "fine-tuned ATST-Frame or ATST-Clip (encoder with a classification head)",
        "encoder.encoder.pos_embed",
        (
            Rule("encoder.encoder.", "encoder", "the fine-tuned encoder"),
            Rule("head.", "head", "the classifier"),
        ),
    ),
    Layout(
        "lightning-pretrain",
        "self-supervised pretraining (Lightning): student and EMA teacher",
        "model.teacher.encoder.pos_embed",
        (
            Rule("model.teacher.encoder.", "encoder", "the EMA teacher encoder: the released model"),
            _skip("model.teacher.projector.", "the teacher projector (pretraining only)"),
            _skip("model.student.encoder.", "the student encoder (the EMA teacher is the released model)"),
            _skip("model.student.projector.", "the student projector (pretraining only)"),
            _skip("model.student.predictor.", "the student predictor (pretraining only)"),
        ),
    ),
    Layout(
        "dino",
        "self-supervised pretraining, DINO-style file (ATST-Clip base): teacher backbone and head",
        "backbone.pos_embed",
        (
            Rule("backbone.", "encoder", "the teacher backbone"),
            _skip("head.", "the teacher projector head (pretraining only)"),
        ),
    ),
    Layout(
        "encoder", "a bare encoder state dict (official key names)", "pos_embed", (Rule("", "encoder", "the encoder"),)
    ),
)


@dataclass
class Converted:
    """The result of ``convert``.

    Attributes:
        config: the encoder's ``ATSTConfig``.
        state_dict: the encoder in our parameter names, float32, owning its memory.
        head: the classification head (``linear.*`` [+ ``norm.*`` statistics]) or ``None``.
        head_level: "clip" or "frame" when there is a head.
        layout: name of the recognised layout (see ``LAYOUTS``).
        skipped: official keys deliberately not converted, grouped by the reason.
        unread_entries: the file's other top-level entries (optimizer state, counters, the
            DINO student, ATST-SED's copies of its CRNN state dicts, ...); they are not read.
    """

    config: ATSTConfig
    state_dict: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None
    head_level: str | None = None
    layout: str = "encoder"
    skipped: dict[str, list[str]] = field(default_factory=dict)
    unread_entries: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    multilabel: bool = True

    def summary(self) -> str:
        """A few lines saying what was converted and what was skipped, for logs and the CLI."""
        c = self.config
        lines = [
            f"layout: {self.layout}",
            f"encoder: ATST-{c.family.capitalize()}, embed_dim {c.embed_dim}, depth {c.depth}, "
            f"{c.num_heads} heads ({len(self.state_dict)} tensors)",
        ]
        if self.head is not None:
            w = self.head["linear.weight"]
            norm = ", with BatchNorm statistics" if "norm.running_mean" in self.head else ""
            lines.append(f"head: {self.head_level}-level, {w.shape[1]} -> {w.shape[0]} classes{norm}")
        for what, keys in self.skipped.items():
            lines.append(f"skipped {len(keys)} keys: {what}")
        if self.unread_entries:
            lines.append(f"other entries of the file, not read: {', '.join(self.unread_entries)}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- encoder checks


def infer_family(encoder_sd: Mapping[str, torch.Tensor]) -> str:
    """ "clip" if the official encoder dict has a [CLS] token, "frame" if it has ``norm_frame``."""
    if "cls_token" in encoder_sd:
        return "clip"
    if "norm_frame.weight" in encoder_sd:
        return "frame"
    raise CheckpointError(
        "cannot tell the model family: no 'cls_token' (ATST-Clip) and no 'norm_frame.weight' (ATST-Frame)"
    )


def infer_num_heads(embed_dim: int, arch: str | None = None) -> int:
    """Heads from the official ``arch`` name ("small"/"ast" -> 6, "base"/"ast_base" -> 12) or else the width."""
    key = ARCH_ALIASES.get(str(arch).lower()) if arch is not None else None
    if key is not None:
        return ARCH_HEADS[key]
    if embed_dim in WIDTH_HEADS:
        return WIDTH_HEADS[embed_dim]
    raise CheckpointError(
        f"cannot infer the number of attention heads for embed_dim {embed_dim} (arch {arch!r}); pass num_heads= "
        "(convert_checkpoint, or `atst-features convert --num-heads`)"
    )


def config_from_official(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None = None,
    num_heads: int | None = None,
    arch: str | None = None,
    where: str = "",
) -> ATSTConfig:
    """Read an ``ATSTConfig`` off the shapes of an official encoder state dict (official key names).

    ``where`` is the prefix the keys had in the file; it only makes error messages name the real key.
    """
    family = family or infer_family(encoder_sd)
    for key in ("pos_embed", "patch_embed.patch_embed.weight", "blocks.0.mlp.fc1.weight"):
        if key not in encoder_sd:
            raise CheckpointError(f"the encoder has no {where + key!r}")
    pos = encoder_sd["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise CheckpointError(
            f"key {where + 'pos_embed'!r} has shape {tuple(pos.shape)}, expected (1, tokens + 1, embed_dim)"
        )
    embed_dim = pos.shape[-1]
    depth = len({k.split(".")[1] for k in encoder_sd if k.startswith("blocks.")})
    patch_in = encoder_sd["patch_embed.patch_embed.weight"].shape[-1]
    n_mels = 64
    if patch_in % n_mels:
        raise CheckpointError(
            f"key {where + 'patch_embed.patch_embed.weight'!r} takes {patch_in} inputs, not a multiple of {n_mels} mel bins"
        )
    patch_w = patch_in // n_mels
    heads = num_heads or infer_num_heads(embed_dim, arch)
    if embed_dim % heads:
        raise CheckpointError(f"embed_dim {embed_dim} is not divisible by num_heads={heads}")
    return ATSTConfig(
        family=family,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=encoder_sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in encoder_sd,
        n_mels=n_mels,
        patch_h=n_mels,
        patch_w=patch_w,
        spec_w=(pos.shape[1] - 1) * patch_w + 1,
    )


def _encoder_shapes(cfg: ATSTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of our encoder state dict for this config (``ATSTEncoder``'s own), with its shape."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        encoder = ATSTEncoder(cfg)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def _official_name(key: str, cfg: ATSTConfig) -> str:
    """Our parameter name -> the official one (the inverse of ``_rename``)."""
    if key.startswith("patch_embed."):
        return "patch_embed." + key
    if key.startswith("norm.") and not cfg.has_cls:
        return "norm_frame." + key[len("norm.") :]
    return key


def expected_shapes(cfg: ATSTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official encoder state dict of this config, with its shape (from ``ATSTEncoder``)."""
    return {_official_name(k, cfg): shape for k, shape in _encoder_shapes(cfg).items()}


def _rename(key: str) -> str:
    if key.startswith("patch_embed.patch_embed."):
        return "patch_embed." + key[len("patch_embed.patch_embed.") :]
    if key.startswith("norm_frame."):
        return "norm." + key[len("norm_frame.") :]
    return key


def _owned_float32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy that owns its memory (the source may be memory-mapped from a file)."""
    return t.detach().to(torch.float32, copy=True).contiguous()


def convert_encoder(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None = None,
    num_heads: int | None = None,
    arch: str | None = None,
    where: str = "",
) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """An official encoder state dict (no prefix) -> (config, our state dict), checking every key.

    ``prompt_embed`` (never used by the releases, nprompt = 0) is accepted and dropped when empty.
    ``where`` is the prefix the keys had in the file, so errors name the key as it is stored.
    """
    sd = {k: v for k, v in encoder_sd.items() if not (k == "prompt_embed" and v.numel() == 0)}
    cfg = config_from_official(sd, family, num_heads, arch, where)
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"the ATST-{cfg.family.capitalize()} encoder does not match: missing keys {[where + k for k in missing[:8]]}, "
            f"unexpected keys {[where + k for k in unexpected[:8]]}"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"key {where + k!r} has shape {tuple(sd[k].shape)}, expected {shape}")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"key {where + k!r} has dtype {sd[k].dtype}, expected a floating-point tensor")
    return cfg, {_rename(k): _owned_float32(v) for k, v in sd.items()}


# ---------------------------------------------------------------------------- containers


@dataclass
class _Unpacked:
    state_dict: dict[str, Any]
    arch: str | None = None
    train_len_s: float | None = None  # ATST-Clip crop length recorded in the file, if any
    unread: list[str] = field(default_factory=list)


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return dict(obj) if isinstance(obj, Mapping) else {}


def _first_number(value: Any) -> float | None:
    """A float from a number or the first item of a list of numbers (``anchor_len`` may be either)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _unpack(ckpt: Mapping[str, Any]) -> _Unpacked:
    """Find the model state dict inside an official file and the few hyperparameters we read."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got a {type(ckpt).__name__}")
    if isinstance(ckpt.get("state_dict"), Mapping):  # Lightning
        hp = _as_dict(ckpt.get("hyper_parameters"))
        unread = sorted(str(k) for k in ckpt if k not in ("state_dict", "hyper_parameters"))
        return _Unpacked(dict(ckpt["state_dict"]), hp.get("arch"), _first_number(hp.get("train_len")), unread)
    if isinstance(ckpt.get("teacher"), Mapping):  # DINO-style: teacher / student / optimizer / args
        args = _as_dict(ckpt.get("args"))
        # A DistributedDataParallel wrapper adds "module." in front of every key.
        sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in ckpt["teacher"].items()}
        unread = sorted(str(k) for k in ckpt if k not in ("teacher", "args"))
        return _Unpacked(sd, args.get("arch"), _first_number(args.get("anchor_len")), unread)
    if isinstance(ckpt.get("sed_teacher"), Mapping):  # ATST-SED CRNN dicts without a Lightning state_dict
        unread = sorted(str(k) for k in ckpt if k != "sed_teacher")
        return _Unpacked({"sed_teacher." + k: v for k, v in ckpt["sed_teacher"].items()}, unread=unread)
    not_tensors = sorted(str(k) for k, v in ckpt.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"not a known ATST checkpoint container: no 'state_dict', 'teacher' or 'sed_teacher' entry, and "
            f"{not_tensors[:8]} are not tensors"
        )
    return _Unpacked(dict(ckpt))


def detect_layout(sd: Mapping[str, Any]) -> Layout:
    """The layout whose marker key is in ``sd`` (the most specific first)."""
    for layout in LAYOUTS:
        if layout.marker in sd:
            return layout
    sample = sorted(sd)[:6]
    raise CheckpointError(
        f"no ATST encoder found: none of the known layouts matches (keys begin {sample}); known layouts: "
        + "; ".join(f"{lay.name} ({lay.marker!r})" for lay in LAYOUTS)
    )


def _assign(sd: Mapping[str, Any], layout: Layout) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Give every key a role by the layout's first matching rule; unknown keys are an error."""
    parts: dict[str, dict[str, Any]] = {"encoder": {}, "head": {}}
    skipped: dict[str, list[str]] = {}
    unknown = []
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in PROFILER_SUFFIXES:
            skipped.setdefault("profiling counters (thop total_ops / total_params)", []).append(key)
            continue
        rule = next((r for r in layout.rules if key.startswith(r.prefix)), None)
        if rule is None:
            unknown.append(key)
        elif rule.role == "skip":
            skipped.setdefault(rule.what, []).append(key)
        else:
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"key {key!r} holds a {type(value).__name__}, not a tensor")
            parts[rule.role][key[len(rule.prefix) :]] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys are not part of the {layout.name} layout ({layout.description}): {sorted(unknown)[:8]}; "
            "known parts: " + ", ".join(f"{r.prefix or '(no prefix)'}* = {r.what}" for r in layout.rules)
        )
    return parts, skipped


# ---------------------------------------------------------------------------- heads and family changes


def _clip_as_frame(enc: dict[str, Any], skipped: dict[str, list[str]], where: str) -> dict[str, Any]:
    """ATST-Clip weights run as ATST-Frame: drop the [CLS] token, final ``norm`` -> ``norm_frame``.

    Patch k uses positional row k + 1 in both families, so the patch path is unchanged.
    """
    skipped.setdefault("the [CLS] token (unused when ATST-Clip weights run as ATST-Frame)", []).append(
        where + "cls_token"
    )
    out = {k: v for k, v in enc.items() if k != "cls_token"}
    for p in ("weight", "bias"):
        if f"norm.{p}" in out:
            out[f"norm_frame.{p}"] = out.pop(f"norm.{p}")
    return out


def convert_head(
    head_sd: Mapping[str, torch.Tensor], cfg: ATSTConfig, level: str | None, where: str = ""
) -> tuple[dict[str, torch.Tensor], str]:
    """An official ``LinearHead`` state dict -> (our head state dict, level), checking keys and shapes.

    The head is ``BatchNorm1d(affine=False)`` (statistics only, optional) -> ``Linear(in, classes)``.
    Its input is the last block's output: one ``D`` vector per token for a frame-level head; for a
    clip-level head the pooled last block (``D`` for ATST-Frame, ``[cls, avg]`` = ``2 D`` for ATST-Clip).
    When ``level`` is ``None`` a head with BatchNorm statistics is taken as clip-level (fine-tuning
    on clips) and one without as frame-level (the AudioSet-strong head).
    """
    allowed = {"linear.weight", "linear.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    unexpected = sorted(set(head_sd) - allowed)
    if unexpected:
        raise CheckpointError(f"the classification head has unexpected keys {[where + k for k in unexpected[:8]]}")
    for k in ("linear.weight", "linear.bias"):
        if k not in head_sd:
            raise CheckpointError(f"the classification head has no {where + k!r}")
    has_norm = "norm.running_mean" in head_sd
    if has_norm and "norm.running_var" not in head_sd:
        raise CheckpointError(f"the classification head has no {where + 'norm.running_var'!r}")
    level = level or ("clip" if has_norm else "frame")
    if level not in HEAD_LEVELS:
        raise CheckpointError(f"head level must be one of {HEAD_LEVELS}, got {level!r}")
    weight = head_sd["linear.weight"]
    if weight.ndim != 2:
        raise CheckpointError(
            f"key {where + 'linear.weight'!r} has shape {tuple(weight.shape)}, expected (classes, inputs)"
        )
    in_dim = 2 * cfg.embed_dim if (level == "clip" and cfg.has_cls) else cfg.embed_dim
    n_classes = weight.shape[0]
    shapes = {"linear.weight": (n_classes, in_dim), "linear.bias": (n_classes,)}
    if has_norm:
        shapes.update({"norm.running_mean": (in_dim,), "norm.running_var": (in_dim,)})
    for k, shape in shapes.items():
        if tuple(head_sd[k].shape) != shape:
            raise CheckpointError(
                f"key {where + k!r} has shape {tuple(head_sd[k].shape)}, expected {shape} for a {level}-level head "
                f"on ATST-{cfg.family.capitalize()} (embed_dim {cfg.embed_dim})"
            )
    out = {k: _owned_float32(head_sd[k]) for k in shapes}
    if has_norm:
        tracked = head_sd.get("norm.num_batches_tracked")
        out["norm.num_batches_tracked"] = tracked.detach().clone().long() if tracked is not None else torch.tensor(0)
    return out, level


def _clip_chunk_frames(train_len_s: float | None, spec_w: int) -> int:
    """ATST-Clip's pooling chunk: ``int(train_len * 100 + 1)`` frames (601 for the default 6 s,
    used when the file records no crop length).

    Raises:
        CheckpointError: the recorded crop length gives no chunk in 1..``spec_w`` frames.
    """
    train_len = DEFAULT_TRAIN_LEN_S if train_len_s is None else train_len_s
    frames = int(train_len * FRAMES_PER_S + 1) if math.isfinite(train_len) else 0
    if not 0 < frames <= spec_w:
        raise CheckpointError(
            f"the file records a crop length (train_len / anchor_len) of {train_len_s!r} s, which gives a pooling "
            f"chunk of {frames} mel frames; accepted are 0 to {(spec_w - 1) / FRAMES_PER_S:g} s (1 to {spec_w} frames)"
        )
    return frames


# ---------------------------------------------------------------------------- entry point


def convert(
    ckpt: Mapping[str, Any],
    family: str | None = None,
    num_heads: int | None = None,
    head_level: str | None = None,
) -> Converted:
    """An official checkpoint (as ``torch.load`` returns it) -> ``Converted``.

    Args:
        ckpt: the loaded file: Lightning, DINO-style, ATST-SED or a bare state dict (see ``LAYOUTS``).
        family: "clip" or "frame"; read off the keys when omitted. "frame" on ATST-Clip weights runs
            them as ATST-Frame (the [CLS] token is dropped), as ATST-SED does.
        num_heads: attention heads; from the file's ``arch`` or else the width when omitted.
        head_level: "clip" or "frame" for a classification head; from the layout or the head.

    Raises:
        CheckpointError: naming the key, when a key is missing, mis-shaped, or not part of the layout.
    """
    if family not in (None, "clip", "frame"):
        raise CheckpointError(f"family must be 'clip', 'frame' or None, got {family!r}")
    if isinstance(ckpt, Mapping) and ckpt.get("format") == TRAIN_FORMAT:
        return _convert_training(ckpt)
    unpacked = _unpack(ckpt)
    layout = detect_layout(unpacked.state_dict)
    parts, skipped = _assign(unpacked.state_dict, layout)
    where = next(r.prefix for r in layout.rules if r.role == "encoder")
    enc = parts["encoder"]
    if family == "frame" and "cls_token" in enc:
        enc = _clip_as_frame(enc, skipped, where)
    elif family == "clip" and "cls_token" not in enc:
        raise CheckpointError(
            f"family='clip' was asked for, but the encoder has no {where + 'cls_token'!r} (it is ATST-Frame)"
        )
    cfg, state_dict = convert_encoder(enc, family=family, num_heads=num_heads, arch=unpacked.arch, where=where)
    if cfg.has_cls:
        cfg = replace(cfg, clip_chunk_frames=_clip_chunk_frames(unpacked.train_len_s, cfg.spec_w))
    head = level = None
    if parts["head"]:
        head_where = next(r.prefix for r in layout.rules if r.role == "head")
        head, level = convert_head(parts["head"], cfg, head_level or layout.head_level, head_where)
    elif head_level is not None:
        raise CheckpointError(
            f"head_level={head_level!r} was given, but the {layout.name} file has no classification head"
        )
    return Converted(cfg, state_dict, head, level, layout.name, skipped, unpacked.unread)


def _convert_training(ckpt: Mapping[str, Any]) -> Converted:
    """A checkpoint of ``atst_features.train``: the inference encoder is stored in our names already."""
    for key in ("encoder_config", "encoder_state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"the {TRAIN_FORMAT} checkpoint has no {key!r}")
    cfg = replace(ATSTConfig.from_dict(dict(ckpt["encoder_config"])), drop_path_rate=0.0)
    expected = _encoder_shapes(cfg)
    state_dict = dict(ckpt["encoder_state_dict"])
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"encoder_state_dict does not match its config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != shape:
            raise CheckpointError(f"key 'encoder_state_dict.{k}' has shape {tuple(state_dict[k].shape)}, expected {shape}")
    head = level = labels = None
    multilabel = True
    if ckpt.get("head_state_dict") is not None:
        head, level = convert_head(ckpt["head_state_dict"], cfg, "clip", "head_state_dict.")
        meta = _as_dict(ckpt.get("head"))
        labels, multilabel = meta.get("classes"), bool(meta.get("multilabel", True))
    unread = sorted(str(k) for k in ckpt if k not in ("encoder_config", "encoder_state_dict", "head_state_dict", "head"))
    return Converted(
        cfg, {k: _owned_float32(v) for k, v in state_dict.items()}, head, level, TRAIN_FORMAT, {}, unread, labels, multilabel
    )
