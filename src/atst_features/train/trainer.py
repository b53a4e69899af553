"""The training loop: data, task, DDP, optimizer, schedules, logs and checkpoints.

One ``Trainer`` per process. Under ``torchrun`` every process builds the same modules (same seed),
wraps the trainable one in ``DistributedDataParallel`` (batch norms of the heads become
``SyncBatchNorm`` on CUDA) and reads its share of the data through a ``DistributedSampler``; rank 0
writes logs and checkpoints.

Per step: set lr and weight decay for the step; log-mel + augmentation + forward (bf16 autocast
if asked) + loss; backward; optional gradient clipping; optimizer step; EMA teacher update.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..model import ATSTConfig
from . import checkpoint, data, distributed
from .config import LR_REFERENCE_BATCH, TrainConfig
from .logs import LOG_NAME, CSVLog, TensorBoardLog
from .schedules import Schedule
from .tasks import C2FDistillation, ClipPretraining, Finetuning, FramePretraining, Task, build_classifier


def _encoder_config(cfg: TrainConfig, family: str) -> ATSTConfig:
    return ATSTConfig(
        family=family, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, drop_path_rate=cfg.drop_path
    )


def _from_init(cfg: TrainConfig, family: str | None) -> checkpoint.Pretrained:
    pre = checkpoint.load_pretrained(cfg.init)
    if family is not None and pre.config.family != family:
        raise ValueError(f"--init {cfg.init!r} holds an ATST-{pre.config.family} encoder; `{cfg.command}` needs ATST-{family}")
    return pre


def _teacher_classifier(source: str) -> tuple[nn.Module, dict]:
    """The fine-tuned C2F teacher (encoder + head) from a finetune checkpoint or its export directory."""
    pre = checkpoint.load_pretrained(source)
    if pre.head_state_dict is None or pre.head_meta is None:
        raise ValueError(f"--teacher {source!r} has no classification head; pass a checkpoint (or export/) written by `finetune`")
    model = build_classifier(replace(pre.config, drop_path_rate=0.0), pre.head_meta["classes"])
    model.encoder.load_state_dict(pre.state_dict, strict=True)
    model.head.load_state_dict(pre.head_state_dict, strict=True)
    return model, pre.head_meta


class Trainer:
    """Build everything for ``cfg`` (a resolved ``TrainConfig``), optionally from a checkpoint, then ``fit()``."""

    def __init__(self, cfg: TrainConfig, saved: dict | None = None, env: distributed.DistEnv | None = None):
        self.cfg = cfg
        self.env = env or distributed.env_from_torchrun()
        self.device = distributed.resolve_device(cfg.device, self.env)
        distributed.init_process_group(self.env, self.device)
        self.out = Path(cfg.out)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng([cfg.seed, self.env.rank, 1])  # augmentation decisions of this process
        torch.manual_seed(cfg.seed)  # identical initial weights on every process

        spec = saved["task"] if saved else {}
        teacher = teacher_meta = None
        if cfg.command == "c2f":
            teacher, teacher_meta = self._c2f_teacher(spec)
        files, targets, classes, multilabel = self._data(spec, teacher_meta)
        self.task = self._build_task(spec, classes, multilabel, teacher, teacher_meta)

        crops = self._crops()
        self.dataset = data.CropDataset(files, crops, seed=cfg.seed, targets=targets)
        self.sampler = data.ResumableSampler(self.dataset, self.env.world_size, self.env.rank, cfg.seed, cfg.batch_size)
        if self.sampler.batches_per_epoch < 1:
            raise ValueError(
                f"{len(files)} training files are too few for {self.env.world_size} process(es) x batch size "
                f"{cfg.batch_size}; pass more data or a smaller --batch-size"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            collate_fn=data.collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=cfg.num_workers > 0,
            generator=torch.Generator(),  # keeps the global RNG untouched by new iterators (exact resume)
        )

        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.task.forward_trainable = DistributedDataParallel(self.task.trainable, device_ids=ids)
            self._broadcast_frozen_modules()
        self.optimizer = self._optimizer()
        global_batch = self.env.world_size * cfg.batch_size
        self.schedule = Schedule(
            lr=cfg.lr * global_batch / LR_REFERENCE_BATCH,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end,
            ema=cfg.ema if cfg.pretraining else None,
        )
        self.step = 0
        if saved:
            self._restore(saved)
        else:
            torch.manual_seed(cfg.seed + 7919 * (self.env.rank + 1))  # per-process drop-path streams
        self.csv = self.tb = None
        if self.env.is_main:
            self.csv = CSVLog(self.out / LOG_NAME, resume_step=self.step if saved else None)
            if cfg.tensorboard:
                self.tb = TensorBoardLog(self.out / "tensorboard")

    # ------------------------------------------------------------------ construction

    def _c2f_teacher(self, spec: dict):
        if spec:  # rebuilt from the checkpoint; weights come with the modules
            meta = spec["teacher_head"]
            return build_classifier(ATSTConfig.from_dict(spec["teacher_encoder"]), meta["classes"]), meta
        return _teacher_classifier(self.cfg.teacher)

    def _data(self, spec: dict, teacher_meta: dict | None):
        """(files, targets or None, classes, multilabel) for the command."""
        cfg = self.cfg
        labelled = cfg.command in ("finetune", "c2f") and Path(cfg.data).suffix.lower() == ".csv"
        if cfg.command == "finetune" and not labelled:
            raise ValueError(f"finetune needs --data as a CSV with columns 'file' and 'labels', got {cfg.data!r}")
        if not labelled:
            if cfg.command == "c2f" and cfg.distill_weight < 1.0:
                raise ValueError("c2f with --distill-weight < 1 needs labels: pass a CSV with 'file' and 'labels' as --data")
            classes = teacher_meta["classes"] if teacher_meta else None
            return data.list_audio(cfg.data), None, classes, teacher_meta["multilabel"] if teacher_meta else None
        files, labels = data.read_label_csv(cfg.data, cfg.label_sep)
        if teacher_meta is not None:
            classes, multilabel = teacher_meta["classes"], teacher_meta["multilabel"]
        elif spec:
            classes, multilabel = spec["classes"], spec["multilabel"]
        else:
            classes = sorted({name for names in labels for name in names})
            multilabel = cfg.multilabel if cfg.multilabel is not None else any(len(n) > 1 for n in labels)
        if not multilabel and any(len(n) != 1 for n in labels):
            raise ValueError(f"{cfg.data!r}: single-label training needs exactly one label per file; pass --multilabel")
        return files, data.multi_hot(labels, classes), classes, multilabel

    def _build_task(self, spec, classes, multilabel, teacher, teacher_meta) -> Task:
        cfg = self.cfg
        sync_bn = self.env.distributed and self.device.type == "cuda"
        pre = None
        if spec:
            enc_cfg = ATSTConfig.from_dict(spec["student_encoder"])
        elif cfg.init:
            pre = _from_init(cfg, {"frame": "frame", "clip": "clip", "c2f": "frame"}.get(cfg.command))
            enc_cfg = replace(pre.config, drop_path_rate=cfg.drop_path)
        elif cfg.command == "c2f":
            raise ValueError("c2f fine-tunes a pretrained ATST-Frame: pass --init (a frame checkpoint or model directory)")
        else:
            enc_cfg = _encoder_config(cfg, cfg.family or "clip")
        args = (cfg, self.device, self.rng, enc_cfg)
        if cfg.command == "frame":
            task = FramePretraining(*args, sync_bn)
        elif cfg.command == "clip":
            task = ClipPretraining(*args, sync_bn)
        elif cfg.command == "finetune":
            task = Finetuning(*args, classes, multilabel, sync_bn)
        else:
            task = C2FDistillation(*args, teacher, teacher_meta, sync_bn)
        if pre is not None:
            for name, module in task.modules().items():
                if name == "teacher" and cfg.command == "c2f":
                    continue
                module.encoder.load_state_dict(pre.state_dict, strict=True)
        return task

    def _crops(self) -> list[data.Crop]:
        cfg = self.cfg
        if cfg.command == "frame":
            return [data.Crop(cfg.crop_seconds, pad=True)]  # one crop for both views, padded to full length
        if cfg.command == "clip":
            return [data.Crop(cfg.crop_seconds), data.Crop(cfg.positive_seconds)]
        return [data.Crop(cfg.crop_seconds)]

    def _optimizer(self) -> torch.optim.Optimizer:
        groups = self.task.param_groups()
        if self.cfg.pretraining:
            fused = self.device.type == "cuda"
            return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, fused=fused)
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)

    def _broadcast_frozen_modules(self) -> None:
        """Make the modules DDP does not wrap (teachers) bit-identical to rank 0's."""
        for module in self.task.modules().values():
            if module is self.task.trainable:
                continue
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, src=0)

    def _restore(self, saved: dict) -> None:
        for name, module in self.task.modules().items():
            module.load_state_dict(saved["modules"][name], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.step = int(saved["step"])
        states = saved["rank_states"]
        if len(states) == self.env.world_size and saved["schedule"] == self.schedule.to_dict():
            self.task.load_extra_state(states[self.env.rank])
            checkpoint.set_rng_state(states[self.env.rank]["rng"], self.device, self.rng)
        else:
            warnings.warn(
                f"resuming with {self.env.world_size} process(es) where the checkpoint had {len(states)} (or a "
                "different global batch): the learning rate follows the new batch and random streams start afresh, "
                "so the run does not continue bit-exactly",
                stacklevel=2,
            )
            self.rng = np.random.default_rng([self.cfg.seed, self.env.rank, self.step])
            self.task.rng = self.rng
            torch.manual_seed(self.cfg.seed + 7919 * (self.env.rank + 1) + self.step)

    # ------------------------------------------------------------------ the loop

    def fit(self, save_checkpoints: bool = True) -> None:
        """Train until ``max_steps``; checkpoint every ``save_every`` steps and at the end."""
        cfg = self.cfg
        self.task.train_mode()
        per_epoch = self.sampler.batches_per_epoch
        acc: dict[str, torch.Tensor | float] = {}
        n_acc, t_last, saved_at = 0, time.perf_counter(), self.step
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < cfg.max_steps:
            epoch, done = divmod(self.step, per_epoch)
            self.sampler.set_position(epoch, done)
            for batch in self.loader:
                metrics = self._train_step(batch)
                for k, v in metrics.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_acc += 1
                last = self.step >= cfg.max_steps
                if self.step % cfg.log_every == 0 or last:
                    self._log(acc, n_acc, epoch, time.perf_counter() - t_last)
                    acc, n_acc, t_last = {}, 0, time.perf_counter()
                if save_checkpoints and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
                if last:
                    break
        if save_checkpoints and saved_at != self.step:
            self.save()
        if self.tb is not None:
            self.tb.close()

    def _train_step(self, batch: dict) -> dict:
        lr, wd = self.schedule.lr_at(self.step), self.schedule.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            group["weight_decay"] = wd if group["apply_wd"] else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.task.training_step(batch)
        loss.backward()
        if self.cfg.clip_grad:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad).detach()
        self.optimizer.step()
        ema = self.schedule.ema_at(self.step) if self.schedule.ema is not None else None
        self.task.after_step(self.step, ema)
        self.step += 1
        return metrics

    def _log(self, acc: dict, n: int, epoch: int, seconds: float) -> None:
        values = {k: float(v) / n for k, v in acc.items()}  # one device sync per logged row
        values = distributed.mean_over_ranks(values, self.env, self.device)
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"the loss is {values['loss']} at step {self.step}; lower --lr, raise --ema, or use --precision fp32"
            )
        step = self.step - 1  # schedule values of the last step done
        row = {"step": self.step, "epoch": epoch, **values, "lr": self.schedule.lr_at(step)}
        if self.cfg.pretraining:
            row["weight_decay"] = self.schedule.weight_decay_at(step)
            row["ema_momentum"] = self.schedule.ema_at(step)
        row["samples_per_s"] = n * self.cfg.batch_size * self.env.world_size / max(seconds, 1e-9)
        if self.device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.env.is_main:
            self.csv.write(row)
            if self.tb is not None:
                self.tb.write(row)
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(f"[{self.cfg.command}] {shown}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0) and refresh ``OUT/export``; returns its path."""
        rank_state = {"rng": checkpoint.rng_state(self.device, self.rng), **self.task.extra_state()}
        states = distributed.gather_to_main(rank_state, self.env)
        path = None
        if self.env.is_main:
            export = self.task.export()
            state = {
                "format": checkpoint.FORMAT,
                "format_version": checkpoint.FORMAT_VERSION,
                "command": self.cfg.command,
                "step": self.step,
                "config": self.cfg.to_dict(),
                **checkpoint.export_entries(export),
                "task": self.task.spec(),
                "modules": {k: m.state_dict() for k, m in self.task.modules().items()},
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.to_dict(),
                "rank_states": states,
                "world_size": self.env.world_size,
            }
            path = checkpoint.checkpoint_path(self.out, self.step)
            checkpoint.save_atomic(state, path)
            checkpoint.write_export(export, self.out / checkpoint.EXPORT_DIR, self.cfg.command, self.step)
            checkpoint.prune(self.out, self.cfg.keep_checkpoints)
        distributed.barrier(self.env)
        return path

    def close(self) -> None:
        distributed.destroy_process_group()
