"""Heads put on top of the encoder during training.

- ``mlp_head``: the BYOL projector (D -> 4096 -> 256) and predictor (256 -> 4096 -> 256):
  Linear (no bias) -> BatchNorm1d -> ReLU -> Linear (no bias), no final norm.
- ``linear_head``: the classification head of fine-tuning and C2F, the library's
  ``ClassificationHead`` (BatchNorm1d without affine parameters, then Linear) initialised for
  training: Linear weights N(0, 0.01), bias 0. It is exported as ``head.safetensors``, so a
  fine-tuned model loads with its head through ``atst_features.load``.
"""

from __future__ import annotations

from torch import nn

from ..heads import ClassificationHead


def mlp_head(in_dim: int, hidden: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """(N, in_dim) -> (N, out_dim) two-layer MLP with batch norm."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False),
    )


def linear_head(in_dim: int, n_classes: int, labels: list[str] | None = None) -> ClassificationHead:
    """(B, in_dim) pooled clip embeddings -> (B, n_classes) logits, freshly initialised."""
    head = ClassificationHead(in_dim, n_classes, level="clip", norm=True, labels=labels)
    nn.init.normal_(head.linear.weight, std=0.01)
    nn.init.zeros_(head.linear.bias)
    return head
