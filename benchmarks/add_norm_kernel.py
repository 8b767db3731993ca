"""One residual point of the split stream (model.fuse_norms), forward and backward, on one GPU.

At the GPT-2-124M benchmark's shape (32 x 1024 tokens, width 768, bf16 pair and branch), each
block does twice: add the branch to the (hi, lo) pair in fp32, split the sum into a new pair and
RMS-normalize it for the next branch. Compared:
- `compiled`: the decoder's unfused split-block code (`split_stream`, `join_stream`, `F.rms_norm`)
  under torch.compile, what the model's compiled graph runs without the key;
- `fused`: `hasten.models.ops.add_norm.add_rms_norm`, one Triton kernel each way.
Forward alone and forward + backward (gradients of the new `hi` and of the norm's output given),
with the bytes each must move at least and the rate that makes. Each figure is the median of
CUDA-event timings. Checks the fused op against the compiled one first.

    PYTHONPATH=src python benchmarks/add_norm_kernel.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _time_ms(fn, iters: int = 50, warmup: int = 5) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 * 1024)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from hasten.models.gpt import join_stream, split_stream
    from hasten.models.ops.add_norm import add_rms_norm

    N, D, eps = args.tokens, args.dim, 1e-5
    torch.manual_seed(0)
    hi0, lo0 = split_stream(torch.randn(N, D, device="cuda") * 3)
    branch = torch.randn(N, D, device="cuda").bfloat16()
    weight = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    d_hi, dy = torch.randn(N, D, device="cuda").bfloat16(), torch.randn(N, D, device="cuda").bfloat16()

    def unfused(hi, lo, b, w):
        new_hi, new_lo = split_stream(join_stream(hi, lo) + b.float())
        return new_hi, new_lo, F.rms_norm(join_stream(new_hi, new_lo), (D,), w, eps).to(torch.bfloat16)

    compiled = torch.compile(unfused)

    def fused(hi, lo, b, w):
        return add_rms_norm(hi, lo, b, w, eps)[:3]

    def inputs():
        return hi0.clone().requires_grad_(), branch.clone().requires_grad_()

    results = {}
    check = {}
    for name, fn in (("compiled", compiled), ("fused", fused)):
        hi, b = inputs()
        new_hi, new_lo, y = fn(hi, lo0, b, weight)
        grads = torch.autograd.grad([new_hi, y], [hi, b, weight], [d_hi, dy])
        check[name] = (new_hi, new_lo, y, *grads)

        def forward(fn=fn):
            with torch.no_grad():
                fn(hi0, lo0, branch, weight)

        def both(fn=fn):
            hi, b = inputs()
            new_hi, _, y = fn(hi, lo0, b, weight)
            torch.autograd.grad([new_hi, y], [hi, b, weight], [d_hi, dy])

        results[name] = dict(forward_ms=_time_ms(forward), forward_backward_ms=_time_ms(both))
    diffs = {k: (a.float() - b.float()).abs().max().item() for k, a, b in
             zip(("hi", "lo", "y", "d_hi", "d_branch", "d_weight"), check["fused"], check["compiled"])}
    clone_ms = _time_ms(lambda: inputs())  # both time the two input clones the gradients need
    # least bytes: forward reads hi, lo, branch and writes hi, lo, y (bf16); backward reads d_hi, dy,
    # hi, lo and writes the sum's gradient
    fwd_bytes, bwd_bytes = 6 * N * D * 2, 5 * N * D * 2
    for r in results.values():
        r["forward_tb_per_s"] = fwd_bytes / r["forward_ms"] / 1e9
        r["backward_ms"] = r["forward_backward_ms"] - r["forward_ms"] - clone_ms
        r["backward_tb_per_s"] = bwd_bytes / r["backward_ms"] / 1e9
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=N, dim=D,
               clone_ms=clone_ms, max_abs_difference=diffs, results=results,
               date=time.strftime("%Y-%m-%d"), command="python benchmarks/add_norm_kernel.py")
    for name, r in results.items():
        print(f"{name:9} forward {r['forward_ms']:.4f} ms ({r['forward_tb_per_s']:.2f} TB/s)  "
              f"backward {r['backward_ms']:.4f} ms ({r['backward_tb_per_s']:.2f} TB/s)")
    print("max |fused - compiled|:", {k: f"{v:.3g}" for k, v in diffs.items()})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "add_norm_kernel.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
