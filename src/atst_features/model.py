"""The ATST encoder: one readable file for ATST-Clip and ATST-Frame.

Both families are the same pre-norm ViT over 64 x 4 (mel bins x frames) patches of a log-mel:

    mel (B, 64, T) -> patches (B, P, 256) -> Linear -> + pos_embed -> 12 x Block -> norm

ATST-Clip prepends a [CLS] token and adds positional rows 0..P; ATST-Frame has no [CLS] and adds
rows 1..P (row 0 is never used). Every block's output, passed through the final norm, is a feature.
Padded tokens are hidden from attention by adding ``MASK_BIAS`` to their logits, as the official
code does, so a padded batch gives each item the same result as running it alone.

Parameter names follow the official ones, except ``patch_embed`` (a plain Linear) and ``norm``
(``norm_frame`` in ATST-Frame); ``convert.py`` maps official checkpoints onto these names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

MASK_BIAS = -10000.0  # added to the attention logits of padded keys (the official value, not -inf)

Family = Literal["clip", "frame"]


#: Bounds of ``ATSTConfig`` (the released models: 384 or 768 wide, 12 blocks, 6 or 12 heads,
#: 250 tokens). Generous, but they keep a config file from asking for an absurd model.
MAX_EMBED_DIM = 4096
MAX_DEPTH = 64
MAX_TOKENS = 4096  # patch tokens per forward pass (the positional table's rows - 1)
MAX_MLP_RATIO = 16.0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class ATSTConfig:
    """Architecture of an ATST encoder; saved as ``config.json`` beside the weights.

    ``spec_w`` (mel frames the positional table was built for) sets the longest chunk the
    encoder takes: ``spec_w // patch_w`` tokens (250 for 1001 frames = 10.01 s).
    ``clip_chunk_frames`` is the chunk length of the clip-level pooling: 1001 for ATST-Frame,
    601 (6 s crops) for ATST-Clip.
    ``db_clamp`` is the front-end contract of checkpoints trained on clamped mels: ``(lo, hi)``
    dB applied after the 80 dB floor (ATST-SED and PretrainedSED: (-50, 80)), ``None`` otherwise.

    Every field is checked for its type and range when the config is made (``ValueError``).
    """

    family: Family
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    layernorm_eps: float = 1e-6
    n_mels: int = 64
    patch_h: int = 64
    patch_w: int = 4
    spec_w: int = 1001
    clip_chunk_frames: int | None = None
    drop_path_rate: float = 0.0  # training only
    db_clamp: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.family not in ("clip", "frame"):
            raise ValueError(f"family must be 'clip' or 'frame', got {self.family!r}")
        for name, top in (("embed_dim", MAX_EMBED_DIM), ("depth", MAX_DEPTH), ("num_heads", MAX_EMBED_DIM),
                          ("n_mels", 1024), ("patch_h", 1024), ("patch_w", 1024), ("spec_w", 1 << 20)):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= top:
                raise ValueError(f"{name} must be an integer in 1..{top}, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not _is_number(self.mlp_ratio) or not 0 < self.mlp_ratio <= MAX_MLP_RATIO or int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be a number in (0, {MAX_MLP_RATIO:g}] giving a hidden width >= 1, got {self.mlp_ratio!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if not _is_number(self.layernorm_eps) or not 0 < self.layernorm_eps < 1:
            raise ValueError(f"layernorm_eps must be a number in (0, 1), got {self.layernorm_eps!r}")
        if not _is_number(self.drop_path_rate) or not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {self.drop_path_rate!r}")
        if self.n_mels != self.patch_h:
            raise ValueError(f"patches must span all mel bins (patch_h == n_mels), got {self.patch_h} and {self.n_mels}")
        if not 1 <= self.spec_w // self.patch_w <= MAX_TOKENS:
            raise ValueError(
                f"spec_w {self.spec_w} and patch_w {self.patch_w} give {self.spec_w // self.patch_w} tokens per pass; "
                f"accepted are 1..{MAX_TOKENS}"
            )
        if self.clip_chunk_frames is None:
            object.__setattr__(self, "clip_chunk_frames", 601 if self.family == "clip" else self.spec_w)
        if not _is_int(self.clip_chunk_frames) or not self.patch_w <= self.clip_chunk_frames <= self.spec_w:
            raise ValueError(
                f"clip_chunk_frames must be an integer in {self.patch_w}..{self.spec_w} (at least one token), "
                f"got {self.clip_chunk_frames!r}"
            )
        if self.db_clamp is not None:
            clamp = self.db_clamp
            if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2 and all(_is_number(x) for x in clamp)
                    and clamp[0] < clamp[1]):
                raise ValueError(f"db_clamp must be None or [low, high] dB with low < high, got {clamp!r}")
            object.__setattr__(self, "db_clamp", (float(clamp[0]), float(clamp[1])))

    @property
    def max_tokens(self) -> int:
        """Patch tokens one forward pass takes (the positional table's length minus one)."""
        return self.spec_w // self.patch_w

    @property
    def has_cls(self) -> bool:
        return self.family == "clip"

    @classmethod
    def from_dict(cls, data: dict) -> "ATSTConfig":
        """A config from its ``to_dict`` form (a JSON object); unknown or ill-typed fields are a ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object of fields, got a {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
        if "family" not in data:
            raise ValueError("a config must name its family ('clip' or 'frame')")
        return cls(**data)

    @classmethod
    def from_json(cls, path) -> "ATSTConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).type_as(x)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample during training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def _exporting() -> bool:
    """Whether ``torch.export`` / ONNX export is tracing (older torch has no such query: never)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU inference can go through oneDNN's linear (``onednn = True``).

    ``cpu.choose_gemm`` sets ``onednn`` on an encoder's layers where a measured check finds that
    path faster than torch's default GEMM (equal to it within float32 rounding). It applies only
    on the CPU without autograd, outside ``torch.compile`` and export; otherwise, and by default,
    this is ``nn.Linear``. ``activation="gelu"`` fuses the exact (erf) GELU into the GEMM there.
    """

    onednn = False

    def _fast(self, x: torch.Tensor) -> bool:
        return (
            self.onednn and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not _exporting()
        )

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """(..., in) -> (..., out); ``activation`` None or "gelu" (exact, erf)."""
        if self._fast(x):  # oneDNN's linear, with the GELU (algorithm "none": erf) fused when asked
            post, algorithm = ("gelu", "none") if activation else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, post, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        return y if activation is None else F.gelu(y)  # exact (erf) GELU


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape  # (B, N, D)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d_h) each
        # Scale head_dim ** -0.5 (SDPA's default); `bias` is (B, 1, 1, N) with MASK_BIAS on padded keys.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d_h)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, activation="gelu"))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, cfg: ATSTConfig, drop_path: float):
        super().__init__()
        self.norm1 = LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Intermediates(NamedTuple):
    """Normed outputs of selected blocks: ``cls`` (B, L, D) or ``None`` (ATST-Frame), ``tokens`` (B, L, P, D)."""

    cls: torch.Tensor | None
    tokens: torch.Tensor


class ATSTEncoder(nn.Module):
    """ATST-Clip / ATST-Frame encoder.

    ``forward_intermediates(mel, n_tokens, blocks)`` returns the final-normed outputs of the
    selected blocks, [CLS] and patch tokens apart: what every official embedding is made of.
    """

    def __init__(self, cfg: ATSTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = Linear(cfg.patch_h * cfg.patch_w, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_tokens + 1, d))
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.has_cls else None
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # also on the meta device
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = LayerNorm(d, eps=cfg.layernorm_eps)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """Training initialisation: truncated normal (std 0.02) weights and tokens, zero biases."""
        for p in (self.pos_embed, self.mask_embed, self.cls_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def patchify(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, T) -> (B, T // patch_w, patch_h * patch_w), feature index = bin * patch_w + frame."""
        b, h, t = mel.shape
        p = t // self.cfg.patch_w
        x = mel[:, :, : p * self.cfg.patch_w].reshape(b, h, p, self.cfg.patch_w)  # (B, 64, P, 4)
        return x.permute(0, 2, 1, 3).reshape(b, p, h * self.cfg.patch_w)  # (B, P, 256)

    def embed_tokens(self, mel: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with positions, [CLS] first for ATST-Clip: (B, P [+1], D).

        ``token_mask`` (B, P) bool marks patches replaced by ``mask_embed`` (masked pretraining).
        """
        x = self.patch_embed(self.patchify(mel).to(self.patch_embed.weight.dtype))  # (B, P, D)
        p = x.shape[1]
        if p > self.cfg.max_tokens:
            raise ValueError(f"a chunk has {p} tokens; this encoder takes at most {self.cfg.max_tokens}")
        if token_mask is not None:
            x = torch.where(token_mask[..., None], self.mask_embed.to(x.dtype), x)
        x = x + self.pos_embed[:, 1 : p + 1]
        if self.cls_token is not None:
            cls = self.cls_token + self.pos_embed[:, :1]  # (1, 1, D)
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P, D)
        return x

    def forward_intermediates(
        self,
        mel: torch.Tensor,
        n_tokens: torch.Tensor | None = None,
        blocks: list[int] | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> Intermediates:
        """Normed outputs of the selected blocks, [CLS] and patch tokens apart.

        Args:
            mel: (B, n_mels, T) normalised log-mel, T <= spec_w.
            n_tokens: (B,) valid patch tokens per item (``frames // patch_w``); padded keys are
                hidden from attention. ``None``: every token is valid (the fastest path).
            blocks: 0-based block indices to return, in this order; ``None`` = the last block.
            token_mask: (B, P) bool, patches to replace by ``mask_embed`` (training).

        Returns:
            ``Intermediates(cls, tokens)``: cls (B, L, D) for ATST-Clip (``None`` for ATST-Frame),
            tokens (B, L, P, D), with L = len(blocks).
        """
        blocks = [self.cfg.depth - 1] if blocks is None else blocks
        if not blocks or min(blocks) < 0 or max(blocks) >= self.cfg.depth:
            raise ValueError(f"blocks must be 0-based indices below {self.cfg.depth}, got {blocks}")
        x = self.embed_tokens(mel, token_mask)  # (B, N, D)
        bias = None  # no padding: SDPA may use its fused kernels
        if n_tokens is not None:
            keys = n_tokens.to(x.device) + int(self.cls_token is not None)  # (B,)
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= keys[:, None]  # (B, N)
            bias = torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill(pad, MASK_BIAS)
            bias = bias[:, None, None, :]  # (B, 1, 1, N)
        # Eager inference writes each block's normed output into one (B, L, N, D) tensor as it is
        # made (half the peak memory of stacking them); under autograd or torch.compile (whose
        # graphs mishandle that in-place fill) the outputs are stacked at the end.
        fill = not (torch.is_grad_enabled() or torch.compiler.is_compiling())
        out = x.new_empty(x.shape[0], len(blocks), *x.shape[1:]) if fill else None
        normed: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: max(blocks) + 1]):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
            if i in blocks and fill:
                out[:, blocks.index(i)] = self.norm(x)
            elif i in blocks:
                normed[i] = self.norm(x)
        if not fill:
            out = torch.stack([normed[b] for b in blocks], dim=1)  # (B, L, N, D)
        if self.cls_token is None:
            return Intermediates(None, out)
        return Intermediates(out[:, :, 0], out[:, :, 1:])

    def forward(
        self,
        mel: torch.Tensor,
        n_tokens: torch.Tensor | None = None,
        blocks: list[int] | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The selected blocks' normed outputs in one tensor: (B, L, N, D), N = P (+1 for the
        [CLS] token of ATST-Clip, at index 0). Arguments as ``forward_intermediates``, which the
        package itself uses."""
        cls, tokens = self.forward_intermediates(mel, n_tokens, blocks, token_mask)
        return tokens if cls is None else torch.cat([cls[:, :, None], tokens], dim=2)
