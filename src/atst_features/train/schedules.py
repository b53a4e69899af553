"""Per-step schedules: learning rate, weight decay and EMA momentum, pure functions of the step.

Because they depend on the step alone, a resumed run continues them exactly; the checkpoint stores
the ``Schedule`` parameters so that a resume with different ones is refused.

- lr: linear warm-up from 0 to ``lr`` over ``warmup_steps`` (step 0 -> 0, step warmup-1 -> lr),
  then a half cosine from ``lr`` down to ``min_lr`` over the remaining steps;
- weight decay: half cosine from ``weight_decay`` (0.04) up to ``weight_decay_end`` (0.4) over all steps;
- EMA momentum: half cosine from ``ema`` up to 1 over all steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half cosine from ``start`` (step 0) to ``end`` (step ``total``); ``end`` after that."""
    if total <= 0 or step >= total:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total))


def warmup_cosine(step: int, base: float, final: float, total: int, warmup: int) -> float:
    """Linear warm-up 0 -> ``base`` over ``warmup`` steps, then cosine ``base`` -> ``final`` until ``total``."""
    if step < warmup:
        return base * step / (warmup - 1) if warmup > 1 else base
    return cosine(step - warmup, total - warmup, base, final)


@dataclass(frozen=True)
class Schedule:
    """Values of every per-step hyperparameter; ``lr`` is the effective (already batch-scaled) peak."""

    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    weight_decay: float = 0.0
    weight_decay_end: float = 0.0
    ema: float | None = None

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.lr, self.min_lr, self.max_steps, self.warmup_steps)

    def weight_decay_at(self, step: int) -> float:
        return cosine(step, self.max_steps, self.weight_decay, self.weight_decay_end)

    def ema_at(self, step: int) -> float:
        """EMA momentum for the update after step ``step``; 1 = teacher frozen."""
        if self.ema is None:
            raise ValueError("this schedule has no EMA teacher")
        return cosine(step, self.max_steps, self.ema, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)
