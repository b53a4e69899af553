"""Classification heads of fine-tuned ATST checkpoints.

A head is the official ``LinearHead``: ``BatchNorm1d(affine=False)`` (running statistics only,
always in eval mode; absent in the AudioSet-strong head) followed by ``Linear(in, classes)``;
scores are ``sigmoid`` probabilities for multi-label heads (every released one) and ``softmax``
for single-label ones. Its input is the output of the encoder's **last** block, after the final norm:

- a **frame-level** head (AudioSet-strong fine-tuning, frame-level ATST-C2F) scores every 40 ms
  token: ``embed_frames(layers="last")`` -> (T', D) -> scores (T', C), with timestamps;
- a **clip-level** head (AudioSet fine-tuning, ATST-C2F on AudioSet-2M) scores the pooled clip
  vector: ``embed_clip(layers="last")`` -> (D,) for ATST-Frame, (2 D,) = [cls, avg] for ATST-Clip
  -> scores (C,).

On disk a head is ``head.safetensors`` and ``labels.json`` (see ``artifacts``: ``save_head`` /
``load_head``); scoring audio with a head is ``ATSTModel.tag`` (``embed.py``).
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = ("clip", "frame")
BN_EPS = 1e-5  # BatchNorm1d's default, as in the official LinearHead


class ClassificationHead(nn.Module):
    """``BatchNorm1d(affine=False)`` (optional) -> ``Linear``: (..., in_dim) -> logits (..., classes).

    Attributes:
        level: "clip" (one score vector per clip) or "frame" (one per 40 ms token).
        labels: class names in score order, or ``None`` when the checkpoint's label list is unknown.
        multilabel: scores are independent sigmoids (True) or a softmax over classes (False).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        level: str,
        norm: bool = True,
        labels: list[str] | None = None,
        multilabel: bool = True,
    ):
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels given for a head with {num_classes} classes")
        self.level = level
        self.labels = labels
        self.multilabel = multilabel
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=BN_EPS) if norm else None
        self.linear = nn.Linear(in_dim, num_classes)

    @property
    def in_dim(self) -> int:
        return self.linear.in_features

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    @property
    def class_names(self) -> list[str]:
        """``labels``, or the class indices as text ("0", "1", ...) when the names are unknown."""
        return list(self.labels) if self.labels else [str(c) for c in range(self.num_classes)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) float -> logits (..., num_classes)."""
        if self.norm is not None:
            shape = x.shape
            x = self.norm(x.reshape(-1, shape[-1])).reshape(shape)
        return self.linear(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> scores (..., num_classes): sigmoid (multi-label) or softmax over classes."""
        logits = self(x)
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], level: str, labels: list[str] | None = None, multilabel: bool = True
    ) -> ClassificationHead:
        """A head in eval mode from its state dict (``linear.*`` [+ ``norm.*``]), loaded strictly."""
        num_classes, in_dim = state_dict["linear.weight"].shape
        head = cls(
            in_dim, num_classes, level, norm="norm.running_mean" in state_dict, labels=labels, multilabel=multilabel
        )
        head.load_state_dict(state_dict, strict=True)
        return head.eval()


# ---------------------------------------------------------------------------- tagging
