"""Activation checkpointing: keep a block's input, drop its intermediate activations, recompute them
in the backward pass. Costs about one extra forward of the checkpointed blocks (~33 % more compute
when every block is checkpointed) and saves their activations, the largest memory term at long
sequences.

Built on the public `torch.utils.checkpoint.checkpoint` (non-reentrant). The block's forward is
replaced on the instance instead of wrapping the block in another module, so parameter names, and
so checkpoints, are the same with and without checkpointing.

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

from torch import nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full", "selective", "budget")


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module) -> nn.Module:
    """Make `block` recompute its activations in backward; returns the same module."""
    block.forward = functools.partial(_checkpointed, block.forward)  # instance attribute: FQNs unchanged
    return block


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> int:
    """`full` checkpoints every block, `selective` every other one (blocks 0, 2, 4, …: about half the
    activation memory saved for half the recompute). Returns how many blocks were checkpointed."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(AC_MODES)}")
    every = {"none": 0, "full": 1, "selective": 2, "budget": 0}[mode]  # budget: set_memory_budget
    if not every:
        return 0
    chosen = [block for i, block in enumerate(blocks) if i % every == 0]
    for block in chosen:
        checkpoint_block(block)
    return len(chosen)


def set_memory_budget(budget: float) -> None:
    """Give torch.compile's partitioner an activation memory budget (process-wide, like its other
    settings; graphs compiled afterwards use it)."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = budget
