"""Learning-rate schedules as pure functions of the step.

A schedule is a multiplier of the peak learning rate. Being a pure function of the step, it needs
no state of its own in a checkpoint: resuming at step s gives the same rate as running through s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hasten.config import OptimConfig

Schedule = Callable[[int], float]


def warmup_cosine(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def build_schedule(cfg: OptimConfig, total_steps: int) -> Schedule:
    """The configured schedule as a function step -> multiplier of `cfg.lr`.

    A schedule-free optimizer replaces the decay, so for it only the warmup is kept."""
    from hasten.optim.registry import optimizer_spec

    warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
    if optimizer_spec(cfg.name).schedule_free:
        return lambda s: constant_with_warmup(s, warmup=warmup)
    if cfg.schedule == "cosine":
        return lambda s: warmup_cosine(s, total=total_steps, warmup=warmup, min_ratio=cfg.min_lr_ratio)
    if cfg.schedule == "wsd":
        return lambda s: warmup_stable_decay(s, total=total_steps, warmup=warmup, min_ratio=cfg.min_lr_ratio,
                                             decay_fraction=cfg.decay_fraction)
    return lambda s: constant_with_warmup(s, warmup=warmup)
