"""Build the optimizer over a model's trainable parameters.

Parameter groups follow common practice (GPT-3, Llama): weight decay on matrices of linear layers
only; never on norms, biases or embeddings, where it only pulls useful scales towards zero.
"""

from __future__ import annotations

import torch
from torch import nn

from hasten.config import ConfigError, OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (2-D+ non-embedding weights) and the rest."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied weights appear once
        (decay if param.ndim >= 2 and id(param) not in embedding_params else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _use_fused(cfg: OptimConfig, device: torch.device) -> bool:
    if cfg.fused == "on" and device.type != "cuda":
        raise ConfigError(f"optim.fused='on' needs a CUDA device, but the run is on {device.type}; use optim.fused=auto.")
    return cfg.fused == "on" or (cfg.fused == "auto" and device.type == "cuda")


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer; `lr` is the peak rate, which the loop scales by the schedule."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("The model has no trainable parameters; unfreeze some before training.")
    if cfg.name == "adamw":
        fused = _use_fused(cfg, device)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 fused=fused or None, foreach=None if fused else True)
    raise ConfigError(f"optim.name={cfg.name!r} is not allowed: choose adamw.")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, steps): what ZeRO would shard."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))
