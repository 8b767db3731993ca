"""What autograd keeps for backward: the measure behind the memory tests of checkpointing, the
residual dtype and the chunked loss (a compiled graph's saved tensors pass through the same hooks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# What a compiled graph keeps for backward is chosen before any code is generated: by AOTAutograd's
# min-cut partitioner over the graph Inductor's decompositions give. This backend runs those same
# steps and then the graphs eagerly, without the C++ code generation that takes most of a CPU test's
# time (the three tests that call kept_for_backward: 124 s under Inductor, 21 s under this backend).
# Inductor's own joint-graph passes can shift a few small saved tensors (compared on those three: a
# bool mask of the targets in place of the targets, one bf16 weight-sized tensor more or less), never
# the activations the tests count; for the Mamba-2 mixer's tests, the same bytes and dtypes.
PARTITIONER = "aot_eager_decomp_partition"


def compiled_for_saved(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` compiled as far as deciding what its backward keeps (see PARTITIONER)."""
    return torch.compile(fn, backend=PARTITIONER)


def kept_for_backward(loss_fn: Callable[..., torch.Tensor], params: Iterable[torch.Tensor], *args
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Compile `loss_fn` (`compiled_for_saved`), run it once (compilation outside the count), then once
    more recording the tensors kept for its backward that are not `params`; runs that backward, so the
    params' grads are those of the second run. Returns the kept tensors and the loss."""
    params = list(params)
    torch._dynamo.reset()  # what the compiler keeps must not depend on what earlier tests compiled
    compiled = compiled_for_saved(loss_fn)
    compiled(*args).backward()
    for p in params:
        p.grad = None
    weights = {p.untyped_storage().data_ptr() for p in params}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = compiled(*args)
    loss.backward()
    return [t for t in saved if t.untyped_storage().data_ptr() not in weights], loss


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_by_forward(module: Callable[..., torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors one forward of `module(x)` keeps for backward (parameters and x among them); runs
    the backward of its output's sum."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = module(x)
    out.float().sum().backward()
    return saved


def kept_storage_bytes(module: Callable[..., torch.Tensor], params: Iterable[torch.Tensor], x: torch.Tensor) -> int:
    """Bytes of the storages one forward of `module(x)` keeps for backward, `params` and `x` left out,
    each storage counted once (views of one tensor share it); runs the backward."""
    saved = saved_by_forward(module, x)
    skip = {p.untyped_storage().data_ptr() for p in [*params, x]}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in storages.items() if ptr not in skip)
