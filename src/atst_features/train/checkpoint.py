"""Training checkpoints (atomic, exactly resumable) and the inference export.

A checkpoint is one ``torch.save`` file, ``OUT/checkpoints/step-XXXXXXXX.pt``, written by rank 0
atomically (``atomic.open_atomic``: a new temporary file beside it, then ``os.replace``). It holds
only tensors, numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)`` reads it.
Keys:

| key | content |
|---|---|
| ``format`` | ``"atst-features-train"`` |
| ``format_version`` | 2 (1: before the mixup memory left the checkpoint; usable as ``--init``, not resumable) |
| ``command`` | ``"frame"``, ``"clip"``, ``"finetune"`` or ``"c2f"`` |
| ``step`` | optimizer steps done |
| ``config`` | the ``TrainConfig`` as a dict |
| ``encoder_config`` | ``ATSTConfig`` dict of the encoder to use for inference |
| ``encoder_state_dict`` | that encoder's weights, our parameter names (as ``model.safetensors``): the EMA teacher (frame, clip), the fine-tuned encoder (finetune), the student (c2f) |
| ``head_state_dict``, ``head`` | finetune / c2f only: the clip-level head (``norm.running_mean``, ``norm.running_var``, ``norm.num_batches_tracked``, ``linear.weight``, ``linear.bias``) and ``{"classes": [...], "multilabel": bool}`` |
| ``task`` | what rebuilding the training modules needs (encoder configs, classes) |
| ``modules`` | state dicts of the training modules (student, teacher, heads) |
| ``optimizer`` | the optimizer state dict |
| ``schedule`` | the ``Schedule`` parameters (lr, warm-up, weight decay, EMA) |
| ``rank_states`` | per process: RNG states (torch CPU, CUDA, the augmentation generator) and, for pretraining, where the mixup memory's ring stands (three integers; the memory itself is rebuilt from the data on resume, so a checkpoint does not grow with the memory or, beyond a few kB of RNG state each, with the processes) |

``OUT/export/`` is refreshed at every checkpoint with ``artifacts.save_converted``: ``config.json`` +
``model.safetensors`` (+ ``head.safetensors`` and ``labels.json`` for classifiers) +
``checksums.json``, which ``atst_features.load`` reads, and ``training.json`` (command, step and,
for classifiers, whether the head is multi-label).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .. import artifacts, atomic, convert
from ..model import ATSTConfig
from .tasks import Export

FORMAT = convert.TRAIN_FORMAT
FORMAT_VERSION = 2
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
TRAINING_INFO = "training.json"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_path(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The checkpoints of a run directory, oldest first."""
    d = Path(out) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (``atomic.open_atomic``: a new temporary file, never a link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_atomic(path, "wb") as f:
        torch.save(state, f)


def prune(out: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)


def read(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (weights only, on the CPU) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an atst-features training checkpoint (no format={FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint format version {state.get('format_version')}; this code resumes version "
            f"{FORMAT_VERSION} (an older checkpoint still works as --init or --teacher)"
        )
    return state


def export_entries(export: Export) -> dict:
    """The checkpoint keys that describe the inference model."""
    entries = {"encoder_config": export.config.to_dict(), "encoder_state_dict": export.state_dict}
    if export.head_state_dict is not None:
        entries["head_state_dict"] = export.head_state_dict
        entries["head"] = export.head_meta
    return entries


def write_export(export: Export, directory: str | os.PathLike, command: str, step: int) -> Path:
    """Write the inference model to ``directory`` (see the module docstring); returns it."""
    meta = export.head_meta or {}
    info = {"command": command, "step": step}
    if export.head_state_dict is not None:
        info["multilabel"] = bool(meta["multilabel"])
    directory = artifacts.save_converted(
        export.config,
        export.state_dict,
        directory,
        head=export.head_state_dict,
        head_level="clip" if export.head_state_dict is not None else None,
        labels=meta.get("classes"),
        multilabel=bool(meta.get("multilabel", True)),
        source={"trained_with": f"atst-features train {command}", "step": step},
    )
    atomic.write_text_atomic(directory / TRAINING_INFO, json.dumps(info, indent=2) + "\n")
    return directory


@dataclass
class Pretrained:
    """An encoder to start from (and, for a fine-tuned model, its head)."""

    config: ATSTConfig
    state_dict: dict[str, torch.Tensor]
    head_state_dict: dict[str, torch.Tensor] | None = None
    head_meta: dict | None = None


def load_pretrained(source: str | os.PathLike) -> Pretrained:
    """An encoder from a training checkpoint, an ``export/``-style directory, or an official checkpoint."""
    source = Path(source)
    if source.is_dir():
        config = ATSTConfig.from_json(source / artifacts.CONFIG_NAME)
        sd = load_file(str(source / artifacts.WEIGHTS_NAME))
        head = artifacts.load_head(source)
        if head is None:
            return Pretrained(config, sd)
        if head.level != "clip" or head.labels is None:
            raise ValueError(f"{str(source)!r}: training uses clip-level heads with known labels ({artifacts.LABELS_NAME})")
        head_sd = {k: v.detach().clone() for k, v in head.state_dict().items()}
        return Pretrained(config, sd, head_sd, {"classes": head.labels, "multilabel": head.multilabel})
    if not source.is_file():
        raise FileNotFoundError(f"no encoder at {str(source)!r} (expected a checkpoint file or a model directory)")
    state = artifacts.read_checkpoint(source)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return Pretrained(
            ATSTConfig.from_dict(state["encoder_config"]),
            state["encoder_state_dict"],
            state.get("head_state_dict"),
            state.get("head"),
        )
    converted = convert.convert(state)
    return Pretrained(converted.config, converted.state_dict)


def rng_state(device: torch.device, aug_rng: np.random.Generator) -> dict:
    """This process's random state: torch CPU, CUDA (if used) and the augmentation generator."""
    state = {"torch": torch.get_rng_state(), "numpy": aug_rng.bit_generator.state}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device, aug_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug_rng.bit_generator.state = state["numpy"]
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
