"""AdamW whose CUDA step is one Triton kernel per parameter group, over every tensor of the group.

torch's fused AdamW walks the parameters in `multi_tensor_apply` launches of a few dozen tensors
each and, when GradScaler's divisor is set (hasten's loop clips through it, see
hasten.train.guard.step_if_finite), writes every divided gradient back: 32 bytes moved a parameter
in fp32. Here one launch per group reads parameter, gradient and the two moments and writes back
parameter and moments (28 bytes), each program finding its tensor's addresses in a small table
(the grouped-GEMM tutorial's pointer arrays): at GPT-2-124M's size on an H200, benchmarks/adamw_step.py.

The class is torch.optim.AdamW (fused=True) with the same state (`step` a float32 device tensor,
`exp_avg`, `exp_avg_sq`), so checkpoints move between the two; `step` runs torch's fused kernel
instead wherever this one does not apply: amsgrad, maximize, tensor hyper-parameters, sparse or
non-fp32 tensors, sizes not a multiple of 16 elements (the kernel's vector loads assume it), or
no Triton. The update is torch's (fused_adam_utils.cuh's math, in fp32); the gradient is read,
divided by `grad_scale` when set, and left as it was.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 2048  # elements a program updates at a time
ITERS = 8  # blocks a program updates, one after another (its table lookups paid once)
NUM_WARPS = 4
STAGES = 2
STREAM = False
_COLUMNS = 6  # a table row: addresses of parameter, gradient, exp_avg, exp_avg_sq, step; then numel


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_update(table_ptr, blocks_ptr, scale_ptr, found_inf_ptr, lr, beta1, beta2, eps, weight_decay,
                     HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                     STAGES: tl.constexpr, STREAM: tl.constexpr):
        pid = tl.program_id(0)
        tensor = tl.load(blocks_ptr + 2 * pid)
        first = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64) * (BLOCK * ITERS)
        row = table_ptr + tensor.to(tl.int64) * 6
        p_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.float32)), 16)
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
        m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
        v_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
        step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        numel = tl.load(row + 5)
        if HAS_INF:  # a skipped step moves nothing
            numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
        numel = tl.multiple_of(numel, 16)  # the caller's promise: vector loads never straddle the end
        step = tl.load(step_ptr) + 1.0  # the step being taken (the caller counts it after this kernel)
        step_size = lr / (1.0 - tl.exp2(step * tl.log2(beta1)))
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.log2(beta2)))
        inv_scale = 1.0
        if HAS_SCALE:
            inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)
        for i in tl.range(0, ITERS, num_stages=STAGES):
            at = first + i * BLOCK + tl.arange(0, BLOCK)
            live = at < numel
            if STREAM:  # every byte is touched once: keep none of it in L2
                g = tl.load(g_ptr + at, mask=live, other=0.0, eviction_policy="evict_first") * inv_scale
                p = tl.load(p_ptr + at, mask=live, other=0.0, eviction_policy="evict_first")
                m = tl.load(m_ptr + at, mask=live, other=0.0, eviction_policy="evict_first")
                v = tl.load(v_ptr + at, mask=live, other=0.0, eviction_policy="evict_first")
            else:
                g = tl.load(g_ptr + at, mask=live, other=0.0) * inv_scale
                p = tl.load(p_ptr + at, mask=live, other=0.0)
                m = tl.load(m_ptr + at, mask=live, other=0.0)
                v = tl.load(v_ptr + at, mask=live, other=0.0)
            p = p - lr * weight_decay * p
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
            if STREAM:
                tl.store(p_ptr + at, p, mask=live, cache_modifier=".cs")
                tl.store(m_ptr + at, m, mask=live, cache_modifier=".cs")
                tl.store(v_ptr + at, v, mask=live, cache_modifier=".cs")
            else:
                tl.store(p_ptr + at, p, mask=live)
                tl.store(m_ptr + at, m, mask=live)
                tl.store(v_ptr + at, v, mask=live)

    return adamw_update


@functools.cache
def available() -> bool:
    """Whether the kernel can run here: CUDA and an importable Triton."""
    from hasten.models.ops import triton_cross_entropy

    return triton_cross_entropy.available()


class _Tables:
    """A group's device tables: the addresses (rebuilt when any tensor moves: the gradients are new
    tensors each step, usually at the caching allocator's same addresses) and each program's
    (tensor, part), fixed by the sizes."""

    def __init__(self) -> None:
        self.key: tuple[int, ...] = ()
        self.table: torch.Tensor | None = None
        self.sizes: tuple[int, ...] = ()
        self.blocks: torch.Tensor | None = None

    def get(self, tensors: list[list[torch.Tensor]], device: torch.device,
            block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The addresses' table and, for each program, (tensor, which `block` elements of it)."""
        params = tensors[0]
        sizes = (block, *(p.numel() for p in params))
        if sizes != self.sizes:
            pairs = [(i, j) for i, n in enumerate(sizes[1:]) for j in range(-(-n // block))]
            self.blocks = torch.tensor(pairs, dtype=torch.int32).to(device)
            self.sizes = sizes
        key = tuple(t.data_ptr() for column in tensors for t in column)
        if key != self.key:
            rows = [[*(column[i].data_ptr() for column in tensors), p.numel()] for i, p in enumerate(params)]
            self.table = torch.tensor(rows, dtype=torch.int64).to(device)
            self.key = key
        return self.table, self.blocks


def _fits(p: torch.Tensor) -> bool:
    g = p.grad
    return (p.is_cuda and p.dtype == torch.float32 and p.is_contiguous() and p.numel() % 16 == 0
            and p.data_ptr() % 16 == 0 and g is not None and g.data_ptr() % 16 == 0 and not g.is_sparse and g.dtype == torch.float32 and g.is_contiguous()
            and type(p) is torch.nn.Parameter and type(g) is torch.Tensor)


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused) whose step is one Triton launch per parameter group (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self._tables: dict[int, _Tables] = {}

    def _applies(self) -> bool:
        if not available():
            return False
        for group in self.param_groups:
            if (group["amsgrad"] or group["maximize"] or group.get("differentiable") or group.get("capturable")
                    or not all(isinstance(group[k], float) for k in ("lr", "eps", "weight_decay"))
                    or not all(isinstance(b, float) for b in group["betas"])):
                return False
            if not all(_fits(p) for p in group["params"] if p.grad is not None):
                return False
        return True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._applies():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:  # torch's fused AdamW's state, so that checkpoints move between the two
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            adamw_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                        [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"],
                        betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                        grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                        tables=self._tables.setdefault(index, _Tables()), block=BLOCK, iters=ITERS,
                        num_warps=NUM_WARPS, stages=STAGES, stream=STREAM)
        return loss


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, betas: tuple[float, float],
                eps: float, weight_decay: float, grad_scale: torch.Tensor | None = None,
                found_inf: torch.Tensor | None = None, tables: _Tables | None = None, block: int = BLOCK,
                iters: int = ITERS, num_warps: int = NUM_WARPS, stages: int = STAGES,
                stream: bool = STREAM) -> None:
    """One AdamW update of every tensor, in one launch (fp32 contiguous tensors of sizes a multiple of
    16; `steps` one-element float32 tensors, counted up here): the gradient divided by `grad_scale`
    when given, nothing changed but where `found_inf` is nonzero (both one-element device tensors)."""
    if not params:
        return
    tables = tables or _Tables()
    table, blocks = tables.get([params, grads, exp_avgs, exp_avg_sqs, steps], params[0].device, block * iters)
    beta1, beta2 = betas
    _kernel()[(blocks.shape[0],)](
        table, blocks, table if grad_scale is None else grad_scale, table if found_inf is None else found_inf,
        lr, beta1, beta2, eps, weight_decay, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        BLOCK=block, ITERS=iters, STAGES=stages, STREAM=stream, num_warps=num_warps)
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, 1.0 - found_inf.to(torch.float32))
