"""Activation checkpointing: keep a block's input, drop its intermediate activations, recompute them
in the backward pass. Costs about one extra forward of the checkpointed blocks (~33 % more compute
when every block is checkpointed) and saves their activations, the largest memory term at long
sequences.

Built on the public `torch.utils.checkpoint.checkpoint` (non-reentrant). The block's forward is
replaced on the instance instead of wrapping the block in another module, so parameter names, and
so checkpoints, are the same with and without checkpointing.

`ops` checkpoints per operation inside each chosen block (selective activation checkpointing, as
torchtitan's `op` mode): the outputs of matmuls and attention kernels are kept, everything else
(norms, activations, element-wise products, casts) is recomputed from them in the backward pass.
It saves most of what `full` saves at a small part of its recompute.

Under torch.compile the partitioner honours the per-op choices, and keeping every matmul output
there can keep more than no checkpointing: a LoRA layer's frozen projection and its adapter's
output are both forced in, where the compiler alone keeps their sum. So when compiled, `ops`
keeps the attention outputs and the 16-bit sums (x W plus the scaled adapter output, bf16 residual
sums), leaves the matmul outputs to the compiler (it keeps those the backward needs and cannot
recompute), and recomputes the rest. On the CPU, a compiled 4-block LoRA model keeps 17.4 MiB for
backward without checkpointing, 19.6 MiB with the eager policy, 11.3 MiB with this one (the same
as `budget`).

`full` and `ops` apply to a fraction of the blocks (`parallel.activation_checkpoint_fraction`,
spread evenly), to trade memory for speed in finer steps; `selective` is `full` on every other block.

`budget` leaves the blocks alone and lets torch.compile choose: its min-cut partitioner, which
decides which forward values the backward keeps and which it recomputes, is given a memory budget
(`torch._functorch.config.activation_memory_budget`, a fraction of what it keeps by default) and
recomputes the cheapest values first (element-wise products and norms before matmuls), as
torchtitan's `memory_budget` mode does. It needs `train.compile`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                    noop_context_fn)

AC_MODES = ("none", "full", "selective", "ops", "budget")


def _saved_ops() -> frozenset:
    """The operations whose outputs `ops` keeps: matmuls and fused attention (those that exist here)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset(getattr(aten, name).default for name in names if hasattr(aten, name))


SAVED_OPS = _saved_ops()
ATTENTION_OPS = frozenset(op for op in SAVED_OPS if "scaled_dot_product" in str(op))
_HALF = (torch.bfloat16, torch.float16)


def _ops_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if not torch.compiler.is_compiling():
        return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    # Compiled: PREFER_SAVE leaves the value to the partitioner; PREFER_RECOMPUTE forces recompute.
    if op in ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op in SAVED_OPS:
        return CheckpointPolicy.PREFER_SAVE
    if op is torch.ops.aten.add.Tensor and all(a.dtype in _HALF for a in args if isinstance(a, torch.Tensor)):
        return CheckpointPolicy.MUST_SAVE  # 16-bit sums; fp32 ones (RoPE, upcasts) are cheaper to recompute
    return CheckpointPolicy.PREFER_RECOMPUTE


def _ops_context() -> Any:
    return create_selective_checkpoint_contexts(_ops_policy)


def _checkpointed(forward: Callable[..., Any], context_fn: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
    if context_fn is noop_context_fn:  # torch.compile refuses an explicit context_fn=noop_context_fn
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def checkpoint_block(block: nn.Module, ops: bool = False) -> nn.Module:
    """Make `block` recompute its activations in backward (with `ops`, all but the outputs of
    matmuls and attention); returns the same module."""
    context_fn = _ops_context if ops else noop_context_fn
    block.forward = functools.partial(_checkpointed, block.forward, context_fn)  # instance attribute: FQNs unchanged
    return block


def chosen_blocks(n: int, fraction: float) -> list[int]:
    """fraction * n block indices, rounded half up (at least one when fraction > 0), spread evenly from 0."""
    k = min(n, max(1, int(fraction * n + 0.5))) if fraction > 0 and n else 0
    return [i * n // k for i in range(k)]


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str, fraction: float = 1.0) -> int:
    """`full` checkpoints whole blocks, `ops` their element-wise work (see the module docstring), on
    `fraction` of the blocks; `selective` is `full` on every other block (0, 2, 4, …). Returns how many
    blocks were checkpointed."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(AC_MODES)}")
    if mode in ("none", "budget"):  # budget: set_memory_budget
        return 0
    indices = list(range(0, len(blocks), 2)) if mode == "selective" else chosen_blocks(len(blocks), fraction)
    for i in indices:
        checkpoint_block(blocks[i], ops=mode == "ops")
    return len(indices)


def set_memory_budget(budget: float) -> None:
    """Give torch.compile's partitioner an activation memory budget (process-wide, like its other
    settings; graphs compiled afterwards use it)."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = budget
