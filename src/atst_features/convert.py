"""Official ATST checkpoints -> our state dict and config. Pure (dict in, dict out), strict and loud.

Every key of the encoder is accounted for: a missing, unexpected or mis-shaped key is an error
that names it. Our parameter names differ from the official ones in two places only:
``patch_embed.patch_embed.*`` -> ``patch_embed.*`` and ``norm_frame.*`` (ATST-Frame) -> ``norm.*``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .model import ATSTConfig

ARCH_HEADS = {"small": 6, "base": 12}  # official factories: 384 / 6 heads, 768 / 12 heads
WIDTH_HEADS = {384: 6, 768: 12}  # head dim 64, as in every released model
BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


class CheckpointError(ValueError):
    """A checkpoint that does not hold a complete, well-shaped ATST encoder."""


def infer_family(encoder_sd: Mapping[str, torch.Tensor]) -> str:
    """"clip" if the official encoder dict has a [CLS] token, "frame" if it has ``norm_frame``."""
    if "cls_token" in encoder_sd:
        return "clip"
    if "norm_frame.weight" in encoder_sd:
        return "frame"
    raise CheckpointError("cannot tell the model family: no 'cls_token' (ATST-Clip) and no 'norm_frame.weight' (ATST-Frame)")


def infer_num_heads(embed_dim: int, arch: str | None = None) -> int:
    """Heads from the official ``arch`` name ("small" -> 6, "base" -> 12) or, failing that, the width."""
    if arch is not None:
        key = arch.replace("ast_", "").replace("frameast_", "").lower()
        if key in ARCH_HEADS:
            return ARCH_HEADS[key]
    if embed_dim in WIDTH_HEADS:
        return WIDTH_HEADS[embed_dim]
    raise CheckpointError(
        f"cannot infer the number of attention heads for embed_dim {embed_dim} (arch {arch!r}); pass num_heads="
    )


def config_from_official(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None = None,
    num_heads: int | None = None,
    arch: str | None = None,
) -> ATSTConfig:
    """Read an ``ATSTConfig`` off the shapes of an official encoder state dict (official key names)."""
    family = family or infer_family(encoder_sd)
    for key in ("pos_embed", "patch_embed.patch_embed.weight", "blocks.0.mlp.fc1.weight"):
        if key not in encoder_sd:
            raise CheckpointError(f"the encoder has no {key!r}")
    pos = encoder_sd["pos_embed"]
    embed_dim = pos.shape[-1]
    depth = len({k.split(".")[1] for k in encoder_sd if k.startswith("blocks.")})
    patch_in = encoder_sd["patch_embed.patch_embed.weight"].shape[1]
    n_mels = 64
    if patch_in % n_mels:
        raise CheckpointError(f"patch_embed input size {patch_in} is not a multiple of {n_mels} mel bins")
    patch_w = patch_in // n_mels
    return ATSTConfig(
        family=family,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or infer_num_heads(embed_dim, arch),
        mlp_ratio=encoder_sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in encoder_sd,
        n_mels=n_mels,
        patch_h=n_mels,
        patch_w=patch_w,
        spec_w=(pos.shape[1] - 1) * patch_w + 1,
    )


def expected_shapes(cfg: ATSTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official encoder state dict of this config, with its shape."""
    d, h = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, cfg.max_tokens + 1, d),
        "mask_embed": (1, 1, d),
        "patch_embed.patch_embed.weight": (d, cfg.patch_h * cfg.patch_w),
        "patch_embed.patch_embed.bias": (d,),
    }
    if cfg.has_cls:
        shapes["cls_token"] = (1, 1, d)
    final = "norm" if cfg.has_cls else "norm_frame"
    shapes[f"{final}.weight"] = (d,)
    shapes[f"{final}.bias"] = (d,)
    per_block = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d),
        "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h),
        "mlp.fc2.bias": (d,),
    }
    if cfg.qkv_bias:
        per_block["attn.qkv.bias"] = (3 * d,)
    for b in range(cfg.depth):
        shapes.update({f"blocks.{b}.{k}": s for k, s in per_block.items()})
    return shapes


def _rename(key: str) -> str:
    if key.startswith("patch_embed.patch_embed."):
        return "patch_embed." + key[len("patch_embed.patch_embed.") :]
    if key.startswith("norm_frame."):
        return "norm." + key[len("norm_frame.") :]
    return key


def convert_encoder(
    encoder_sd: Mapping[str, torch.Tensor],
    family: str | None = None,
    num_heads: int | None = None,
    arch: str | None = None,
) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """An official encoder state dict (no prefix) -> (config, our state dict), checking every key.

    ``prompt_embed`` (never used by the releases, nprompt = 0) is accepted and dropped when empty.
    """
    sd = {k: v for k, v in encoder_sd.items() if not (k == "prompt_embed" and v.numel() == 0)}
    cfg = config_from_official(sd, family, num_heads, arch)
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"the {cfg.family} encoder does not match: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"key {k!r} has shape {tuple(sd[k].shape)}, expected {shape}")
    return cfg, {_rename(k): v.detach().to(torch.float32).contiguous() for k, v in sd.items()}


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
