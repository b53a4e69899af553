"""The four training objectives, each a ``Task`` the trainer drives.

A task owns its modules, turns a batch of waveforms into a loss (log-mel on the training device in
float32, with the encoder's own front end, i.e. its ``db_clamp``; augmentation; forward passes under
autocast), updates its EMA teacher after each optimizer step, and says what to export for inference.

- ``FramePretraining`` (ATST-Frame): one 10 s crop; view 1 clean, view 2 with mixup and a
  frequency-only random-resize-crop; one block mask per clip shared by both views. The student
  sees both views with masked patches replaced by ``mask_embed``, the EMA teacher sees them
  unmasked; BYOL loss on the masked frames, symmetric: (teacher v1, student v2) and (teacher v2,
  student v1), averaged.
- ``ClipPretraining`` (ATST-Clip): two independent crops, each with mixup and random-resize-crop;
  BYOL loss on the [CLS] outputs, (teacher v1, student v2) and (teacher v2, student v1), averaged.
- ``Finetuning``: encoder + linear head on the clip-level embedding (ATST-Clip: [CLS | mean of
  tokens] of the last block, 6.01 s chunks; ATST-Frame: mean of tokens, 10.01 s chunks), with
  mixup and random-resize-crop, layer-wise learning-rate decay.
- ``C2FDistillation`` (ATST-C2F): an ATST-Frame student with a linear head learns from a frozen
  fine-tuned teacher (in eval mode) and the labels: lambda * L(student, teacher) + (1 - lambda) *
  L(student, labels).

Classification loss, as the official code chooses it (``--loss`` overrides, see ``config.finalize``):
binary cross-entropy (against the teacher's sigmoid outputs for the distillation term) for
multi-label data; for single-label data, fine-tuning uses it too whenever mixup is on, C2F
uses cross-entropy (against the teacher's softmax).

BYOL heads: projector D -> 4096 -> 256 on student and teacher, predictor 256 -> 4096 -> 256 on
the student; each term is 2 - 2 cos(prediction, teacher projection). The teacher is a copy of
the student without predictor, not trained by gradients but in train mode (drop-path and batch
statistics active), moved after every step by an EMA of the student encoder and projector
parameters (not the batch-norm buffers).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import frontend, pooling
from ..backbone import layer_lr_scale as layer_scale  # the one layer-wise lr rule
from ..chunks import encode_chunks, gather
from ..model import ATSTConfig, ATSTEncoder
from . import augment
from .config import TrainConfig
from .heads import linear_head, mlp_head

# ---------------------------------------------------------------------------- shared pieces


def autocast(device: torch.device, precision: str):
    """bf16 autocast on the training device, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos(prediction, target) over rows; (N, d) each, float32, target without grad."""
    return (2.0 - 2.0 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)).mean()


#: ``collapse_std`` below this means the features are collapsing (see ``collapse_std``).
COLLAPSE_STD = 0.1


def collapse_std(x: torch.Tensor) -> torch.Tensor:
    """How spread out a batch of features is: sqrt(D) x the mean over features of the std over
    samples of the L2-normalised rows. (N, D) -> scalar, float32.

    Scale-free: about 1 for features spread evenly in all directions (each normalised coordinate
    then has std 1/sqrt(D)), 0 when every row points the same way (collapse). Below
    ``COLLAPSE_STD`` (0.1) the representation is collapsing.
    """
    x = F.normalize(x.detach().float(), dim=-1)
    return x.std(dim=0).mean() * x.shape[-1] ** 0.5


def classification_loss(logits: torch.Tensor, target: torch.Tensor, bce: bool) -> torch.Tensor:
    """Binary cross-entropy with logits (``bce``), or cross-entropy with probability targets; (B, C) each."""
    logits = logits.float()
    if bce:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, bce: bool) -> torch.Tensor:
    """Student logits against the teacher's sigmoid outputs (``bce``) or its softmax (cross-entropy)."""
    teacher = teacher.detach().float()
    soft = torch.sigmoid(teacher) if bce else torch.softmax(teacher, dim=-1)
    return classification_loss(student, soft, bce)


def pooled_features(encoder: ATSTEncoder, mel: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """Clip-level embedding of the last block, with gradients, chunked and pooled as in ``pooling``.

    ATST-Clip: [mean over chunks of the [CLS] output | mean over chunks of the token average]
    (6.01 s chunks, with the official divisor); ATST-Frame: mean over 10.01 s chunks of the token
    average. mel (B, n_mels, T), n_frames (B,) -> (B, 2 D) for ATST-Clip, (B, D) for ATST-Frame.
    """
    cfg = encoder.cfg
    plan: list[pooling.Chunk] = []
    for i, n in enumerate(n_frames.tolist()):
        if cfg.has_cls:
            plan += pooling.clip_chunks(i, int(n), cfg.clip_chunk_frames, cfg.patch_w)
        else:
            plan += pooling.frame_chunks(i, int(n), cfg.spec_w, cfg.patch_w)
    n_tokens = [c.tokens for c in plan]
    out = encode_chunks(encoder, gather(mel, plan), n_tokens, [cfg.depth - 1])
    sums = pooling.masked_token_sum(out.tokens, torch.tensor(n_tokens))  # (C, 1, D) float32
    cls = None if out.cls is None else out.cls.float()
    return pooling.pool_clip_vectors(plan, sums, cls, items=list(range(mel.shape[0])))  # (B, [2] D)


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay applies to parameters with ndim > 1 that are not biases (pos_embed etc. included)."""
    return p.ndim > 1 and not name.endswith(".bias")


def grouped(named: list[tuple[str, nn.Parameter, float]], weight_decay: bool) -> list[dict]:
    """Optimizer groups by (lr scale, decayed?) from (name, param, lr scale) triples of trainable params."""
    groups: dict[tuple[float, bool], dict] = {}
    for name, p, scale in named:
        if not p.requires_grad:
            continue
        key = (scale, weight_decay and decays(name, p))
        groups.setdefault(key, {"params": [], "lr_scale": scale, "apply_wd": key[1]})["params"].append(p)
    return list(groups.values())


@dataclass
class Export:
    """What inference needs: the encoder (our names) and, for classifiers, the clip-level head
    (``norm.*``, ``linear.*``) with ``head_meta = {"classes": [...], "multilabel": bool}``."""

    config: ATSTConfig
    state_dict: dict[str, torch.Tensor]
    head_state_dict: dict[str, torch.Tensor] | None = None
    head_meta: dict | None = None


def _inference_config(cfg: ATSTConfig) -> ATSTConfig:
    return replace(cfg, drop_path_rate=0.0)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


class Task:
    """Base class: modules, the trainable one (wrapped by DDP), a loss per batch, the export."""

    name = ""

    def __init__(self, cfg: TrainConfig, device: torch.device, rng: np.random.Generator):
        self.cfg = cfg
        self.device = device
        self.rng = rng
        self.trainable: nn.Module  # set by subclasses; the optimizer trains its parameters
        self.encoder_cfg: ATSTConfig  # set by subclasses: the trained encoder (and its front end)
        self.forward_trainable: Callable | None = None  # the DDP wrapper, set by the trainer

    # -- to be provided
    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        raise NotImplementedError

    def export(self) -> Export:
        raise NotImplementedError

    def spec(self) -> dict:
        """What rebuilding the modules needs (encoder configs, classes), stored in checkpoints."""
        raise NotImplementedError

    # -- shared
    def after_step(self, step: int, ema_momentum: float | None) -> None:
        """Called after each optimizer step (EMA teachers override it)."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def memory_steps(self) -> int:
        """How many of the latest steps' batches ``rebuild_memory`` needs after a resume (0: none)."""
        return 0

    def rebuild_memory(self, batches: Iterable[dict], steps: int) -> None:
        """Rebuild state that lives in the data stream (the mixup memory) from the last ``steps`` batches."""

    def run_trainable(self, *args, **kwargs):
        return (self.forward_trainable or self.trainable)(*args, **kwargs)

    def log_mel(
        self, wav: torch.Tensor, lengths: torch.Tensor, encoder_cfg: ATSTConfig | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) waveforms -> (B, 64, T) float32 log-mel on the training device, (B,) frames (CPU).

        The front end is the one of the encoder (``encoder_cfg``, default the trained encoder's):
        its ``db_clamp`` (ATST-SED / PretrainedSED checkpoints: [-50, 80] dB) is applied, so an
        encoder is trained on the mels it is used with at inference.
        """
        db_clamp = (encoder_cfg or self.encoder_cfg).db_clamp
        return frontend.log_mel(wav.to(self.device, non_blocking=True), lengths, db_clamp=db_clamp)

    def train_mode(self) -> None:
        for m in self.modules().values():
            m.train()


# ---------------------------------------------------------------------------- BYOL pretraining


class BYOLNetwork(nn.Module):
    """Encoder -> (selected frames or [CLS]) -> projector (-> predictor)."""

    def __init__(self, encoder: ATSTEncoder, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor

    def forward(
        self,
        mel: torch.Tensor,
        n_tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 64, T) -> (outputs (M, d), encoder features (M, D)).

        ``select`` (B, P) bool picks frames (M = its count); without it the [CLS] output is used (M = B).
        """
        out = self.encoder.forward_intermediates(mel, n_tokens, token_mask=token_mask)  # the last block
        feats = out.cls[:, 0] if select is None else out.tokens[:, 0][select]  # (M, D)
        z = self.projector(feats)
        if self.predictor is not None:
            z = self.predictor(z)
        return z, feats


class BYOLPretraining(Task):
    """Student (encoder, projector, predictor) trained by gradients; teacher = EMA of the student."""

    views = 1  # crops per clip, each remembered by the mixup memory once per step

    def __init__(self, cfg: TrainConfig, device: torch.device, rng: np.random.Generator, encoder_cfg: ATSTConfig, sync_bn: bool):
        super().__init__(cfg, device, rng)
        self.encoder_cfg = encoder_cfg
        encoder = ATSTEncoder(encoder_cfg)
        student = BYOLNetwork(
            encoder,
            mlp_head(encoder_cfg.embed_dim, cfg.head_hidden, cfg.head_out),
            mlp_head(cfg.head_out, cfg.head_hidden, cfg.head_out),
        )
        if sync_bn:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = student.to(device)
        self.student.encoder.gradient_checkpointing = cfg.gradient_checkpointing
        self.teacher = BYOLNetwork(copy.deepcopy(self.student.encoder), copy.deepcopy(self.student.projector)).to(device)
        self.teacher.encoder.gradient_checkpointing = False
        self.teacher.requires_grad_(False)
        self.trainable = self.student
        self.mixup = augment.MixupMemory(cfg.mixup_memory, cfg.mixup_ratio)
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def param_groups(self) -> list[dict]:
        return grouped([(n, p, 1.0) for n, p in self.student.named_parameters()], weight_decay=True)

    def spec(self) -> dict:
        return {"student_encoder": self.encoder_cfg.to_dict()}

    @torch.no_grad()
    def after_step(self, step: int, ema_momentum: float | None) -> None:
        """teacher = m * teacher + (1 - m) * student, over encoder and projector parameters."""
        if self._ema_pairs is None:
            s = list(self.student.encoder.parameters()) + list(self.student.projector.parameters())
            t = list(self.teacher.encoder.parameters()) + list(self.teacher.projector.parameters())
            self._ema_pairs = ([p.data for p in t], [p.data for p in s])
        teacher, student = self._ema_pairs
        torch._foreach_mul_(teacher, ema_momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - ema_momentum)

    def extra_state(self) -> dict:
        return {"mixup": self.mixup.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.mixup.load_state_dict(state["mixup"])

    def memory_steps(self) -> int:
        """Steps whose clean views refill the mixup memory (every view of a step is remembered)."""
        per_step = min(self.cfg.batch_size, self.mixup.size) * self.views
        return -(-self.mixup.rows_needed(self.cfg.batch_size) // per_step) if per_step else 0

    def rebuild_memory(self, batches: Iterable[dict], steps: int) -> None:
        """Remember the clean views of the last ``steps`` batches again, in training order."""
        target = self.mixup.rewind(steps * min(self.cfg.batch_size, self.mixup.size) * self.views)
        for batch in batches:
            for wav, lengths in batch["views"]:
                self.mixup.remember(*self.log_mel(wav, lengths))
        if self.mixup.writes != target:
            raise RuntimeError(f"the mixup memory was rebuilt to {self.mixup.writes} writes, expected {target}")

    def export(self) -> Export:
        return Export(_inference_config(self.encoder_cfg), _cpu_state(self.teacher.encoder))

    def metrics(self, loss: torch.Tensor, s_feat: torch.Tensor, t_feat: torch.Tensor) -> dict:
        return {"loss": loss.detach(), "std_student": collapse_std(s_feat), "std_teacher": collapse_std(t_feat)}


class FramePretraining(BYOLPretraining):
    name = "frame"  # one crop: its clean log-mel is remembered, the mixed view is derived from it

    def training_step(self, batch: dict):
        wav, lengths = batch["views"][0]
        mel, n_frames = self.log_mel(wav, lengths)  # (B, 64, T): one crop, both views
        view2 = self.mixup(mel, n_frames, self.rng)
        if self.cfg.rrc:
            view2 = augment.random_resize_crop(view2, n_frames, self.rng, (1.0, 1.0), (0.6, 1.5), (1.0, 1.0))
        b = mel.shape[0]
        mask = augment.block_mask(b, mel.shape[-1] // self.encoder_cfg.patch_w, self.cfg.mask_ratio, self.cfg.mask_span, self.rng)
        m = int(mask.sum())  # masked patches per view (mask is on the CPU: no device sync)
        mask = mask.to(self.device, non_blocking=True)
        mels, masks = torch.cat([mel, view2]), torch.cat([mask, mask])  # (2B, 64, T), (2B, P)
        with autocast(self.device, self.cfg.precision):
            pred, s_feat = self.run_trainable(mels, None, token_mask=masks, select=masks)  # (2M, d)
            with torch.no_grad():
                target, t_feat = self.teacher(mels, None, select=masks)
        loss = 0.5 * (byol_loss(pred[m:], target[:m]) + byol_loss(pred[:m], target[m:]))
        out = self.metrics(loss, s_feat, t_feat)
        out["masked_fraction"] = m / (b * masks.shape[1])
        return loss, out


class ClipPretraining(BYOLPretraining):
    name = "clip"
    views = 2  # two crops, each mixed and then remembered

    def __init__(self, cfg, device, rng, encoder_cfg, sync_bn):
        super().__init__(cfg, device, rng, encoder_cfg, sync_bn)
        self.student.encoder.mask_embed.requires_grad_(False)  # no masking in ATST-Clip

    def _view(self, wav: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel, n_frames = self.log_mel(wav, lengths)
        mel = self.mixup(mel, n_frames, self.rng)
        if self.cfg.rrc:
            mel = augment.random_resize_crop(mel, n_frames, self.rng)
        return mel, n_frames

    def training_step(self, batch: dict):
        (mel1, nf1), (mel2, nf2) = (self._view(w, n) for w, n in batch["views"])
        width = max(mel1.shape[-1], mel2.shape[-1])
        mels = torch.cat([F.pad(mel1, (0, width - mel1.shape[-1])), F.pad(mel2, (0, width - mel2.shape[-1]))])
        n_tokens = torch.cat([nf1, nf2]) // self.encoder_cfg.patch_w
        b = mel1.shape[0]
        with autocast(self.device, self.cfg.precision):
            pred, s_feat = self.run_trainable(mels, n_tokens)  # (2B, d)
            with torch.no_grad():
                target, t_feat = self.teacher(mels, n_tokens)
        loss = 0.5 * (byol_loss(pred[b:], target[:b]) + byol_loss(pred[:b], target[b:]))
        return loss, self.metrics(loss, s_feat, t_feat)


# ---------------------------------------------------------------------------- supervised


class Classifier(nn.Module):
    """Encoder + linear head on the pooled last-block embedding (see ``pooled_features``)."""

    def __init__(self, encoder: ATSTEncoder, classes: list[str]):
        super().__init__()
        self.encoder = encoder
        cfg = encoder.cfg
        self.head = linear_head(cfg.embed_dim * (2 if cfg.has_cls else 1), len(classes), list(classes))

    def forward(self, mel: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
        """mel (B, 64, T), n_frames (B,) -> logits (B, C)."""
        return self.head(pooled_features(self.encoder, mel, n_frames))


def build_classifier(encoder_cfg: ATSTConfig, classes: list[str], state: dict | None = None) -> Classifier:
    model = Classifier(ATSTEncoder(encoder_cfg), classes)
    model.encoder.mask_embed.requires_grad_(False)  # no masking when classifying
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


class SupervisedTask(Task):
    """Shared by fine-tuning and C2F: augmentation, layer-wise lr groups, export of encoder + head."""

    def __init__(self, cfg, device, rng, encoder_cfg: ATSTConfig, classes: list[str], multilabel: bool, sync_bn: bool):
        super().__init__(cfg, device, rng)
        self.encoder_cfg = encoder_cfg
        self.classes = list(classes)
        self.multilabel = multilabel
        model = build_classifier(encoder_cfg, classes)
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        self.model.encoder.gradient_checkpointing = cfg.gradient_checkpointing
        self.trainable = self.model
        if cfg.loss == "ce" and multilabel:
            raise ValueError("cross-entropy is for single-label data; multi-label training uses binary cross-entropy")
        self.bce = cfg.loss != "ce"

    def param_groups(self) -> list[dict]:
        depth, decay = self.encoder_cfg.depth, self.cfg.layer_decay
        named = []
        for name, p in self.model.named_parameters():
            if name.startswith("encoder."):
                named.append((name, p, layer_scale(name[len("encoder.") :], depth, decay)))
            else:
                named.append((name, p, 1.0))
        return grouped(named, weight_decay=self.cfg.weight_decay > 0)

    def augment(self, mel: torch.Tensor, n_frames: torch.Tensor, target: torch.Tensor | None):
        if target is not None:
            mel, n_frames, target = augment.mix_batch(mel, n_frames, target, self.rng, self.cfg.mixup_prob, self.cfg.mixup_alpha)
        if self.cfg.rrc:
            mel = augment.random_resize_crop(mel, n_frames, self.rng)
        return mel, n_frames, target

    def batch(self, batch: dict, other: ATSTConfig | None = None):
        """(mel, n_frames, target, other_mel): the augmented log-mel (B, 64, T), (B,) frames, (B, C)
        targets (or ``None``), and, when ``other`` (an encoder config) has another front end (another
        ``db_clamp``), that front end's log-mel with the very same augmentation (same random draws);
        ``None`` when the front ends are the same (then ``mel`` serves both)."""
        wav, lengths = batch["views"][0]
        target = batch["target"].to(self.device, non_blocking=True) if "target" in batch else None
        mel, n_frames = self.log_mel(wav, lengths)
        if other is None or other.db_clamp == self.encoder_cfg.db_clamp:
            return (*self.augment(mel, n_frames, target), None)
        before = copy.deepcopy(self.rng.bit_generator.state)
        out = self.augment(mel, n_frames, target)
        after = self.rng.bit_generator.state
        self.rng.bit_generator.state = before  # replay the same draws on the other front end's mel
        other_mel = self.augment(*self.log_mel(wav, lengths, other), target)[0]
        self.rng.bit_generator.state = after
        return (*out, other_mel)

    def export(self) -> Export:
        enc = _cpu_state(self.model.encoder)
        head = _cpu_state(self.model.head)
        return Export(_inference_config(self.encoder_cfg), enc, head, {"classes": self.classes, "multilabel": self.multilabel})


class Finetuning(SupervisedTask):
    name = "finetune"

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def spec(self) -> dict:
        return {"student_encoder": self.encoder_cfg.to_dict(), "classes": self.classes, "multilabel": self.multilabel}

    def training_step(self, batch: dict):
        mel, n_frames, target, _ = self.batch(batch)
        with autocast(self.device, self.cfg.precision):
            logits = self.run_trainable(mel, n_frames)
        loss = classification_loss(logits, target, self.bce)
        return loss, {"loss": loss.detach()}


class C2FDistillation(SupervisedTask):
    """ATST-Frame student + head; frozen fine-tuned teacher (eval mode) gives soft targets."""

    name = "c2f"

    def __init__(self, cfg, device, rng, encoder_cfg, teacher: Classifier, teacher_meta: dict, sync_bn: bool):
        if encoder_cfg.family != "frame":
            raise ValueError(f"c2f trains an ATST-Frame student; --init holds an ATST-{encoder_cfg.family} encoder")
        super().__init__(cfg, device, rng, encoder_cfg, teacher_meta["classes"], teacher_meta["multilabel"], sync_bn)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.teacher_meta = dict(teacher_meta)

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.model, "teacher": self.teacher}

    def train_mode(self) -> None:
        self.model.train()
        self.teacher.eval()

    def spec(self) -> dict:
        return {
            "student_encoder": self.encoder_cfg.to_dict(),
            "teacher_encoder": self.teacher.encoder.cfg.to_dict(),
            "teacher_head": self.teacher_meta,
            "classes": self.classes,
            "multilabel": self.multilabel,
        }

    def training_step(self, batch: dict):
        # Each network sees the mels of its own front end (the teacher's may clamp the dB differently).
        mel, n_frames, target, teacher_mel = self.batch(batch, self.teacher.encoder.cfg)
        lam = self.cfg.distill_weight
        with autocast(self.device, self.cfg.precision):
            logits = self.run_trainable(mel, n_frames)
            with torch.no_grad():
                teacher_logits = self.teacher(mel if teacher_mel is None else teacher_mel, n_frames)
        loss_d = distillation_loss(logits, teacher_logits, self.bce)
        metrics = {"loss_distill": loss_d.detach()}
        if target is None:
            if lam < 1.0:
                raise ValueError("c2f with --distill-weight < 1 needs labels: pass a CSV with 'file' and 'labels' as --data")
            loss = loss_d
        else:
            loss_c = classification_loss(logits, target, self.bce)
            loss = lam * loss_d + (1.0 - lam) * loss_c
            metrics["loss_label"] = loss_c.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics
