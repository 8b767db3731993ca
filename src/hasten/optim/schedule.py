"""Learning-rate schedules as pure functions of the step.

A schedule is a multiplier of the peak learning rate. Being a pure function of the step, it needs
no state of its own in a checkpoint: resuming at step s gives the same rate as running through s.

With `optim.horizon = "time"` the decay spans a time budget instead of a step count (budgeted
training, Li et al. 2020, found that a schedule ending with the budget beats one cut short;
docs/trainer.md has what hasten measured): after the warmup (in steps) the rate is the same shape
as a function of the fraction of `train.time_limit_s` spent, which the loop passes in. Runs
compared at equal wall time then all end with their rate decayed, whatever their speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hasten.config import OptimConfig

Schedule = Callable[..., float]  # (step, time_fraction=0.0) -> multiplier of the peak rate


def cosine_decay(progress: float, min_ratio: float) -> float:
    """From 1 at progress 0 down a half cosine to `min_ratio` at progress 1."""
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine_decay(min(1.0, (step - warmup) / max(1, total - warmup)), min_ratio)


def warmup_stable_decay(step: int, *, total: int, warmup: int, min_ratio: float, decay_fraction: float) -> float:
    """Linear warmup, a constant plateau, then a linear decay over the last `decay_fraction` of steps.

    WSD (Hu et al. 2024, MiniCPM): the plateau can be extended and a decay branched off anywhere.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total - max(1, int(decay_fraction * total))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return 1.0 - (1.0 - min_ratio) * progress


def constant_with_warmup(step: int, *, warmup: int) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def over_time(step: int, time_fraction: float, *, schedule: str, warmup: int, min_ratio: float,
              decay_fraction: float) -> float:
    """The schedule's shape over a time budget: linear warmup over `warmup` steps, then cosine (or
    plateau and linear decay over the last `decay_fraction` of the time, or constant) as a function
    of the fraction of the budget spent (clamped to [0, 1])."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, time_fraction))
    if schedule == "cosine":
        return cosine_decay(progress, min_ratio)
    if schedule == "wsd":
        decay_start = 1.0 - decay_fraction
        return 1.0 if progress < decay_start else 1.0 - (1.0 - min_ratio) * (progress - decay_start) / decay_fraction
    return 1.0


def build_schedule(cfg: OptimConfig, total_steps: int) -> Schedule:
    """The configured schedule as a function (step, time_fraction) -> multiplier of `cfg.lr`;
    time_fraction (the share of train.time_limit_s spent) is read only with optim.horizon=time.

    A schedule-free optimizer replaces the decay, so for it only the warmup is kept."""
    from hasten.optim.registry import optimizer_spec

    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    if optimizer_spec(cfg.name).schedule_free:
        return lambda s, time_fraction=0.0: constant_with_warmup(s, warmup=warmup)
    if cfg.horizon == "time":
        return lambda s, time_fraction=0.0: over_time(s, time_fraction, schedule=cfg.schedule, warmup=warmup,
                                                      min_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)
    if cfg.schedule == "cosine":
        return lambda s, time_fraction=0.0: warmup_cosine(s, total=total_steps, warmup=warmup,
                                                          min_ratio=cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        return lambda s, time_fraction=0.0: warmup_stable_decay(s, total=total_steps, warmup=warmup,
                                                                min_ratio=cfg.min_lr_ratio,
                                                                decay_fraction=cfg.decay_fraction)
    return lambda s, time_fraction=0.0: constant_with_warmup(s, warmup=warmup)
