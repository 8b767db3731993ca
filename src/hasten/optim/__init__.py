"""Optimizers, parameter groups and learning-rate schedules."""

from hasten.optim.builder import build_optimizer, optimizer_state_bytes, param_groups
from hasten.optim.schedule import build_schedule, constant_with_warmup, warmup_cosine, warmup_stable_decay

__all__ = ["build_optimizer", "build_schedule", "constant_with_warmup", "optimizer_state_bytes", "param_groups",
           "warmup_cosine", "warmup_stable_decay"]
