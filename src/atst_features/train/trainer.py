"""The training loop: data, task, DDP, optimizer, schedules, logs and checkpoints.

One ``Trainer`` per process. Under ``torchrun`` every process builds the same modules (same seed),
wraps the trainable one in ``DistributedDataParallel`` (batch norms of the heads become
``SyncBatchNorm`` on CUDA) and reads its share of the data through a ``DistributedSampler``; rank 0
writes logs and checkpoints.

Start-up, in this order, so that bad settings and bad data stop the run before anything is built:
list the data, scan it (``scan``), read ``--init`` / ``--teacher``, check the crop against the
encoder, turn epochs into steps (``config.finalize``); then build the task, the data loader, the
optimizer and the schedule, restore a checkpoint (and rebuild the mixup memory from the data
stream), and print the start (or resume) line.

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
from tqdm.auto import tqdm

from ..model import ATSTConfig
from . import checkpoint, data, distributed, scan
from .config import LR_REFERENCE_BATCH, TrainConfig, crop_problems, finalize
from .logs import LOG_NAME, CSVLog, TensorBoardLog
from .schedules import Schedule
from .tasks import COLLAPSE_STD, C2FDistillation, ClipPretraining, Finetuning, FramePretraining, Task, build_classifier

FAMILY_OF_COMMAND = {"frame": "frame", "clip": "clip", "c2f": "frame"}


def _encoder_config(cfg: TrainConfig, family: str) -> ATSTConfig:
    return ATSTConfig(
        family=family, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, drop_path_rate=cfg.drop_path
    )


def _from_init(cfg: TrainConfig, family: str | None) -> checkpoint.Pretrained:
    pre = checkpoint.load_pretrained(cfg.init)
    if family is not None and pre.config.family != family:
        raise ValueError(f"--init {cfg.init!r} holds an ATST-{pre.config.family} encoder; `{cfg.command}` needs ATST-{family}")
    return pre


def _teacher(source: str) -> checkpoint.Pretrained:
    """The fine-tuned C2F teacher (encoder + head) from a finetune checkpoint or its export directory."""
    pre = checkpoint.load_pretrained(source)
    if pre.head_state_dict is None or pre.head_meta is None:
        raise ValueError(f"--teacher {source!r} has no classification head; pass a checkpoint (or export/) written by `finetune`")
    return pre


def _teacher_classifier(pre: checkpoint.Pretrained) -> nn.Module:
    model = build_classifier(replace(pre.config, drop_path_rate=0.0), pre.head_meta["classes"])
    model.encoder.load_state_dict(pre.state_dict, strict=True)
    model.head.load_state_dict(pre.head_state_dict, strict=True)
    return model


def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


class Trainer:
    """Build everything for ``cfg`` (a resolved ``TrainConfig``), optionally from a checkpoint, then ``fit()``."""

    def __init__(self, cfg: TrainConfig, saved: dict | None = None, env: distributed.DistEnv | None = None):
        self.env = env or distributed.env_from_torchrun()
        self.device = distributed.resolve_device(cfg.device, self.env)
        distributed.init_process_group(self.env, self.device)
        self.out = Path(cfg.out)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng([cfg.seed, self.env.rank, 1])  # augmentation decisions of this process
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.cfg = cfg
        self.report = self.out / scan.REPORT_NAME
        self.skipped_files = 0  # files that failed to decode during training, all processes

        # -- what the run needs, read and checked before anything is built
        spec = saved["task"] if saved else {}
        teacher_pre = teacher_meta = None
        if cfg.command == "c2f":
            teacher_meta = spec["teacher_head"] if spec else None
            if not spec:
                teacher_pre = _teacher(cfg.teacher)
                teacher_meta = teacher_pre.head_meta
        files, targets, classes, multilabel = self._data(spec, teacher_meta)
        files, targets = self._scan(files, targets)
        pre, enc_cfg = self._encoder(spec)
        self._check_crops(enc_cfg)
        self.cfg = cfg = finalize(cfg, enc_cfg.family, self._batches_per_epoch(len(files)), multilabel)

        # -- build
        teacher = None
        if cfg.command == "c2f":
            if spec:  # rebuilt from the checkpoint; weights come with the modules
                teacher = build_classifier(ATSTConfig.from_dict(spec["teacher_encoder"]), teacher_meta["classes"])
            else:
                teacher = _teacher_classifier(teacher_pre)
        self.task = self._build_task(enc_cfg, pre, classes, multilabel, teacher, teacher_meta)
        self.dataset = data.CropDataset(files, self._crops(), seed=cfg.seed, targets=targets)
        self.sampler = data.ResumableSampler(self.dataset, self.env.world_size, self.env.rank, cfg.seed, cfg.batch_size)
        self.loader = self._loader(self.sampler, persistent=True)
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.task.forward_trainable = DistributedDataParallel(self.task.trainable, device_ids=ids)
            self._broadcast_frozen_modules()
        self.optimizer = self._optimizer()
        self.schedule = Schedule(
            lr=cfg.lr * self.global_batch / LR_REFERENCE_BATCH,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            weight_decay=cfg.weight_decay,
            weight_decay_end=cfg.weight_decay_end,
            ema=cfg.ema if cfg.pretraining else None,
        )
        self.step = 0
        self._say(self._start_line(pre is not None))
        if saved:
            self._restore(saved)
        else:
            torch.manual_seed(cfg.seed + 7919 * (self.env.rank + 1))  # per-process drop-path streams
        self.csv = self.tb = None
        if self.env.is_main:
            self.csv = CSVLog(self.out / LOG_NAME, resume_step=self.step if saved else None)
            if cfg.tensorboard:
                self.tb = TensorBoardLog(self.out / "tensorboard")
        self._warned_collapse = False

    @property
    def global_batch(self) -> int:
        return self.env.world_size * self.cfg.batch_size

    # ------------------------------------------------------------------ construction

    def _say(self, line: str) -> None:
        """A status line on rank 0's stderr (above the progress bar, if one is shown)."""
        if self.env.is_main:
            tqdm.write(f"[{self.cfg.command}] {line}", file=sys.stderr)

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

    def _scan(self, files: list[Path], targets: torch.Tensor | None) -> tuple[list[Path], torch.Tensor | None]:
        """Leave out unusable files (listed in ``OUT/data_report.csv``); an error with ``--strict-data``."""
        cfg, env = self.cfg, self.env
        merge = None
        if env.distributed:
            merge = lambda found: distributed.all_gather(found, env)  # noqa: E731
        result = scan.scan(
            files, cfg.data, cfg.num_workers, (env.rank, env.world_size), merge, show=env.is_main and cfg.progress
        )
        if env.is_main:
            scan.write_report(self.report, result.problems)
        self._say(scan.summary(len(files), result, self.report))
        if result.problems and cfg.strict_data:
            first = result.problems[0]
            raise ValueError(
                f"{len(result.problems)} training files are unusable (first: {first.path!r}, {first.reason}); "
                f"see {self.report}, or drop --strict-data to skip them"
            )
        if not result.keep:
            raise ValueError(f"none of the {len(files)} training files is usable; see {self.report}")
        kept = [files[i] for i in result.keep]
        return kept, (targets[result.keep] if targets is not None else None)

    def _encoder(self, spec: dict) -> tuple[checkpoint.Pretrained | None, ATSTConfig]:
        """The encoder to start from (``--init``, read but not built) and its config."""
        cfg = self.cfg
        if spec:
            return None, ATSTConfig.from_dict(spec["student_encoder"])
        if cfg.init:
            pre = _from_init(cfg, FAMILY_OF_COMMAND.get(cfg.command))
            return pre, replace(pre.config, drop_path_rate=cfg.drop_path)
        return None, _encoder_config(cfg, cfg.family or "clip")

    def _check_crops(self, enc_cfg: ATSTConfig) -> None:
        """Pretraining crops must fit one forward pass of the encoder (checked again for ``--init``'s geometry)."""
        problems = crop_problems(self.cfg, enc_cfg)
        if problems:
            raise ValueError("; ".join(problems))

    def _batches_per_epoch(self, n_files: int) -> int:
        """Full batches each process gets per epoch (``DistributedSampler`` drops the tail)."""
        per_epoch = n_files // self.env.world_size // self.cfg.batch_size
        if per_epoch < 1:
            raise ValueError(
                f"{n_files} usable training files are too few for {self.env.world_size} process(es) x batch size "
                f"{self.cfg.batch_size}; pass more data or a smaller --batch-size"
            )
        return per_epoch

    def _build_task(self, enc_cfg, pre, classes, multilabel, teacher, teacher_meta) -> Task:
        cfg = self.cfg
        sync_bn = self.env.distributed and self.device.type == "cuda"
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

    def _loader(self, sampler, persistent: bool = False) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=data.collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=persistent and workers > 0,
            generator=torch.Generator(),  # keeps the global RNG untouched by new iterators (exact resume)
        )

    def _optimizer(self) -> torch.optim.Optimizer:
        groups = self.task.param_groups()
        if self.cfg.pretraining:
            fused = self.device.type == "cuda"
            return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, fused=fused)
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)

    def _start_line(self, from_init: bool) -> str:
        """What runs: task, encoder, data, steps, global batch, lr, optimizer, loss, precision, device."""
        cfg, enc = self.cfg, self.task.encoder_cfg
        per_epoch = self.sampler.batches_per_epoch
        start = f"from {cfg.init}" if from_init else "from scratch"
        what = (
            f"ATST-{enc.family.capitalize()} {enc.embed_dim}-d x {enc.depth} blocks "
            f"({_millions(self.task.trainable):.2f} M trainable parameters, {start})"
        )
        if enc.db_clamp is not None:
            what += f", front end with dB clamp [{enc.db_clamp[0]:g}, {enc.db_clamp[1]:g}]"
        batches = f"{per_epoch} batch{'es' if per_epoch != 1 else ''}"
        steps = f"{cfg.max_steps} steps ({cfg.max_steps / per_epoch:.3g} epochs of {batches}), warm-up {cfg.warmup_steps}"
        batch = f"global batch {self.global_batch} ({self.env.world_size} process(es) x {cfg.batch_size})"
        lr = f"lr {cfg.lr * self.global_batch / LR_REFERENCE_BATCH:.4g} ({cfg.lr:g} per 256)"
        if cfg.pretraining:
            how = f"AdamW, EMA {cfg.ema:g}"
        else:
            how = f"SGD, layer decay {cfg.layer_decay:g}, {cfg.loss.upper()} loss, recipe {cfg.recipe}"
            if cfg.command == "c2f":
                how += f", distill weight {cfg.distill_weight:g}"
        return f"{what}; {len(self.dataset)} files; {steps}; {batch}; {lr}; {how}; {cfg.precision} on {self.device}"

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
        exact = len(states) == self.env.world_size and saved["schedule"] == self.schedule.to_dict()
        # The per-process extra state (the mixup ring position) is the same on every process.
        self.task.load_extra_state(states[min(self.env.rank, len(states) - 1)])
        rebuilt = self._rebuild_memory()
        if exact:
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
        where = f" ({saved['path']})" if saved.get("path") else ""
        memory = f"; mixup memory rebuilt from the last {rebuilt} steps' data" if rebuilt else ""
        self._say(f"resumed from step {self.step} of {self.cfg.max_steps}{where}{memory}")

    def _rebuild_memory(self) -> int:
        """Refill the state that lives in the data stream (the mixup memory) from the batches of the
        last steps before ``self.step``, read again in order; returns how many steps were read."""
        steps = min(self.task.memory_steps(), self.step)
        if steps == 0:
            return 0
        per_epoch = self.sampler.batches_per_epoch
        keys = [k for s in range(self.step - steps, self.step) for k in self.sampler.batch_keys(*divmod(s, per_epoch))]
        self.task.rebuild_memory(iter(self._loader(keys)), steps)
        return steps

    # ------------------------------------------------------------------ the loop

    def fit(self, save_checkpoints: bool = True) -> None:
        """Train until ``max_steps``; checkpoint every ``save_every`` steps and at the end."""
        cfg = self.cfg
        self.task.train_mode()
        per_epoch = self.sampler.batches_per_epoch
        acc: dict[str, torch.Tensor | float] = {}
        n_acc, t_last, saved_at = 0, time.perf_counter(), self.step
        pending: list[scan.Problem] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=cfg.command,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not (self.env.is_main and cfg.progress),
        )
        try:
            while self.step < cfg.max_steps:
                epoch, done = divmod(self.step, per_epoch)
                self.sampler.set_position(epoch, done)
                for batch in self.loader:
                    pending += [scan.Problem(p, r, f"step {self.step + 1}") for p, r in batch.pop("skipped", ())]
                    metrics = self._train_step(batch)
                    bar.update(1)
                    for k, v in metrics.items():
                        acc[k] = acc.get(k, 0.0) + v
                    n_acc += 1
                    last = self.step >= cfg.max_steps
                    if self.step % cfg.log_every == 0 or last:
                        self._note_skipped(pending)
                        pending = []
                        row = self._log(acc, n_acc, epoch, time.perf_counter() - t_last)
                        bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                        acc, n_acc, t_last = {}, 0, time.perf_counter()
                    if save_checkpoints and cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                        saved_at = self.step
                    if last:
                        break
        finally:
            bar.close()
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

    def _note_skipped(self, problems: list[scan.Problem]) -> None:
        """Count the files every process replaced since the last row; rank 0 reports them."""
        gathered = distributed.gather_to_main(problems, self.env)
        if not self.env.is_main:
            return
        new = [p for part in gathered for p in part]
        if not new:
            return
        self.skipped_files += len(new)
        scan.append_report(self.report, new)
        for p in new[:5]:
            self._say(f"warning: skipped {p.path!r} at {p.when} ({p.reason}); another file took its place")
        if len(new) > 5:
            self._say(f"warning: {len(new) - 5} more files skipped; see {self.report}")

    def _log(self, acc: dict, n: int, epoch: int, seconds: float) -> dict:
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
            self._check_collapse(row)
        row["skipped_files"] = self.skipped_files
        row["samples_per_s"] = n * self.global_batch / max(seconds, 1e-9)
        if self.device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.env.is_main:
            self.csv.write(row)
            if self.tb is not None:
                self.tb.write(row)
            if not self.cfg.progress:
                shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
                self._say(shown)
        return row

    def _check_collapse(self, row: dict) -> None:
        """Warn (once) when the teacher's features stop spreading out (``tasks.collapse_std``)."""
        if self._warned_collapse or row["std_teacher"] >= COLLAPSE_STD:
            return
        self._warned_collapse = True
        self._say(
            f"warning: std_teacher {row['std_teacher']:.3g} < {COLLAPSE_STD} at step {row['step']} (loss "
            f"{row['loss']:.3g}): the representation is collapsing; lower --lr or raise --ema"
        )

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
