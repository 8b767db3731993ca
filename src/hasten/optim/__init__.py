"""Optimizers, parameter groups and learning-rate schedules.

`optim.name` selects one of the registered optimizers (`optimizer_names()`); SophiaG and Lion are
written here, and Muon's step (MuonNS, batched by matrix shape). docs/optimizers.md compares them.
"""

from hasten.optim.builder import build_optimizer, optimizer_state_bytes, param_groups
from hasten.optim.hooks import evaluation_weights, set_train_mode, wants_hessian
from hasten.optim.lion import Lion
from hasten.optim.muon import CombinedOptimizer, MuonNS, muon_params, newton_schulz
from hasten.optim.registry import (
           OptimizerSpec,
           optimizer_names,
           optimizer_spec,
           register_optimizer,
)
from hasten.optim.schedule import (
           build_schedule,
           constant_with_warmup,
           warmup_cosine,
           warmup_stable_decay,
)
from hasten.optim.sophia import SophiaG, sampled_label_loss

__all__ = ["CombinedOptimizer", "Lion", "MuonNS", "OptimizerSpec", "SophiaG", "build_optimizer", "build_schedule",
           "constant_with_warmup", "evaluation_weights", "muon_params", "newton_schulz", "optimizer_names",
           "optimizer_spec", "optimizer_state_bytes", "param_groups", "register_optimizer", "sampled_label_loss",
           "set_train_mode", "wants_hessian", "warmup_cosine", "warmup_stable_decay"]
