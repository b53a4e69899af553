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
4. checks the encoder key by key and shape by shape against the config read off its shapes, and
   every tensor's storage (no stride-0 or overlapping views, no storage smaller than the tensor)
   and values (finite), all before anything is copied.

The depth is the official 12 unless the caller passes another ``depth=`` (block indices must be
0..depth-1 without a gap, and a teacher's twin student must have as many); a recorded ``arch``
must agree with the width; layouts trained on clamped mels (ATST-SED, PretrainedSED) set
``ATSTConfig.db_clamp``.

Our parameter names differ from the official ones in two places only:
``patch_embed.patch_embed.*`` -> ``patch_embed.*`` and ``norm_frame.*`` (ATST-Frame) -> ``norm.*``.
Classification heads keep the official ``LinearHead`` names (``norm.*`` BatchNorm statistics,
``linear.*``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import labelsets
from .errors import CheckpointError  # raised here; callers know it as convert.CheckpointError
from .layouts import LAYOUTS, Converted, HeadWeights, Layout  # convert.LAYOUTS and convert.Converted are public here too
from .model import ATSTConfig, ATSTEncoder

ARCH_HEADS = {"small": 6, "base": 12}  # official factories: 384 / 6 heads, 768 / 12 heads
ARCH_WIDTH = {"small": 384, "base": 768}
ARCH_ALIASES = {"ast": "small", "ast_small": "small", "ast_base": "base", "small": "small", "base": "base"}
WIDTH_HEADS = {384: 6, 768: 12}  # head dim 64, as in every released model
OFFICIAL_DEPTH = 12  # blocks of every released ATST encoder
DEFAULT_TRAIN_LEN_S = 6.0  # ATST-Clip crop length when a file does not record one
MIN_TRAIN_LEN_S = 1.0  # shorter recorded crops are not an ATST-Clip setting (the official ones: 6 and 9 s)
FRAMES_PER_S = 100  # mel frames per second (hop 10 ms)
HEAD_LEVELS = ("clip", "frame")
MAX_CLASSES = 100_000  # classes of a classification head
TRAIN_FORMAT = "atst-features-train"  # the "format" entry of checkpoints written by atst_features.train
PROFILER_SUFFIXES = ("total_ops", "total_params")  # counters that thop adds to every module


# ---------------------------------------------------------------------------- tensor checks


def _check_tensor(key: str, t: Any, floating: bool = True) -> torch.Tensor:
    """``t`` must be a tensor whose values lie in its own storage, each element once, and are finite.

    A view with a zero or overlapping stride, or a size larger than its storage, would be
    materialised far beyond the file's size when copied: it is refused before anything is copied.
    Meta tensors (shapes only) pass the value checks.
    """
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"key {key!r} holds a {type(t).__name__}, not a tensor")
    if floating and not t.is_floating_point():
        raise CheckpointError(f"key {key!r} has dtype {t.dtype}, expected a floating-point tensor")
    if t.numel() == 0 or t.device.type == "meta":
        return t
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    reach = 0  # the furthest element (from the first) that the smaller strides reach
    for stride, n in dims:
        if stride <= reach:
            kind = "a zero stride" if stride == 0 else "overlapping strides"
            raise CheckpointError(
                f"key {key!r} is a view with {kind} (shape {tuple(t.shape)}, strides {t.stride()}): it repeats its "
                "values instead of storing them; only plain tensors are read from checkpoint files"
            )
        reach += stride * (n - 1)
    stored = t.untyped_storage().nbytes() // t.element_size()
    if t.storage_offset() + reach >= stored:
        raise CheckpointError(
            f"key {key!r} (shape {tuple(t.shape)}) reaches past its storage of {stored} elements: the file is damaged"
        )
    if floating and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"key {key!r} holds NaN or infinite values: the weights are damaged")
    return t


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


def _arch(arch: Any) -> str | None:
    """The official size ("small" / "base") an ``arch`` hyperparameter names, or ``None``."""
    return ARCH_ALIASES.get(arch.lower()) if isinstance(arch, str) else None


def infer_num_heads(embed_dim: int, arch: str | None = None) -> int:
    """Heads from the official ``arch`` name ("small"/"ast" -> 6, "base"/"ast_base" -> 12) or else the width.

    Raises:
        CheckpointError: the arch names a size of another width (a file that records ``arch: base``
            holds a 768-wide encoder), or neither gives the heads.
    """
    key = _arch(arch)
    if key is not None:
        if embed_dim != ARCH_WIDTH[key]:
            raise CheckpointError(
                f"the file records arch {arch!r} (ATST {key}, {ARCH_WIDTH[key]} wide), but its encoder is {embed_dim} "
                "wide: the file is not what it says"
            )
        return ARCH_HEADS[key]
    if embed_dim in WIDTH_HEADS:
        return WIDTH_HEADS[embed_dim]
    raise CheckpointError(
        f"cannot infer the number of attention heads for embed_dim {embed_dim} (arch {arch!r}); pass num_heads= "
        "(convert_checkpoint, or `atst-features convert --num-heads`)"
    )


def block_indices(keys: Iterable[str], where: str = "") -> list[int]:
    """The sorted block indices ``N`` of the ``blocks.N.*`` keys (keys without a prefix).

    Raises:
        CheckpointError: an index that is not a number, or a gap (``blocks.0..k`` must all be there).
    """
    found = set()
    for k in keys:
        if k.startswith("blocks."):
            index = k.split(".")[1]
            if not (index.isascii() and index.isdigit()) or (len(index) > 1 and index[0] == "0"):
                raise CheckpointError(f"key {where + k!r} does not name a block by its index")
            found.add(int(index))
    indices = sorted(found)
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(max(indices) + 1)) - found)
        raise CheckpointError(
            f"the encoder's blocks are not numbered 0..{len(indices) - 1}: {where}blocks.{gaps[0]}.* is missing "
            f"(found {len(indices)} blocks, the highest {where}blocks.{max(indices)}.*): the file is damaged"
        )
    return indices


def _check_depth(n_blocks: int, depth: int | None, where: str) -> int:
    expected = OFFICIAL_DEPTH if depth is None else depth
    if n_blocks != expected:
        if depth is None:
            raise CheckpointError(
                f"the encoder has {n_blocks} blocks ({where}blocks.0..{n_blocks - 1}), but every released ATST model "
                f"has {OFFICIAL_DEPTH}: the file is truncated or not an official ATST checkpoint. If this depth is "
                f"intended, pass depth={n_blocks} (`atst-features convert --depth {n_blocks}`)"
            )
        raise CheckpointError(f"the encoder has {n_blocks} blocks, but depth={depth} was asked for")
    return n_blocks


def config_from_official(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None = None,
    num_heads: int | None = None,
    arch: str | None = None,
    where: str = "",
    depth: int | None = None,
) -> ATSTConfig:
    """Read an ``ATSTConfig`` off the shapes of an official encoder state dict (official key names).

    ``depth``: the number of blocks the file must have (default: the official 12); ``where`` is
    the prefix the keys had in the file; it only makes error messages name the real key.
    """
    family = family or infer_family(encoder_sd)
    for key in ("pos_embed", "patch_embed.patch_embed.weight", "blocks.0.mlp.fc1.weight"):
        if key not in encoder_sd:
            raise CheckpointError(f"the encoder has no {where + key!r}")
    pos = _check_tensor(where + "pos_embed", encoder_sd["pos_embed"], floating=False)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] < 2:
        raise CheckpointError(
            f"key {where + 'pos_embed'!r} has shape {tuple(pos.shape)}, expected (1, tokens + 1, embed_dim)"
        )
    embed_dim = pos.shape[-1]
    n_blocks = _check_depth(len(block_indices(encoder_sd, where)), depth, where)
    patch = _check_tensor(where + "patch_embed.patch_embed.weight", encoder_sd["patch_embed.patch_embed.weight"], False)
    fc1 = _check_tensor(where + "blocks.0.mlp.fc1.weight", encoder_sd["blocks.0.mlp.fc1.weight"], False)
    n_mels = 64
    if patch.ndim != 2 or patch.shape[-1] % n_mels:
        raise CheckpointError(
            f"key {where + 'patch_embed.patch_embed.weight'!r} has shape {tuple(patch.shape)}: expected "
            f"(embed_dim, 64 mel bins x frames)"
        )
    if fc1.ndim != 2:
        raise CheckpointError(f"key {where + 'blocks.0.mlp.fc1.weight'!r} has shape {tuple(fc1.shape)}, expected (hidden, embed_dim)")
    patch_w = patch.shape[-1] // n_mels
    heads = num_heads or infer_num_heads(embed_dim, arch)
    if num_heads is not None and _arch(arch) is not None:
        infer_num_heads(embed_dim, arch)  # the recorded arch must still agree with the width
    try:
        return ATSTConfig(
            family=family,
            embed_dim=embed_dim,
            depth=n_blocks,
            num_heads=heads,
            mlp_ratio=fc1.shape[0] / embed_dim,
            qkv_bias="blocks.0.attn.qkv.bias" in encoder_sd,
            n_mels=n_mels,
            patch_h=n_mels,
            patch_w=patch_w,
            spec_w=(pos.shape[1] - 1) * patch_w + 1,
        )
    except ValueError as e:
        raise CheckpointError(f"the encoder read off the file's shapes is not a usable ATST encoder: {e}") from None


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


def check_state_dict(
    sd: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str, where: str = ""
) -> None:
    """``sd`` has exactly the keys of ``expected``, each a plain, finite float tensor of that shape.

    Raises:
        CheckpointError: naming the first missing, unexpected, mis-shaped or damaged key.
    """
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not match: missing keys {[where + k for k in missing[:8]]}, "
            f"unexpected keys {[where + k for k in unexpected[:8]]}"
        )
    for k, shape in expected.items():  # every shape first: nothing is read before all of them agree
        if not isinstance(sd[k], torch.Tensor) or tuple(sd[k].shape) != shape:
            got = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
            raise CheckpointError(f"key {where + k!r} has shape {got}, expected {shape}")
    for k in expected:
        _check_tensor(where + k, sd[k])


def _checked_encoder(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None,
    num_heads: int | None,
    arch: str | None,
    where: str,
    depth: int | None,
) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """``convert_encoder`` without the copy: the config and the checked official dict."""
    sd = {k: v for k, v in encoder_sd.items() if not (k == "prompt_embed" and isinstance(v, torch.Tensor) and v.numel() == 0)}
    cfg = config_from_official(sd, family, num_heads, arch, where, depth)
    check_state_dict(sd, expected_shapes(cfg), f"the ATST-{cfg.family.capitalize()} encoder", where)
    return cfg, sd


def convert_encoder(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None = None,
    num_heads: int | None = None,
    arch: str | None = None,
    where: str = "",
    depth: int | None = None,
) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """An official encoder state dict (no prefix) -> (config, our state dict), checking every key.

    ``prompt_embed`` (never used by the releases, nprompt = 0) is accepted and dropped when empty.
    ``depth``: the blocks the encoder must have (default: the official 12). ``where`` is the
    prefix the keys had in the file, so errors name the key as it is stored.
    """
    cfg, sd = _checked_encoder(encoder_sd, family, num_heads, arch, where, depth)
    return cfg, {_rename(k): _owned_float32(v) for k, v in sd.items()}


# ---------------------------------------------------------------------------- containers


@dataclass
class _Unpacked:
    state_dict: dict[str, Any]
    arch: str | None = None
    train_len_s: float | None = None  # ATST-Clip crop length recorded in the file, if any
    unread: list[str] = field(default_factory=list)
    twin: Mapping[str, Any] | None = None  # a second copy of the encoder kept outside the state dict (DINO student)


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return dict(obj) if isinstance(obj, Mapping) else {}


def _first_number(value: Any) -> float | None:
    """A float from a number or the first item of a list of numbers (``anchor_len`` may be either)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if isinstance(value, bool):
        return math.nan  # not a length: refused by the range check
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None if value is None else math.nan


def _strip_module(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the ``module.`` a DistributedDataParallel wrapper adds."""
    return {(k[len("module.") :] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}


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
        unread = sorted(str(k) for k in ckpt if k not in ("teacher", "args"))
        student = ckpt.get("student")
        twin = _strip_module(student) if isinstance(student, Mapping) else None
        return _Unpacked(_strip_module(ckpt["teacher"]), args.get("arch"), _first_number(args.get("anchor_len")), unread, twin)
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
    sample = sorted(str(k) for k in sd)[:6]
    raise CheckpointError(
        f"no ATST encoder found: none of the known layouts matches (keys begin {sample}); known layouts: "
        + "; ".join(f"{lay.name} ({lay.marker!r})" for lay in LAYOUTS)
    )


def _assign(sd: Mapping[str, Any], layout: Layout) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Give every key a role by the layout's first matching rule; unknown keys are an error."""
    parts: dict[str, dict[str, Any]] = {"encoder": {}, "head": {}, "weak_head": {}}
    skipped: dict[str, list[str]] = {}
    unknown = []
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"the state dict has a key that is not a string: {key!r}")
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
            parts[rule.role][rule.into + key[len(rule.prefix) :]] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys are not part of the {layout.name} layout ({layout.description}): {sorted(unknown)[:8]}; "
            "known parts: " + ", ".join(f"{r.prefix or '(no prefix)'}* = {r.what}" for r in layout.rules)
        )
    return parts, skipped


def _check_twin(keys: Iterable[str], n_blocks: int, what: str) -> None:
    """The skipped twin of the encoder (the student of a teacher) has as many blocks, if it is there."""
    twin = block_indices(keys, what)
    if twin and len(twin) != n_blocks:
        raise CheckpointError(
            f"the encoder has {n_blocks} blocks but its twin {what}* has {len(twin)}: teacher and student of one "
            "training run have the same depth, so the file is damaged or not an official checkpoint"
        )


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


def _checked_head(
    head_sd: Mapping[str, Any], cfg: ATSTConfig, level: str | None, where: str = ""
) -> tuple[dict[str, Any], str]:
    """``convert_head`` without the copy: the checked keys to keep and the level."""
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
    weight = _check_tensor(where + "linear.weight", head_sd["linear.weight"], floating=False)
    if weight.ndim != 2 or not 1 <= weight.shape[0] <= MAX_CLASSES:
        raise CheckpointError(
            f"key {where + 'linear.weight'!r} has shape {tuple(weight.shape)}, expected (classes, inputs) with "
            f"1..{MAX_CLASSES} classes"
        )
    in_dim = 2 * cfg.embed_dim if (level == "clip" and cfg.has_cls) else cfg.embed_dim
    n_classes = weight.shape[0]
    shapes = {"linear.weight": (n_classes, in_dim), "linear.bias": (n_classes,)}
    if has_norm:
        shapes.update({"norm.running_mean": (in_dim,), "norm.running_var": (in_dim,)})
    for k, shape in shapes.items():
        if not isinstance(head_sd[k], torch.Tensor) or tuple(head_sd[k].shape) != shape:
            got = tuple(head_sd[k].shape) if isinstance(head_sd[k], torch.Tensor) else type(head_sd[k]).__name__
            raise CheckpointError(
                f"key {where + k!r} has shape {got}, expected {shape} for a {level}-level head "
                f"on ATST-{cfg.family.capitalize()} (embed_dim {cfg.embed_dim})"
            )
    for k in shapes:
        _check_tensor(where + k, head_sd[k])
    kept = {k: head_sd[k] for k in shapes}
    if has_norm and head_sd.get("norm.num_batches_tracked") is not None:
        tracked = _check_tensor(where + "norm.num_batches_tracked", head_sd["norm.num_batches_tracked"], floating=False)
        if tracked.numel() != 1:
            raise CheckpointError(f"key {where + 'norm.num_batches_tracked'!r} has shape {tuple(tracked.shape)}, expected ()")
        kept["norm.num_batches_tracked"] = tracked
    return kept, level


def _copy_head(checked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: _owned_float32(v) for k, v in checked.items() if k != "norm.num_batches_tracked"}
    if "norm.running_mean" in checked:
        tracked = checked.get("norm.num_batches_tracked")
        out["norm.num_batches_tracked"] = tracked.detach().clone().long().reshape(()) if tracked is not None else torch.tensor(0)
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
    checked, level = _checked_head(head_sd, cfg, level, where)
    return _copy_head(checked), level


def _clip_chunk_frames(train_len_s: float | None, spec_w: int) -> int:
    """ATST-Clip's pooling chunk: ``int(train_len * 100 + 1)`` frames (601 for the default 6 s,
    used when the file records no crop length).

    Raises:
        CheckpointError: the recorded crop length is not a number of seconds from ``MIN_TRAIN_LEN_S``
            up to the longest chunk (``spec_w`` frames).
    """
    train_len = DEFAULT_TRAIN_LEN_S if train_len_s is None else train_len_s
    longest = (spec_w - 1) / FRAMES_PER_S
    if not (math.isfinite(train_len) and MIN_TRAIN_LEN_S <= train_len <= longest):
        raise CheckpointError(
            f"the file records a crop length (train_len / anchor_len) of {train_len_s!r} s; accepted are "
            f"{MIN_TRAIN_LEN_S:g} to {longest:g} s (the official files: 6 or 9 s)"
        )
    return int(train_len * FRAMES_PER_S + 1)


# ---------------------------------------------------------------------------- entry point


def convert(
    ckpt: Mapping[str, Any],
    family: str | None = None,
    num_heads: int | None = None,
    head_level: str | None = None,
    *,
    depth: int | None = None,
    use_head: str | None = None,
) -> Converted:
    """An official checkpoint (as ``torch.load`` returns it) -> ``Converted``.

    Args:
        ckpt: the loaded file: Lightning, DINO-style, ATST-SED, PretrainedSED or a bare state dict
            (see ``LAYOUTS``), or a checkpoint of ``atst_features.train``.
        family: "clip" or "frame"; read off the keys when omitted. "frame" on ATST-Clip weights runs
            them as ATST-Frame (the [CLS] token is dropped), as ATST-SED does: only on this request.
        num_heads: attention heads; from the file's ``arch`` or else the width when omitted.
        head_level: "clip" or "frame" for a classification head; from the layout or the head.
        depth: the blocks the encoder must have; default the official 12 (a training checkpoint
            records its own).
        use_head: which of the file's heads to keep as ``head`` (PretrainedSED: "strong", the
            default, or "weak"); the others are in ``extra_heads``.

    Raises:
        CheckpointError: naming the key, when a key is missing, mis-shaped, damaged or not part of the
            layout, or the file's depth, arch or crop length is not an ATST one.
    """
    if family not in (None, "clip", "frame"):
        raise CheckpointError(f"family must be 'clip', 'frame' or None, got {family!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise CheckpointError(f"depth must be a positive integer or None, got {depth!r}")
    if isinstance(ckpt, Mapping) and ckpt.get("format") == TRAIN_FORMAT:
        if use_head is not None:
            raise CheckpointError(f"use_head={use_head!r}: a checkpoint of atst_features.train has one head at most")
        return _convert_training(ckpt, depth)
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
    cfg, enc = _checked_encoder(enc, family, num_heads, unpacked.arch, where, depth)
    if layout.twin is not None:
        _check_twin([k[len(layout.twin) :] for k in unpacked.state_dict if k.startswith(layout.twin)], cfg.depth, layout.twin)
    if unpacked.twin is not None:  # the DINO student, outside the state dict
        _check_twin([k[len("backbone.") :] for k in unpacked.twin if str(k).startswith("backbone.")], cfg.depth, "student.backbone.")
    if cfg.has_cls:
        cfg = replace(cfg, clip_chunk_frames=_clip_chunk_frames(unpacked.train_len_s, cfg.spec_w))
    if layout.db_clamp is not None:
        cfg = replace(cfg, db_clamp=layout.db_clamp)
    heads = _converted_heads(parts, layout, cfg, head_level, use_head)
    main = next(iter(heads.values()), None) if use_head is None else heads[use_head]
    if head_level is not None and main is None:
        raise CheckpointError(
            f"head_level={head_level!r} was given, but the {layout.name} file has no classification head"
        )
    extra = {name: h for name, h in heads.items() if h is not main}
    head, level, labels = main if main is not None else (None, None, None)
    state_dict = {_rename(k): _owned_float32(v) for k, v in enc.items()}
    return Converted(cfg, state_dict, head, level, layout.name, skipped, unpacked.unread, labels, extra_heads=extra)


def match_head(converted: Converted, num_classes: int | None, labels: Sequence[str] | None, what: str) -> Converted:
    """``converted`` with its head as a manifest entry states it (a new ``Converted``; pure).

    ``num_classes`` is checked against the head's width (a mismatch is another model: refused);
    ``labels`` (the entry's class names) replace the converted ones.

    Raises:
        CheckpointError: the entry has a head the file lacks, or one of another width.
    """
    if converted.head is None:
        raise CheckpointError(f"{what} has no classification head, but the manifest entry has one")
    width = converted.head["linear.weight"].shape[0]
    if num_classes is not None and width != num_classes:
        raise CheckpointError(
            f"{what} has a {width}-class head, but the manifest entry's head has {num_classes} classes: "
            "it is another model; nothing was cached"
        )
    if labels is not None and len(labels) != width:
        raise CheckpointError(f"{what} has a {width}-class head, but the manifest entry lists {len(labels)} labels")
    return replace(converted, labels=list(labels) if labels is not None else converted.labels)


def _converted_heads(
    parts: Mapping[str, Mapping[str, Any]], layout: Layout, cfg: ATSTConfig, head_level: str | None, use_head: str | None
) -> dict[str, HeadWeights]:
    """The file's classification heads by name, checked and copied, the one to keep first: ``use_head``,
    else the layout's main head, else the first found. ``head_level`` is the level of the kept head;
    a head's bundled label set is attached when its width matches."""
    rules = [r for r in layout.rules if r.role in ("head", "weak_head") and parts[r.role]]
    names = [r.name or r.role for r in rules]
    if use_head is not None and use_head not in names:
        found = f"has the heads {names}" if names else "has no classification head"
        raise CheckpointError(f"use_head={use_head!r} was asked for, but the {layout.name} file {found}")
    kept = use_head or next((n for r, n in zip(rules, names) if r.role == "head"), names[0] if names else None)
    heads: dict[str, HeadWeights] = {}
    for rule, name in sorted(zip(rules, names), key=lambda rn: rn[1] != kept):
        level = (head_level or rule.level) if name == kept else rule.level
        checked, level = _checked_head(parts[rule.role], cfg, level, rule.prefix)
        n_classes = checked["linear.weight"].shape[0]
        bundled = rule.labels is not None and labelsets.label_set_size(rule.labels) == n_classes
        heads[name] = HeadWeights(_copy_head(checked), level, labelsets.label_set(rule.labels) if bundled else None)
    return heads


def _convert_training(ckpt: Mapping[str, Any], depth: int | None) -> Converted:
    """A checkpoint of ``atst_features.train``: the inference encoder is stored in our names already,
    with its config (whose depth is the one intended)."""
    for key in ("encoder_config", "encoder_state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"the {TRAIN_FORMAT} checkpoint has no {key!r}")
    try:
        cfg = replace(ATSTConfig.from_dict(dict(ckpt["encoder_config"])), drop_path_rate=0.0)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the {TRAIN_FORMAT} checkpoint's encoder_config is not usable: {e}") from None
    if depth is not None and cfg.depth != depth:
        raise CheckpointError(f"the {TRAIN_FORMAT} checkpoint records depth {cfg.depth}, but depth={depth} was asked for")
    if not isinstance(ckpt["encoder_state_dict"], Mapping):
        raise CheckpointError(f"the {TRAIN_FORMAT} checkpoint's encoder_state_dict is not a state dict")
    state_dict = dict(ckpt["encoder_state_dict"])
    check_state_dict(state_dict, _encoder_shapes(cfg), "encoder_state_dict (against its config)", "encoder_state_dict.")
    head = level = labels = None
    multilabel = True
    if ckpt.get("head_state_dict") is not None:
        head, level = convert_head(ckpt["head_state_dict"], cfg, "clip", "head_state_dict.")
        meta = _as_dict(ckpt.get("head"))
        labels, multilabel = meta.get("classes"), bool(meta.get("multilabel", True))
        if labels is not None and (
            not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) != head["linear.weight"].shape[0]
        ):
            raise CheckpointError(f"the {TRAIN_FORMAT} checkpoint's head classes are not one name per class of its head")
    unread = sorted(str(k) for k in ckpt if k not in ("encoder_config", "encoder_state_dict", "head_state_dict", "head"))
    return Converted(
        cfg, {k: _owned_float32(v) for k, v in state_dict.items()}, head, level, TRAIN_FORMAT, {}, unread, labels, multilabel
    )
