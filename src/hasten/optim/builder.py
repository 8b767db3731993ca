"""Build the optimizer over a model's trainable parameters.

Parameter groups follow common practice (GPT-3, Llama): weight decay on matrices of linear layers
only; never on norms, biases or embeddings, where it only pulls useful scales towards zero.
A group may carry `lr_scale`: the loop sets its rate to `lr_scale` times the scheduled rate.

Each optimizer `optim.name` can select is a builder registered below; docs/optimizers.md says
what each one does and when to pick it.
"""

from __future__ import annotations

import importlib.util
import shutil

import torch
from torch import nn

from hasten.config import ConfigError, OptimConfig
from hasten.optim.hooks import set_train_mode
from hasten.optim.lion import Lion
from hasten.optim.muon import CombinedOptimizer, MuonNS, muon_params
from hasten.optim.registry import optimizer_spec, register_optimizer
from hasten.optim.sophia import SophiaG


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()) -> list[dict]:
    """Split trainable parameters into a decayed group (2-D+ non-embedding weights) and the rest.

    Parameters whose id is in `exclude` are left out (another optimizer owns them)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set(exclude)
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


def _needs_package(module: str, extra: str = "optim") -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"it needs the `{module}` package (pip install 'hasten[{extra}]')"
    return None


def _adamw8bit_unavailable(device: torch.device) -> str | None:
    if reason := _needs_package("torchao"):
        return reason
    if device.type not in ("cpu", "cuda"):
        return f"torchao's 8-bit states run on CPU and CUDA only, not {device.type}"
    if device.type == "cpu":
        from hasten.train.build import cpu_compiler  # here: hasten.train.build imports this module

        if shutil.which(cpu_compiler()) is None:
            return (f"on CPU torchao compiles its 8-bit step with torch.compile, which needs a C++ compiler "
                    f"({cpu_compiler()!r} not found)")
    return None


@register_optimizer("adamw", "Adam with decoupled weight decay: the baseline (fused kernel on GPU)")
def build_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = _use_fused(cfg, device)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None, foreach=None if fused else True)


@register_optimizer("sophia", "SophiaG: momentum clipped by a diagonal Gauss-Newton Hessian estimate (Liu et al. 2023)")
def build_sophia(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return SophiaG(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.sophia_beta1, cfg.sophia_beta2),
                   rho=cfg.sophia_rho, weight_decay=cfg.weight_decay, hessian_every=cfg.sophia_hessian_every,
                   bias_correction=cfg.sophia_bias_correction)


@register_optimizer("lion", "Lion: sign of interpolated momentum, one state tensor (Chen et al. 2023)")
def build_lion(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return Lion(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.lion_beta1, cfg.lion_beta2))


@register_optimizer("muon", "Muon on hidden matrices (Newton-Schulz orthogonalized momentum), AdamW on the rest")
def build_muon(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    matrices = muon_params(model)
    if not matrices:
        raise ConfigError("optim.name=muon found no hidden 2-D weight matrices in the model; use optim.name=adamw.")
    muon_group = {"params": matrices, "weight_decay": cfg.weight_decay, "lr_scale": cfg.muon_lr_scale}
    muon = MuonNS([muon_group], lr=cfg.lr * cfg.muon_lr_scale, momentum=cfg.muon_momentum, nesterov=True,
                  ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr,
                  momentum_warmup=cfg.muon_momentum_warmup, momentum_start=cfg.muon_momentum_start)
    rest = param_groups(model, cfg.weight_decay, exclude={id(p) for p in matrices})
    if not rest:
        return CombinedOptimizer([muon])
    fused = _use_fused(cfg, device)
    adamw = torch.optim.AdamW(rest, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              fused=fused or None, foreach=None if fused else True)
    return CombinedOptimizer([muon, adamw])


@register_optimizer("adafactor", "Adafactor: factored second moments, memory sublinear in matrix size (torch.optim)")
def build_adafactor(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                 beta2_decay=cfg.adafactor_beta2_decay, d=cfg.adafactor_clip)


@register_optimizer("schedulefree_adamw", "schedule-free AdamW: iterate averaging replaces the lr decay (Defazio et al. 2024)",
                    schedule_free=True, unavailable=lambda device: _needs_package("schedulefree"))
def build_schedulefree_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    # warmup_steps=0: hasten's schedule does the warmup, and nothing else (build_schedule).
    optimizer = AdamWScheduleFree(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, warmup_steps=0)
    set_train_mode(optimizer, True)  # it refuses to step in eval mode, which is where it starts
    return optimizer


@register_optimizer("adamw8bit", "AdamW with block-wise 8-bit moments (torchao): about a quarter of AdamW's state",
                    unavailable=_adamw8bit_unavailable)
def build_adamw8bit(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit

    return AdamW8bit(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer; `lr` is the peak rate, which the loop scales by the schedule."""
    if not param_groups(model, cfg.weight_decay):
        raise ConfigError("The model has no trainable parameters; unfreeze some before training.")
    spec = optimizer_spec(cfg.name)
    if reason := spec.unavailable(device):
        raise ConfigError(f"optim.name={cfg.name} cannot run here: {reason}.")
    return spec.build(model, cfg, device)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: tensor subclasses (8-bit states, DTensor shards) count their inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return sum(_tensor_bytes(x) for x in inner if isinstance(x, torch.Tensor))  # DTensor also names its mesh
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, steps): what ZeRO would shard."""
    return sum(_tensor_bytes(t) for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))
