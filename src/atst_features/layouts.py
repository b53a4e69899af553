"""The official checkpoint layouts, as data: how each kind of file's keys map onto the encoder,
its classification head and what is skipped, and the result of a conversion (``Converted``).

``convert`` reads this table; adding a layout is adding an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .model import ATSTConfig

SED_DB_CLAMP = (-50.0, 80.0)  # dB clamp of the mels ATST-SED and PretrainedSED trained on


@dataclass(frozen=True)
class Rule:
    """Keys under ``prefix`` play ``role``: "encoder", "head", "weak_head" (a second head, kept in
    ``Converted.extra_heads``) or "skip" (recognised, not converted).

    ``into`` replaces ``prefix`` in the part (``strong_head.weight`` -> ``linear.weight``);
    ``level`` is the level of a head the layout fixes ("clip": one vector per clip, "frame": one
    per 40 ms token); ``None`` = read off the head. ``name``: what a head is called
    (``convert(use_head=...)`` picks one); ``labels``: the bundled label set (``labelsets``) whose
    order the head emits, attached when the head's width matches it.
    """

    prefix: str
    role: str
    what: str
    into: str = ""
    level: str | None = None
    name: str = ""
    labels: str | None = None


@dataclass(frozen=True)
class Layout:
    """One official state-dict layout, recognised by ``marker`` (a key only this layout has).

    ``twin``: the prefix of a second copy of the encoder (the student of a teacher) that is
    skipped but must have as many blocks; ``db_clamp``: the dB clamp of the mels the encoder was
    trained on (``ATSTConfig.db_clamp``).
    """

    name: str
    description: str
    marker: str
    rules: tuple[Rule, ...]
    twin: str | None = None
    db_clamp: tuple[float, float] | None = None

    @property
    def head_level(self) -> str | None:
        return next((r.level for r in self.rules if r.role == "head"), None)


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
        twin="sed_student.atst_frame.atst.",
        db_clamp=SED_DB_CLAMP,
    ),
    Layout(
        "pretrainedsed",
        "PretrainedSED (fschmid56): ATST-Frame fine-tuned on AudioSet, frame-level (strong) and clip-level (weak) heads",
        "model.atst.pos_embed",
        (
            Rule("model.atst.", "encoder", "the fine-tuned ATST-Frame encoder"),
            Rule("strong_head.", "head", "the frame-level (strong) classifier", into="linear.", level="frame",
                 name="strong", labels="audioset-strong-447"),
            Rule("weak_head.", "weak_head", "the clip-level (weak) classifier", into="linear.", level="clip",
                 name="weak", labels="audioset-527"),
            _skip("model.atst_mel.", "front-end buffers (mel window and filterbank; recomputed, not weights)"),
        ),
        db_clamp=SED_DB_CLAMP,
    ),
    Layout(
        "c2f-as2m",
        "ATST-C2F distilled on AudioSet-2M (ATST-Frame student, fine-tuned ATST-Clip teacher)",
        "model.student.pos_embed",
        (
            Rule("model.student.", "encoder", "the ATST-Frame student: the C2F model"),
            Rule("model.linear.", "head", "the student's clip-level classifier", level="clip"),
            _skip("model.teacher.encoder.", "the fine-tuned ATST-Clip teacher used for distillation"),
            _skip("model.teacher.head.", "the ATST-Clip teacher's classifier"),
        ),
    ),
    Layout(
        "c2f-frame",
        "ATST-C2F at frame level (ATST-Frame student distilled from a frozen fine-tuned model)",
        "encoder.encoder.frame_encoder.pos_embed",
        (
            Rule("encoder.encoder.frame_encoder.", "encoder", "the ATST-Frame student"),
            _skip("encoder.encoder.teacher_module.", "the frozen fine-tuned teacher used for distillation"),
            Rule("head.", "head", "the frame-level classifier", level="frame"),
        ),
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
        twin="model.student.encoder.",
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


class HeadWeights(NamedTuple):
    """A classification head's weights (our ``LinearHead`` names), its level ("clip" or "frame")
    and its class names when known."""

    state_dict: dict[str, torch.Tensor]
    level: str
    labels: list[str] | None = None


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
        extra_heads: the file's other heads by name (PretrainedSED's clip-level ``"weak"`` head
            beside its frame-level ``"strong"`` head, or the reverse with ``convert(use_head="weak")``);
            not written by ``write_converted``.
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
    extra_heads: dict[str, HeadWeights] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines saying what was converted and what was skipped, for logs and the CLI."""
        c = self.config
        lines = [
            f"layout: {self.layout}",
            f"encoder: ATST-{c.family.capitalize()}, embed_dim {c.embed_dim}, depth {c.depth}, "
            f"{c.num_heads} heads ({len(self.state_dict)} tensors)",
        ]
        if c.db_clamp is not None:
            lines.append(f"front end: dB clamped to [{c.db_clamp[0]:g}, {c.db_clamp[1]:g}] after the 80 dB floor")
        heads = ([("head", HeadWeights(self.head, self.head_level))] if self.head is not None else [])
        for name, (sd, level, _) in heads + [(f"{k} head", v) for k, v in self.extra_heads.items()]:
            w = sd["linear.weight"]
            norm = ", with BatchNorm statistics" if "norm.running_mean" in sd else ""
            lines.append(f"{name}: {level}-level, {w.shape[1]} -> {w.shape[0]} classes{norm}")
        for what, keys in self.skipped.items():
            lines.append(f"skipped {len(keys)} keys: {what}")
        if self.unread_entries:
            lines.append(f"other entries of the file, not read: {', '.join(self.unread_entries)}")
        return "\n".join(lines)


