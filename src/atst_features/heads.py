"""Classification heads of fine-tuned ATST checkpoints, and tagging audio with them.

A head is the official ``LinearHead``: ``BatchNorm1d(affine=False)`` (running statistics only,
always in eval mode; absent in the AudioSet-strong head) followed by ``Linear(in, classes)``;
scores are ``sigmoid`` probabilities for multi-label heads (every released one) and ``softmax``
for single-label ones. Its input is the output of the encoder's **last** block, after the final norm:

- a **frame-level** head (AudioSet-strong fine-tuning, frame-level ATST-C2F) scores every 40 ms
  token: ``embed_frames(layers="last")`` -> (T', D) -> scores (T', C), with timestamps;
- a **clip-level** head (AudioSet fine-tuning, ATST-C2F on AudioSet-2M) scores the pooled clip
  vector: ``embed_clip(layers="last")`` -> (D,) for ATST-Frame, (2 D,) = [cls, avg] for ATST-Clip
  -> scores (C,).

On disk a head is ``head.safetensors`` (official ``LinearHead`` names, with its level and
whether it is multi-label in the file's metadata) and, when the class names are known,
``labels.json`` (a JSON list, score order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:  # only for annotations; heads.py never imports the embedding code at run time
    from .embed import ATSTModel

HEAD_NAME = "head.safetensors"
LABELS_NAME = "labels.json"
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


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a JSON list (``.json``) or a text file with one name per line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        labels = json.loads(text)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{str(path)!r} must hold a JSON list of class names (strings)")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def save_head(
    state_dict: dict[str, torch.Tensor],
    level: str,
    directory: str | os.PathLike,
    labels: list[str] | None = None,
    multilabel: bool = True,
) -> list[str]:
    """Write ``head.safetensors`` (and ``labels.json``) to ``directory``; returns the file names written."""
    directory = Path(directory)
    num_classes = state_dict["linear.weight"].shape[0]
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels given for a head with {num_classes} classes")
    tmp = directory / (HEAD_NAME + ".tmp")
    meta = {"format": "pt", "level": level, "multilabel": str(bool(multilabel)).lower()}
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=meta)
    os.replace(tmp, directory / HEAD_NAME)
    written = [HEAD_NAME]
    if labels is not None:
        (directory / LABELS_NAME).write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(LABELS_NAME)
    return written


def load_head(directory: str | os.PathLike) -> ClassificationHead | None:
    """The head stored in a converted model directory, or ``None`` when it has none."""
    directory = Path(directory)
    path = directory / HEAD_NAME
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    level, multilabel = meta.get("level"), meta.get("multilabel", "true") == "true"
    labels = read_labels(directory / LABELS_NAME) if (directory / LABELS_NAME).is_file() else None
    if level not in LEVELS:
        raise ValueError(f"{str(path)!r} does not record its level ('clip' or 'frame') in its metadata")
    return ClassificationHead.from_state_dict(load_file(str(path)), level, labels, multilabel)


# ---------------------------------------------------------------------------- tagging


@dataclass
class Tags:
    """Class probabilities from a classification head.

    Attributes:
        scores: probabilities (sigmoid, or softmax for a single-label head), (C,) for a clip-level
            head or (T', C) for a frame-level head (one row per 40 ms token); a 2-D batch input
            adds a leading batch axis.
        labels: class names in score order, or ``None`` when the checkpoint's label list is unknown.
        timestamps: (T',) float64 seconds, the start of each token, for frame-level heads; else ``None``.
    """

    scores: torch.Tensor
    labels: list[str] | None
    timestamps: torch.Tensor | None = None

    def top(self, k: int = 5) -> list[tuple[str | int, float]]:
        """The ``k`` best classes of one clip as (label, or class index when labels are unknown, score).

        Frame-level scores are reduced by their maximum over time first.
        """
        per_class = self.scores if self.timestamps is None else self.scores.amax(dim=-2)
        if per_class.ndim != 1:
            raise ValueError("top() needs the scores of one clip; index a batch first")
        values, index = per_class.topk(min(k, per_class.shape[0]))
        names = self.labels
        return [(names[i] if names else i, v) for i, v in zip(index.tolist(), values.tolist())]


def tag(model: ATSTModel, audio, sample_rate: float | None = None, *, batch_size: int = 16):
    """Score audio with the model's classification head.

    Args:
        model: an ``ATSTModel`` loaded from a fine-tuned checkpoint that has a head.
        audio, sample_rate, batch_size: as ``ATSTModel.embed_clip``.

    Returns:
        ``Tags`` per input (a list for a list input): clip-level heads give scores (C,),
        frame-level heads scores (T', C) with timestamps (T',) in seconds.
    """
    head = model.head
    if head is None:
        raise ValueError(
            f"model {model.name!r} has no classification head; tagging needs a fine-tuned checkpoint that has one "
            "(for example 'atst-frame-base-as-strong')"
        )
    device = next(head.parameters()).device

    @torch.inference_mode()
    def scores(x: torch.Tensor) -> torch.Tensor:
        return head.probabilities(x.to(device=device, dtype=torch.float32)).cpu()

    if head.level == "clip":
        vectors = model.embed_clip(audio, sample_rate, layers="last", batch_size=batch_size)
        if isinstance(vectors, list):
            return [Tags(scores(v), head.labels) for v in vectors]
        return Tags(scores(vectors), head.labels)
    frames = model.embed_frames(audio, sample_rate, layers="last", batch_size=batch_size)
    if isinstance(frames, list):
        return [Tags(scores(f.embeddings), head.labels, f.timestamps) for f in frames]
    return Tags(scores(frames.embeddings), head.labels, frames.timestamps)
