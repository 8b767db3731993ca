"""The split residual stream's sum, split and RMSNorm in one Triton kernel each way, on CUDA.

With `model.split_residual` the fp32 stream lives between kernels as a bf16 pair (hi, lo)
(hasten.models.gpt.split_stream). At each residual point a block adds its branch to the pair,
splits the fp32 sum into a new pair and normalizes it for the next branch. Left to torch.compile,
forward writes the fp32 sum besides the pair (its partitioner prefers to keep the sum for the norm's
backward, since every user of it is fusible), and backward runs the norm's weight gradient as
reductions of their own. `add_rms_norm` does the whole point in one pass:

    s = (hi + lo) + branch            in fp32
    hi', lo' = split(s)               bf16 each: the rounding and its remainder
    y = rms_norm(hi' + lo') * weight  bf16, the next branch's input (the norm reads the pair, as
                                      the unfused blocks' norms do)

and saves only the new pair and one fp32 statistic per token for backward. Its backward reads the
new pair, the norm's output gradient and the pair's own gradient once, writes the gradient of the
sum (bf16: the gradient of `hi` and of the branch, which are the same tensor) and sums the weight's
gradient per program. Gradients flow as in the unfused blocks: through `hi` alone (`lo` is a
constant correction). The reference is that plain PyTorch (tests/unit/test_add_norm.py, on a GPU or
under Triton's interpreter on the CPU); torch.compile treats the ops as opaque.

Shape legend: N tokens (all leading dimensions), D model width.
"""

from __future__ import annotations

import functools

import torch

from hasten.models.ops.projections import available  # noqa: F401  (CUDA and Triton: the decoder's test for these ops)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def add_norm_fwd(hi_ptr, lo_ptr, branch_ptr, w_ptr, hi_out_ptr, lo_out_ptr, y_ptr, rstd_ptr, N, D, eps,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        live = (rows < N)[:, None] & (cols < D)[None, :]
        at = rows.to(tl.int64)[:, None] * D + cols[None, :]
        s = (tl.load(hi_ptr + at, mask=live, other=0.0).to(tl.float32)
             + tl.load(lo_ptr + at, mask=live, other=0.0).to(tl.float32)
             + tl.load(branch_ptr + at, mask=live, other=0.0).to(tl.float32))
        hi = s.to(hi_out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        lo = (s - hi.to(tl.float32)).to(lo_out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        pair = hi.to(tl.float32) + lo.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(pair * pair, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(hi_out_ptr + at, hi, mask=live)
        tl.store(lo_out_ptr + at, lo, mask=live)
        tl.store(y_ptr + at, (pair * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=live)
        tl.store(rstd_ptr + rows, rstd, mask=rows < N)

    @triton.jit
    def add_norm_bwd(d_hi_ptr, dy_ptr, hi_ptr, lo_ptr, rstd_ptr, w_ptr, ds_ptr, dw_ptr, N, D,
                     HAS_D_HI: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
                     ATOMIC: tl.constexpr):
        # A fixed number of programs, each taking every G-th block of rows (the loop's loads issued
        # STAGES blocks ahead): the weight's gradient is summed in registers, then added into one
        # zeroed fp32 row (ATOMIC, in no fixed order) or written as the program's partial row.
        pid, G = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for first in tl.range(pid * ROWS, N, G * ROWS, num_stages=STAGES):
            rows = first + tl.arange(0, ROWS)
            live = (rows < N)[:, None] & (cols < D)[None, :]
            at = rows.to(tl.int64)[:, None] * D + cols[None, :]
            pair = (tl.load(hi_ptr + at, mask=live, other=0.0).to(tl.float32)
                    + tl.load(lo_ptr + at, mask=live, other=0.0).to(tl.float32))
            rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
            dy = tl.load(dy_ptr + at, mask=live, other=0.0).to(tl.float32)
            normed = pair * rstd[:, None]
            g = dy * w[None, :]
            ds = rstd[:, None] * (g - normed * (tl.sum(g * normed, axis=1) / D)[:, None])
            if HAS_D_HI:
                ds += tl.load(d_hi_ptr + at, mask=live, other=0.0).to(tl.float32)
            tl.store(ds_ptr + at, ds.to(ds_ptr.dtype.element_ty), mask=live)
            dw += tl.sum(dy * normed, axis=0)
        if ATOMIC:
            tl.atomic_add(dw_ptr + cols, dw, mask=cols < D, sem="relaxed")
        else:
            tl.store(dw_ptr + pid * D + cols, dw, mask=cols < D)

    return dict(fwd=add_norm_fwd, bwd=add_norm_bwd)


def _launch(D: int) -> tuple[int, int, int]:
    """(rows a forward program takes, the padded width, warps). At the GPT-2-124M shape (D = 768) on
    an H200, 2 rows and 4 warps ran the forward kernel in 0.074 ms against 0.082-0.112 ms for 4-8 rows
    or 2 warps (benchmarks/add_norm_kernel.py --sweep)."""
    block_d = 1 << (D - 1).bit_length()
    return max(1, 2048 // block_d), block_d, 4 if block_d <= 2048 else 8


def _launch_backward(D: int) -> tuple[int, int, int, int]:
    """The same for a backward program's blocks of rows, with the loads' pipeline depth (there: 2
    rows, 2 warps, 4 stages and 2 programs a multiprocessor, the weight's gradient added atomically:
    0.062 ms against 0.072 for 4 rows, 2 warps, no pipelining, 8 programs a multiprocessor and the
    partial rows summed after: benchmarks/results/add_norm_backward_variants.json)."""
    block_d = 1 << (D - 1).bit_length()
    return max(1, 2048 // block_d), block_d, 2 if block_d <= 1024 else 4, 4


@torch.library.custom_op("hasten::add_rms_norm", mutates_args=())
def add_rms_norm(hi: torch.Tensor, lo: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hi, lo) the split stream (bf16), `branch` what a block adds to it (any float dtype), all
    (..., D) -> the new pair, the RMSNorm of its sum times `weight` in the pair's dtype (..., D), and
    the norm's fp32 reciprocal root mean square per token (N,), which backward reads."""
    D = hi.shape[-1]
    N = hi.numel() // D
    hi_out, lo_out, y = torch.empty_like(hi), torch.empty_like(lo), torch.empty_like(hi)
    rstd = torch.empty(N, device=hi.device, dtype=torch.float32)
    rows, block_d, warps = _launch(D)
    _kernels()["fwd"][(-(-N // rows),)](hi.contiguous(), lo.contiguous(), branch.contiguous(), weight, hi_out, lo_out,
                                        y, rstd, N, D, eps, rows, block_d, num_warps=warps)
    return hi_out, lo_out, y, rstd


@add_rms_norm.register_fake
def _(hi, lo, branch, weight, eps):
    return (torch.empty_like(hi), torch.empty_like(lo), torch.empty_like(hi),
            hi.new_empty(hi.numel() // hi.shape[-1], dtype=torch.float32))


@functools.cache
def _programs(device_index: int) -> int:
    """Backward's programs: 2 a multiprocessor (the record above)."""
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


@torch.library.custom_op("hasten::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward(d_hi: torch.Tensor | None, dy: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor,
                          rstd: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of the sum (the pair's dtype) and of the weight (its dtype), from those of the
    new `hi` (None where nothing used it) and of the norm's output."""
    D = hi.shape[-1]
    N = hi.numel() // D
    rows, block_d, warps, stages = _launch_backward(D)
    blocks = -(-N // rows)
    programs = min(blocks, _programs(hi.device.index or 0) if hi.is_cuda else 4)
    ds = torch.empty_like(hi)
    # The weight's gradient: added atomically into one fp32 row, in no fixed order, unless PyTorch's
    # deterministic algorithms are asked for: then each program's partial row, summed after.
    atomic = not torch.are_deterministic_algorithms_enabled()
    dw = torch.zeros(D, device=hi.device, dtype=torch.float32) if atomic else \
        torch.empty(programs, D, device=hi.device, dtype=torch.float32)
    has_d_hi = d_hi is not None
    _kernels()["bwd"][(programs,)](d_hi.contiguous() if has_d_hi else dy, dy.contiguous(), hi.contiguous(),
                                   lo.contiguous(), rstd, weight, ds, dw, N, D, has_d_hi, rows, block_d, stages,
                                   atomic, num_warps=warps)
    return ds, (dw if atomic else dw.sum(0)).to(weight.dtype)


@add_rms_norm_backward.register_fake
def _(d_hi, dy, hi, lo, rstd, weight):
    return torch.empty_like(hi), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    weight = inputs[3]
    hi_out, lo_out, _, rstd = output
    ctx.save_for_backward(hi_out, lo_out, rstd, weight)


def _grad(ctx, d_hi, d_lo, dy, d_rstd):
    hi, lo, rstd, weight = ctx.saved_tensors
    if dy is None:  # the norm's output unused
        dy = torch.zeros_like(hi)
    ds, dw = add_rms_norm_backward(d_hi, dy, hi, lo, rstd, weight)
    return ds, None, ds, dw, None  # hi and the branch get the sum's gradient; lo none (a constant correction)


add_rms_norm.register_autograd(_grad, setup_context=_setup)
