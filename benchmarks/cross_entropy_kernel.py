"""Output head + cross-entropy of the GPT-2-124M benchmark shape, forward and backward, on one GPU.

Compares, at 32 x 1024 tokens, width 768, vocabulary 50304, bf16:
- `compiled`: `F.cross_entropy(F.linear(h, W).float(), t)` under torch.compile (what the model's
  compiled graph runs at its end);
- `fused`: `hasten.models.ops.cross_entropy.linear_cross_entropy` with the whole batch as one chunk
  (the Triton kernel that writes the logits' gradient in place, between the head's matmuls), and
  with chunks of 8192 tokens;
and the cross-entropy kernels alone (bf16 logits in, loss and gradient out) for the kernel's
block sizes, and a one-pass variant that holds a whole row in registers (read once instead of
twice, but 50304 values a row: it spills, and is 2-10x slower). Each figure is the median of
CUDA-event timings. Checks the kernels against float64 math first.

    PYTHONPATH=src python benchmarks/cross_entropy_kernel.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _one_pass_kernel():
    """The row's logits loaded once into registers, max, sum and gradient from there."""
    import triton
    import triton.language as tl

    @triton.jit
    def ce_row_in_registers(logits_ptr, stride, targets_ptr, loss_ptr, scale_ptr, V, ignore_index,
                            BLOCK: tl.constexpr, RECOMPUTE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        cols = tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf"))
        m = tl.max(x, 0).to(tl.float32)
        e = tl.exp(x.to(tl.float32) - m)
        s = tl.sum(e, 0)
        lse = m + tl.log(s)
        valid = target != ignore_index
        safe = tl.where(valid, target, 0)
        x_t = tl.sum(tl.where(cols == safe, x.to(tl.float32), 0.0), 0)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        g_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        g = tl.exp(x.to(tl.float32) - lse) * g_scale if RECOMPUTE else e * (g_scale / s)
        g = tl.where(cols == safe, g - g_scale, g)
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)

    def run(logits, targets, scale, num_warps, recompute):
        N, V = logits.shape
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        ce_row_in_registers[(N,)](logits, logits.stride(0), targets, loss, scale.reshape(1), V, -100,
                                  BLOCK=triton.next_power_of_2(V), RECOMPUTE=recompute, num_warps=num_warps)
        return loss
    return run


def check_kernel() -> dict:
    from hasten.models.ops.triton_cross_entropy import cross_entropy_

    torch.manual_seed(0)
    N, V = 300, 50304
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(N, V, device="cuda") * 3).to(dtype)
        t = torch.randint(0, V, (N,), device="cuda")
        t[::7] = -100
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, t, ignore_index=-100, reduction="sum") / (t != -100).sum()
        ref.backward()
        scale = 1.0 / (t != -100).sum().float()
        g = x.clone()
        loss = cross_entropy_(g, t, scale, -100).sum() * scale
        out[str(dtype)] = dict(loss_err=abs(loss.item() - ref.item()),
                               grad_max_err=(g.double() - x64.grad).abs().max().item(),
                               grad_max=x64.grad.abs().max().item())
        g = x.clone()
        loss = _one_pass_kernel()(g, t, scale, 16, False).sum() * scale
        out[f"one_pass {dtype}"] = dict(loss_err=abs(loss.item() - ref.item()),
                                        grad_max_err=(g.double() - x64.grad).abs().max().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from hasten.models.ops.cross_entropy import linear_cross_entropy
    from hasten.models.ops.triton_cross_entropy import cross_entropy_

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  check=check_kernel())
    print(json.dumps(result["check"]), flush=True)
    N, D, V = 32 * 1024, 768, 50304
    torch.manual_seed(0)
    h = torch.randn(N, D, device="cuda", requires_grad=True)
    W = (torch.randn(V, D, device="cuda") * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")

    plain = torch.compile(lambda h, W, t: F.cross_entropy(F.linear(h, W).float(), t))

    def step(fn):
        def run():
            h.grad = W.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                loss = fn(h, W, t)
            loss.backward()
        return run

    times = {"compiled": _time_ms(step(plain))}
    for chunk in (N, 8192):
        times[f"fused_chunk{chunk}"] = _time_ms(step(lambda h, W, t: linear_cross_entropy(h, W, t, chunk)))
    with torch.autocast("cuda", torch.bfloat16):
        mm = _time_ms(lambda: F.linear(h, W))
    times["head_matmul_forward"] = mm
    result["head_plus_loss_ms"] = times
    print(json.dumps(times), flush=True)

    # the cross-entropy alone: compiled forward + backward on given bf16 logits, and the kernel
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 3
    x = logits.clone().requires_grad_()
    ce = torch.compile(lambda x, t: F.cross_entropy(x.float(), t))

    def compiled_ce():
        x.grad = None
        ce(x, t).backward()

    kernels = {"compiled_fwd_bwd": _time_ms(compiled_ce)}
    scale = torch.tensor(1.0 / N, device="cuda")
    buf = logits.clone()  # overwritten by gradients at every call: the same work each time
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            if block // (32 * warps) < 1:
                continue
            try:
                kernels[f"triton_b{block}_w{warps}"] = _time_ms(
                    lambda: cross_entropy_(buf, t, scale, -100, block=block, num_warps=warps))
            except Exception as exc:  # a config the compiler refuses
                kernels[f"triton_b{block}_w{warps}"] = repr(exc)[:200]
    one_pass = _one_pass_kernel()
    for warps in (8, 16, 32):
        for recompute in (False, True):
            kernels[f"one_pass_w{warps}{'_recompute' if recompute else ''}"] = _time_ms(
                lambda: one_pass(buf, t, scale, warps, recompute))
    kernels["bytes_read_once_gb"] = N * V * 2 / 1e9
    result["cross_entropy_ms"] = kernels
    print(json.dumps(kernels), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cross_entropy_kernel.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
