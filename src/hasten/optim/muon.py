"""Muon: momentum orthogonalized by Newton-Schulz (Keller Jordan et al. 2024; at scale: Liu et al.
2025, "Muon is Scalable for LLM Training", Moonlight).

For each 2-D hidden weight matrix W with gradient G:

    B = μ·B + (1-μ)·G;  U = (1-μ)·G + μ·B (Nesterov)
    O = NewtonSchulz5(U) ≈ U·(UᵀU)^(-1/2)       # the nearest semi-orthogonal matrix, 5 matmul steps
    W = W·(1 - lr·wd) - lr·scale(W)·O

Its authors apply it to hidden matrices only: embeddings, the output head, norms and biases (and
anything not 2-D) go to AdamW, in the same optimizer. `build_muon` makes that split and returns
one `CombinedOptimizer`, so the loop, checkpoints and `optimizer_state_bytes` see one optimizer.

`MuonNS`, written here, does the Muon part: the update of `torch.optim.Muon` (PyTorch 2.9+, the
reference its parity test compares against, with the same group keys so checkpoints move
between them), but with the matrices of one shape orthogonalized as one batch of matmuls. On
the 84 hidden matrices of the gpt2-124m model (4 shapes) its step takes 8.3 ms on an H200
against 31.7 ms for `torch.optim.Muon`, which runs Newton-Schulz matrix by matrix
(benchmarks/muon_step.py, results/muon_step.json); 7.8 ms against 32.3 ms once the momentum,
weight decay and update of unsharded matrices ran as multi-tensor (`torch._foreach_*`) kernels.
With Newton-Schulz forming its scaled sums inside the batched GEMMs (`baddbmm`): 6.2 ms against
46.0 ms (`torch.optim.Muon`'s own time varies between machines, 32 to 46 ms).

Sharded parameters (FSDP2, `parallel.strategy=zero2|zero3`): each rank holds a row shard of
every matrix as a DTensor (Shard(0)), but Newton-Schulz needs the whole matrix. `MuonNS` then
gathers each matrix's Nesterov update (`full_tensor()`: one all-gather per matrix and step),
orthogonalizes it, and keeps its own rows of the result; momentum buffers stay sharded like the
parameters, so the optimizer state is still divided by the world size. Given the same gradients
the step is the unsharded one, bit for bit (`torch.optim.Muon` has no such gather: on DTensors
its 2-rank steps fail).
Cost: every rank orthogonalizes every matrix, so the Newton-Schulz compute is repeated on each
rank rather than divided, and each rank holds one whole matrix (and its bf16 iterates) at a time.
Splitting the matrices among the ranks (as Moonlight's distributed Muon does) would divide that
compute; it is not done here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from hasten.optim.hooks import closure_loss

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, tuned for slope at zero (Keller Jordan)
BATCH_ELEMENTS = 2**27  # numbers per batched Newton-Schulz: 512 MiB of fp32 updates, a quarter of that per bf16 iterate


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize the matrix `G` (singular values pushed into ~[0.7, 1.2]), in
    bf16; `G` may hold a batch of matrices of one shape (..., rows, cols), done at once."""
    a, b, c = coefficients
    X = G.bfloat16()
    wide = G.size(-2) <= G.size(-1)
    X = X if wide else X.mT  # iterate on the side whose Gram matrix is smaller
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    batch = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # (batch, rows, cols): the scaled sums below run in the GEMMs' epilogues
    for _ in range(steps):
        gram = torch.bmm(X, X.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        X = torch.baddbmm(X, poly, X, beta=a)  # a * X + poly @ X
    X = X.reshape(*batch, *X.shape[-2:])
    return X if wide else X.mT


def adjusted_lr(lr: float, shape: torch.Size, mode: str) -> float:
    """Per-matrix rate: `original` scales by sqrt(max(1, rows/cols)); `match_rms_adamw` by
    0.2·sqrt(max(rows, cols)), which gives updates of AdamW's RMS so AdamW's rate carries over."""
    rows, cols = shape[0], shape[1]
    return lr * (math.sqrt(max(1.0, rows / cols)) if mode == "original" else 0.2 * math.sqrt(max(rows, cols)))


def orthogonalize(update: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """`newton_schulz(update)`; for a DTensor, of the whole matrix, returned in `update`'s layout.

    Every rank gathers the same matrix and orthogonalizes it, then keeps its own part
    (`src_data_rank=None`: no scatter, each rank slices its local copy by DTensor's chunking, which
    is FSDP2's, uneven and empty shards included).
    """
    if not isinstance(update, DTensor):
        return newton_schulz(update, steps, coefficients, eps)
    mesh, device = update.device_mesh, update.device
    # CPU offload on GPUs (shards on the CPU, NCCL mesh): gather and orthogonalize on the mesh's
    # device. The tests run on CPU meshes only, where this does nothing.
    if device.type != mesh.device_type:
        update = update.to(mesh.device_type)
    whole = newton_schulz(update.full_tensor(), steps, coefficients, eps)
    return distribute_tensor(whole, mesh, update.placements, src_data_rank=None).to(device)


def current_momentum(group: dict[str, Any]) -> float:
    """The group's momentum for this step, advancing its warmup count (MuonNS's momentum_warmup)."""
    warmup = group.get("momentum_warmup", 0)
    if not warmup:
        return group["momentum"]
    done = min(1.0, group["momentum_step"] / warmup)
    group["momentum_step"] += 1
    return group["momentum_start"] + done * (group["momentum"] - group["momentum_start"])


class MuonNS(torch.optim.Optimizer):
    """Muon on 2-D parameters: matrices of one shape orthogonalized together; sharded (DTensor)
    parameters gathered matrix by matrix, their momentum sharded like them."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str = "original", momentum_warmup: int = 0,
                 momentum_start: float = 0.85) -> None:
        # torch.optim.Muon's group keys: a checkpoint of either loads into the other (DCP loads the
        # groups too), e.g. one written sharded, with MuonNS, resumed in one process, with Muon.
        # With `momentum_warmup` > 0 the momentum rises linearly from `momentum_start` to `momentum`
        # over that many steps (modded-nanogpt's warmup, 0.85 -> 0.95 over 300 steps); the group
        # counts its steps in `momentum_step` (saved with the groups, so a resume continues the ramp).
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))
        if momentum_warmup > 0:
            for group in self.param_groups:
                group.update(momentum_warmup=momentum_warmup, momentum_start=momentum_start, momentum_step=0)
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D matrices only; give other parameters to AdamW.")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            mu, ns = current_momentum(group), (group["ns_steps"], tuple(group["ns_coefficients"]), group["eps"])
            params = [p for p in group["params"] if p.grad is not None]
            for p in (p for p in params if isinstance(p, DTensor)):  # gathered one matrix at a time (orthogonalize)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                self._apply(group, [p], [orthogonalize(update, *ns)])
            local = [p for p in params if not isinstance(p, DTensor)]
            if not local:
                continue
            # Momentum for every local matrix at once (multi-tensor kernels, not a launch per matrix).
            grads = [p.grad for p in local]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in local]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p, update in zip(local, updates):
                by_shape.setdefault((tuple(p.shape), p.device, p.dtype), []).append((p, update))
            # Matrices of one shape go through Newton-Schulz together, as one batch of matmuls:
            # a decoder has a handful of shapes, so a step runs a few batched products instead of
            # five rounds of three small ones per matrix. Batches stop at BATCH_ELEMENTS numbers,
            # which bounds the stacked copy and its iterates on large models.
            for items in by_shape.values():
                size = max(1, BATCH_ELEMENTS // items[0][0].numel())
                for start in range(0, len(items), size):
                    batch, batch_updates = zip(*items[start:start + size])
                    orthos = newton_schulz(torch.stack(batch_updates), *ns).to(batch[0].dtype)
                    self._apply(group, list(batch), list(orthos.unbind()))
        return loss

    @staticmethod
    def _apply(group: dict[str, Any], params: list[torch.Tensor], orthos: list[torch.Tensor]) -> None:
        """Decoupled weight decay, then the scaled orthogonalized step (one shape per call)."""
        if isinstance(params[0], DTensor):
            for p, ortho in zip(params, orthos):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(ortho, alpha=-adjusted_lr(group["lr"], p.shape, group["adjust_lr_fn"]))
            return
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, orthos, alpha=-adjusted_lr(group["lr"], params[0].shape, group["adjust_lr_fn"]))


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, behaving as one.

    The parameter groups are the children's own group dicts, in order, and all share one state
    dict, so setting a group's lr, `state_dict()`/`load_state_dict()` and DCP's `get_state_dict`
    work unchanged; `step()` steps each child.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], {})
        self._share()

    def _share(self) -> None:
        start = 0
        for opt in self.optimizers:
            count = len(opt.param_groups)
            opt.param_groups = self.param_groups[start:start + count]
            start += count
            self.state.update(opt.state)
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._share()


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output layer: `get_output_embeddings()` where the model defines it (Hugging Face
    models do), else the last `nn.Linear` it registers (hasten's decoder and nanoGPT-style models
    register the head last)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter) and getter() is not None:
        return getter()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The hidden 2-D matrices Muon should update: trainable, 2-D, not an embedding, not the head."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = output_head(model)
    if head is not None:
        excluded.update(id(p) for p in head.parameters())
    seen: set[int] = set()
    chosen = []
    for p in model.parameters():
        if p.requires_grad and p.ndim == 2 and id(p) not in excluded and id(p) not in seen:
            chosen.append(p)
        seen.add(id(p))
    return chosen
