"""One residual point of the split stream (model.fuse_norms), forward and backward, on one GPU.

At the GPT-2-124M benchmark's shape (32 x 1024 tokens, width 768, bf16 pair and branch), each
block does twice: add the branch to the (hi, lo) pair in fp32, split the sum into a new pair and
RMS-normalize it for the next branch. Compared:
- `compiled`: the decoder's unfused split-block code (`split_stream`, `join_stream`, `F.rms_norm`)
  under torch.compile, what the model's compiled graph runs without the key;
- `fused`: `hasten.models.ops.add_norm.add_rms_norm`, one Triton kernel each way.
Forward alone and forward + backward (gradients of the new `hi` and of the norm's output given),
as GPU kernel time from the profiler (the host's launch time left out), with the bytes each must
move at least and the rate that makes; `--sweep` times the fused kernels' launch settings too.
Checks the fused op against the compiled one first.

    PYTHONPATH=src python benchmarks/add_norm_kernel.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _kernel_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """GPU kernel time of one call of fn, from the profiler (the host's launch time left out: these
    kernels take ~0.1 ms, the Python around them as long)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == cuda) / iters / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 * 1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--sweep", action="store_true", help="also time the kernels' launch settings")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from hasten.models.gpt import join_stream, split_stream
    from hasten.models.ops import add_norm

    N, D, eps = args.tokens, args.dim, 1e-5
    torch.manual_seed(0)
    hi0, lo0 = split_stream(torch.randn(N, D, device="cuda") * 3)
    branch = torch.randn(N, D, device="cuda").bfloat16()
    weight = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    d_hi, dy = torch.randn(N, D, device="cuda").bfloat16(), torch.randn(N, D, device="cuda").bfloat16()
    hi, b = hi0.clone().requires_grad_(), branch.clone().requires_grad_()

    def unfused(hi, lo, b, w):
        new_hi, new_lo = split_stream(join_stream(hi, lo) + b.float())
        return new_hi, new_lo, F.rms_norm(join_stream(new_hi, new_lo), (D,), w, eps).to(torch.bfloat16)

    def fused(hi, lo, b, w):
        return add_norm.add_rms_norm(hi, lo, b, w, eps)[:3]

    def timings(fn) -> dict:
        def forward():
            with torch.no_grad():
                fn(hi0, lo0, branch, weight)

        def both():
            new_hi, _, y = fn(hi, lo0, b, weight)
            torch.autograd.grad([new_hi, y], [hi, b, weight], [d_hi, dy])

        fwd, total = _kernel_ms(forward), _kernel_ms(both)
        # least bytes: forward reads hi, lo, branch and writes hi, lo, y (bf16); backward reads d_hi,
        # dy, hi, lo and writes the sum's gradient
        return dict(forward_ms=fwd, backward_ms=total - fwd, forward_tb_per_s=6 * N * D * 2 / fwd / 1e9,
                    backward_tb_per_s=5 * N * D * 2 / (total - fwd) / 1e9)

    results, check = {}, {}
    for name, fn in (("compiled", torch.compile(unfused)), ("fused", fused)):
        new_hi, new_lo, y = fn(hi, lo0, b, weight)
        check[name] = (new_hi, new_lo, y, *torch.autograd.grad([new_hi, y], [hi, b, weight], [d_hi, dy]))
        results[name] = timings(fn)
    diffs = {k: (x.float() - y.float()).abs().max().item() for k, x, y in
             zip(("hi", "lo", "y", "d_hi", "d_branch", "d_weight"), check["fused"], check["compiled"])}
    sweep = []
    if args.sweep:  # forward: (rows a program takes, warps); backward: with the pipeline depth, programs per SM
        defaults = add_norm._launch, add_norm._launch_backward, add_norm._programs
        block_d = add_norm._launch(D)[1]
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for rows in (1, 2, 4):
            for warps in (2, 4):
                for stages in (1, 3, 4):
                    for per_sm in (2, 4, 8):  # the same forward settings each time: a forward rerun too
                        add_norm._launch = lambda _, c=(rows, block_d, warps): c
                        add_norm._launch_backward = lambda _, c=(rows, block_d, warps, stages): c
                        add_norm._programs = lambda _, p=per_sm * sms: p
                        sweep.append(dict(rows=rows, warps=warps, stages=stages, programs_per_sm=per_sm,
                                          **timings(fused)))
        add_norm._launch, add_norm._launch_backward, add_norm._programs = defaults
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=N, dim=D,
               launch=dict(forward=dict(zip(("rows", "block_d", "warps"), add_norm._launch(D))),
                           backward=dict(zip(("rows", "block_d", "warps", "stages"), add_norm._launch_backward(D)),
                                         programs=add_norm._programs(0))),
               max_abs_difference=diffs,
               results=results, sweep=sweep, date=time.strftime("%Y-%m-%d"),
               command="python benchmarks/add_norm_kernel.py" + (" --sweep" if args.sweep else ""))
    for name, r in results.items():
        print(f"{name:9} forward {r['forward_ms']:.4f} ms ({r['forward_tb_per_s']:.2f} TB/s)  "
              f"backward {r['backward_ms']:.4f} ms ({r['backward_tb_per_s']:.2f} TB/s)")
    for key in ("forward_ms", "backward_ms"):
        if sweep:
            best = min(sweep, key=lambda r: r[key])
            print(f"best {key}: {best}")
    print("max |fused - compiled|:", {k: f"{v:.3g}" for k, v in diffs.items()})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "add_norm_kernel.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
