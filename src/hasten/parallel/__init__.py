"""Data parallelism over torchrun ranks: DDP, ZeRO-1/2/3, CPU offload, activation checkpointing.

    model = apply_parallelism(model, cfg.parallel, device, param_dtype=torch.bfloat16)
    optimizer = wrap_optimizer(build_optimizer(model, ...), cfg.parallel)   # ZeRO-1 only
    for micro in range(accum):
        with gradient_sync(model, enabled=micro == accum - 1):
            loss(model, batch).backward()

Everything here is torch.distributed: FSDP2 `fully_shard`, `DistributedDataParallel`,
`ZeroRedundancyOptimizer`, DCP; processes are started by torchrun. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hasten.config import ConfigError, ParallelConfig
from hasten.parallel.ac import apply_activation_checkpointing, checkpoint_block, set_memory_budget
from hasten.parallel.ddp import local_optimizer, replicate_model, shard_optimizer_states
from hasten.parallel.env import init_distributed, rank_and_world, rank_device, shutdown_distributed
from hasten.parallel.fsdp import clip_grad_norm_, grad_norm, is_sharded, local, shard_model

STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3")

__all__ = ["STRATEGIES", "apply_activation_checkpointing", "apply_parallelism", "checkpoint_block", "clip_grad_norm_",
           "grad_norm", "gradient_sync", "init_distributed", "is_sharded", "memory_bytes", "rank_and_world",
           "rank_device", "set_memory_budget", "shard", "shutdown_distributed", "unwrap", "wrap_optimizer",
           "zero_memory_bytes"]


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that checkpointing, compilation and sharding act on one by one: the model's
    `layers` ModuleList (hasten's decoders, Llama-style models); a model without one has none."""
    layers = getattr(model, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def check_launch(cfg: ParallelConfig, world_size: int) -> None:
    """Refuse the combinations that would silently do the wrong thing."""
    if cfg.strategy == "none" and world_size > 1:
        raise ConfigError(f"{world_size} processes were launched but parallel.strategy=none would train "
                          f"{world_size} unrelated copies; set parallel.strategy=ddp, zero1, zero2 or zero3.")
    if cfg.strategy != "none" and not dist.is_initialized():
        raise ConfigError(f"parallel.strategy={cfg.strategy} needs a process group; launch with "
                          "`torchrun --nproc-per-node N -m hasten train ...`.")


def apply_parallelism(model: nn.Module, cfg: ParallelConfig, device: torch.device, *,
                      param_dtype: torch.dtype | None = None, compile_mode: str | None = None) -> nn.Module:
    """Apply, in this order, activation checkpointing → compile → sharding (per block, then root).

    `param_dtype` (bf16/fp16) is the dtype FSDP gathers weights in; `compile_mode` (None = no
    compilation) compiles each block on its own. Returns the model to train (DDP wraps it).
    """
    blocks = blocks_of(model)
    if cfg.activation_checkpointing in ("full", "selective", "ops") and not blocks:
        raise ConfigError("parallel.activation_checkpointing needs a model whose blocks are in a `layers` "
                          "nn.ModuleList; set it to none for this model.")
    # 1. Checkpointing first: it replaces each block's forward, so the compiled code below contains
    #    the recompute, and FSDP's gather hooks stay outside it (weights are gathered once per backward).
    apply_activation_checkpointing(nn.ModuleList(blocks), cfg.activation_checkpointing,
                                   cfg.activation_checkpoint_fraction)
    # 2. Compile block by block, before sharding: each block is one graph that FSDP's communication
    #    between blocks does not break, and blocks of one shape share the compiled code.
    if compile_mode is not None:
        for block in blocks:
            block.compile(mode=None if compile_mode == "default" else compile_mode)
    # 3. Distribute: shard each block then the root (ZeRO-2/3), or replicate the whole (DDP, ZeRO-1).
    if cfg.strategy in ("zero2", "zero3"):
        return shard_model(model, blocks, reshard_after_forward=cfg.strategy == "zero3",
                           cpu_offload=cfg.cpu_offload, param_dtype=param_dtype, device=device)
    if cfg.strategy in ("ddp", "zero1"):
        return replicate_model(model, device)
    return model


def shard(model: nn.Module, strategy: str = "zero3", *, cpu_offload: bool = False,
          activation_checkpointing: str = "none", device: torch.device | None = None) -> nn.Module:
    """`apply_parallelism` for a user's own loop, with the process group already started."""
    cfg = ParallelConfig(strategy=strategy, cpu_offload=cpu_offload, activation_checkpointing=activation_checkpointing)
    device = device or next(model.parameters()).device
    return apply_parallelism(model, cfg, device)


def wrap_optimizer(optimizer: torch.optim.Optimizer, cfg: ParallelConfig) -> torch.optim.Optimizer:
    """ZeRO-1 shards the optimizer states; every other strategy keeps the optimizer as built."""
    return shard_optimizer_states(optimizer) if cfg.strategy == "zero1" else optimizer


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Communicate gradients only when `enabled` (the last micro-batch of a step): earlier micro-batches
    accumulate locally, so accumulation costs one all-reduce / reduce-scatter per step, not per micro-batch."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for `t`: a DTensor's local shard; a tensor subclass (8-bit optimizer
    states) its inner tensors."""
    t = local(t)
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for inner in (getattr(t, n) for n in names) if isinstance(inner, torch.Tensor))
    return t.numel() * t.element_size()


def _bytes(tensors: Any) -> int:
    return sum(tensor_bytes(t) for t in tensors)


def memory_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds between steps: parameter, gradient (one per trainable parameter, in the
    parameter's dtype, as after backward) and optimizer-state bytes; sharded tensors count their shard."""
    for module in model.modules():  # an eval forward leaves FSDP's unresharded blocks whole: shard them back
        if is_sharded(module):
            module.reshard()
    params = list(unwrap(model).parameters())
    states = [t for state in local_optimizer(optimizer).state.values() for t in state.values()
              if isinstance(t, torch.Tensor)]
    return dict(param_bytes=_bytes(params), grad_bytes=_bytes(p for p in params if p.requires_grad),
                optimizer_state_bytes=_bytes(states))


def zero_memory_bytes(num_params: int, strategy: str, world_size: int, *, param_bytes: int = 2,
                      grad_bytes: int = 2, optimizer_bytes: int = 12) -> dict[str, float]:
    """Model-state bytes per rank, the accounting of the ZeRO paper (Rajbhandari et al., 2020, §3).

    The defaults are mixed-precision Adam: bf16 weights (2) and gradients (2), fp32 master weights,
    momentum and variance (12): 16 bytes per parameter. ZeRO-1 divides the optimizer term by the
    world size, ZeRO-2 also the gradients, ZeRO-3 also the weights; DDP divides nothing. hasten keeps
    fp32 weights and gradients and Adam's two fp32 moments (4 + 4 + 8), also 16 bytes per parameter.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    n = world_size
    shard_optim, shard_grads, shard_params = (strategy in s for s in (("zero1", "zero2", "zero3"),
                                                                     ("zero2", "zero3"), ("zero3",)))
    result = dict(param_bytes=num_params * param_bytes / (n if shard_params else 1),
                  grad_bytes=num_params * grad_bytes / (n if shard_grads else 1),
                  optimizer_state_bytes=num_params * optimizer_bytes / (n if shard_optim else 1))
    result["total_bytes"] = sum(result.values())
    return result
