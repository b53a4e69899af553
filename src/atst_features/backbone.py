"""A trainable ATST frame backbone for fine-tuning with your own head.

``FrameBackbone`` is an ``nn.Module`` that maps padded 16 kHz waveforms to frame embeddings with
gradients, using the same front end (``frontend.log_mel``), the same encoder and the same
chunking as ``ATSTModel.embed_frames``: audio longer than 10.01 s is cut into 1001-frame chunks,
each encoded alone, and the chunks' tokens concatenated. In ``eval()`` mode its output equals
``embed_frames`` (the default, non-overlapping path) item by item.

Typical use::

    model = atst_features.load("atst-frame-base")
    backbone = FrameBackbone(model, layers="last")
    backbone.unfreeze_last(2)  # train the final norm and the last two blocks
    head = torch.nn.Linear(backbone.output_dim, n_classes)
    optimizer = torch.optim.AdamW(
        backbone.param_groups(base_lr=1e-4) + [{"params": head.parameters(), "lr": 1e-4}]
    )
    emb, mask = backbone(waveforms, lengths)  # (B, T', D), (B, T')

The backbone shares its parameters with the ``ATSTModel`` (or encoder) it was built from;
``copy.deepcopy`` that first to keep an untouched copy.
"""

from __future__ import annotations

import torch
from torch import nn

from . import frontend, pooling
from .chunks import encode_chunks, gather
from .embed import ATSTModel, Layers, resolve_layers
from .model import ATSTEncoder


def layer_lr_scale(name: str, depth: int, decay: float) -> float:
    """The layer-wise learning-rate factor of an encoder parameter (the ATST fine-tuning rule):
    decay^(depth - b) for block b, decay^depth for the embeddings (patch, positional, mask,
    [CLS]: below block 0), decay for the final norm."""
    if name.startswith("blocks."):
        return decay ** (depth - int(name.split(".")[1]))
    if name.startswith("norm."):
        return decay
    if name in ("pos_embed", "mask_embed", "cls_token") or name.startswith("patch_embed."):
        return decay**depth
    raise ValueError(f"no layer-wise learning-rate rule for encoder parameter {name!r}")


class FrameBackbone(nn.Module):
    """Padded waveforms (B, N) + lengths (B,) -> frame embeddings (B, T', L * D) + validity mask (B, T').

    Args:
        model: an ``ATSTModel`` (e.g. from ``atst_features.load``) or an ``ATSTEncoder``; made
            for ATST-Frame, an ATST-Clip encoder also works (its [CLS] output is dropped).
        layers: blocks whose normed outputs are concatenated along features, as in
            ``embed_frames``: "last" (default, what frame-level fine-tuning uses), "all", a
            0-based index or a list of indices.
    """

    def __init__(self, model: ATSTModel | ATSTEncoder, layers: Layers = "last"):
        super().__init__()
        if isinstance(model, ATSTModel):
            model = model.encoder
        if not isinstance(model, ATSTEncoder):
            raise TypeError(f"FrameBackbone takes an ATSTModel or an ATSTEncoder, got {type(model).__name__}")
        self.encoder = model
        self.blocks = resolve_layers(layers, model.cfg.depth)

    @property
    def output_dim(self) -> int:
        """Features per frame: (number of selected blocks) * embed_dim."""
        return len(self.blocks) * self.encoder.cfg.embed_dim

    # ---------------------------------------------------------------- forward

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame embeddings with gradients.

        Args:
            waveforms: (B, N) float 16 kHz waveforms, full scale +-1, zero-padded on the right;
                moved to the encoder's device.
            lengths: (B,) valid samples per item (each >= ``frontend.MIN_SAMPLES``); ``None`` = all N.

        Returns:
            embeddings: (B, T', L * D) in the encoder's dtype, T' the longest item's token count;
                token k of chunk c starts at (1001 c + 4 k) * 10 ms (see ``timestamps``). Rows past
                an item's own tokens are zero.
            mask: (B, T') bool, True for real tokens.
        """
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
        cfg = self.encoder.cfg
        device = self.encoder.pos_embed.device
        mel, n_frames = frontend.log_mel(waveforms.to(device), lengths, db_clamp=cfg.db_clamp)  # (B, 64, T), (B,)
        plans = [pooling.frame_chunks(i, int(n), cfg.spec_w, cfg.patch_w) for i, n in enumerate(n_frames)]
        chunks = [c for plan in plans for c in plan]
        out = encode_chunks(self.encoder, gather(mel, chunks), [c.tokens for c in chunks], self.blocks)
        rows = out.tokens.permute(0, 2, 1, 3).flatten(2)  # (C, P, L * D), no [CLS]
        # each chunk's valid tokens go to (item, first token of the chunk in the item + k)
        n_tokens = [sum(c.tokens for c in plan) for plan in plans]
        chunk_idx, token_idx, item_idx, pos_idx = [], [], [], []
        for j, c in enumerate(chunks):
            first = sum(p.tokens for p in plans[c.item] if p.index < c.index)
            chunk_idx += [j] * c.tokens
            token_idx += range(c.tokens)
            item_idx += [c.item] * c.tokens
            pos_idx += range(first, first + c.tokens)
        emb = rows.new_zeros(mel.shape[0], max(n_tokens), rows.shape[-1])  # (B, T', L * D)
        emb = emb.index_put((torch.tensor(item_idx, device=device), torch.tensor(pos_idx, device=device)),
                            rows[torch.tensor(chunk_idx, device=device), torch.tensor(token_idx, device=device)])
        mask = torch.arange(emb.shape[1], device=device)[None, :] < torch.tensor(n_tokens, device=device)[:, None]
        return emb, mask

    def timestamps(self, num_samples: int) -> torch.Tensor:
        """(T',) float64 start of each token in seconds for an item of ``num_samples`` samples (as ``embed_frames``)."""
        cfg = self.encoder.cfg
        chunks = pooling.frame_chunks(0, int(frontend.num_frames(num_samples)), cfg.spec_w, cfg.patch_w)
        return pooling.token_times(chunks, cfg.patch_w)

    # ---------------------------------------------------------------- what trains

    def layer_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """The encoder's parameters bottom-up: ("embed", patch/positional/mask), ("block0" ...), ("norm", final norm)."""
        return [(name, [p for _, p in named]) for name, named in self._named_groups()]

    def _named_groups(self) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
        enc = self.encoder
        named = list(enc.named_parameters())
        groups = [("embed", [(n, p) for n, p in named if not n.startswith(("blocks.", "norm."))])]
        groups += [(f"block{i}", [(n, p) for n, p in named if n.startswith(f"blocks.{i}.")]) for i in range(len(enc.blocks))]
        return groups + [("norm", [(n, p) for n, p in named if n.startswith("norm.")])]

    def freeze(self) -> FrameBackbone:
        """Stop gradients to every encoder parameter (a frozen feature extractor); returns self."""
        self.encoder.requires_grad_(False)
        return self

    def unfreeze_last(self, n: int) -> FrameBackbone:
        """Train only the final norm and the last ``n`` blocks; returns self.

        ``n`` = 0 trains the final norm alone; ``n`` = depth trains every block; ``n`` > depth also
        trains the patch embedding and positional table (the whole encoder).
        """
        depth = self.encoder.cfg.depth
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"unfreeze_last takes a number of blocks >= 0 (up to {depth + 1} = everything), got {n!r}")
        self.freeze()
        groups = self.layer_groups()  # embed, block0..block{depth-1}, norm
        for _, params in groups[max(0, depth - n) + 1 :] if n <= depth else groups:
            for p in params:
                p.requires_grad_(True)
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> FrameBackbone:
        """Recompute block activations in the backward pass (less memory, ~30% more time); returns self."""
        self.encoder.gradient_checkpointing = bool(enabled)
        return self

    def param_groups(self, base_lr: float, decay: float = 0.75, weight_decay: float = 0.05) -> list[dict]:
        """Optimizer parameter groups with layer-wise learning-rate decay (trainable parameters only).

        The learning rate shrinks by ``decay`` per layer going down, as in the ATST fine-tuning
        recipes: final norm ``base_lr * decay``, block b (0-based) ``base_lr * decay ** (depth - b)``,
        embeddings ``base_lr * decay ** depth``; give your head ``base_lr``. Weight decay applies
        to matrices and the positional / mask tables (parameters with >= 2 dimensions), not to
        biases or norm weights.

        Returns:
            A list of dicts with ``params``, ``lr``, ``weight_decay`` and ``name`` (torch
            optimizers keep the extra key), for ``torch.optim.AdamW(groups)`` and the like.
        """
        if not base_lr > 0 or not 0 < decay <= 1 or weight_decay < 0:
            raise ValueError(
                f"need base_lr > 0, 0 < decay <= 1 and weight_decay >= 0; got {base_lr!r}, {decay!r}, {weight_decay!r}"
            )
        depth = self.encoder.cfg.depth
        out = []
        for name, named in self._named_groups():
            lr = base_lr * layer_lr_scale(named[0][0], depth, decay)
            trainable = [p for _, p in named if p.requires_grad]
            for suffix, members, wd in (
                ("", [p for p in trainable if p.dim() >= 2], weight_decay),
                (".no_decay", [p for p in trainable if p.dim() < 2], 0.0),
            ):
                if members:
                    out.append({"params": members, "lr": lr, "weight_decay": wd, "name": name + suffix})
        return out
