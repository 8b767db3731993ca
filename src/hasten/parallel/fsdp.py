"""ZeRO-2 and ZeRO-3 with FSDP2 (`fully_shard`): parameters, gradients and optimizer states are
sharded over the ranks as DTensors, one communication group (all-gather, reduce-scatter) per block.

    zero3  reshard_after_forward=True:  a block's full weights exist only while it runs (forward and
           again in backward); every state is divided by the world size.
    zero2  reshard_after_forward=False: the weights gathered in forward stay until backward, which
           saves the second all-gather; parameters are held whole between forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor


def shard_model(model: nn.Module, blocks: list[nn.Module], *, reshard_after_forward: bool, cpu_offload: bool,
                param_dtype: torch.dtype | None, device: torch.device) -> nn.Module:
    """Shard each block, then the root (embedding, final norm, head and anything left over).

    Blocks first, so that each block is its own all-gather unit and only one block's full weights
    (two with prefetching) exist at a time; the root holds whatever no block claimed.
    Gradients are reduced in fp32 whatever the compute dtype, so that bf16 does not round the average.
    The mesh is one of the run's device type: FSDP's own default is a GPU mesh wherever a GPU is
    visible, which a run on the CPU of such a machine (train.device=cpu) must not get.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by backward: resharding them is waste.
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
                    mp_policy=mp_policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy,
                offload_policy=offload)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm as a plain tensor (the same on every rank).

    With sharded gradients each rank holds part of the sum of squares; `full_tensor()` all-reduces
    it, so every rank sees the norm of the whole gradient, exactly as one process would.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
    return total.full_tensor() if isinstance(total, DTensor) else total


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (see `grad_norm`) to `max_norm` and return it."""
    total = grad_norm(params)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total
