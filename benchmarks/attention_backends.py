"""Causal attention forward + backward at the `gpt2-124m` training shape, per SDPA kernel family.

    PYTHONPATH=src python benchmarks/attention_backends.py --out benchmarks/results

q, k, v made as hasten's attention makes them ((B, T, H, d) projections seen as (B, H, T, d)),
bf16, batch 32 x 1024 tokens, 12 heads of 64. For each backend (cuDNN, PyTorch's flash kernel,
memory-efficient, and FlashAttention-4 through `train.attention_backend=fa4` when the
flash-attn-4 package is there): first its output and input gradients against an fp32 math
reference on two sequences, then the median of `--iters` forward + backward passes, each timed
between CUDA events. FA4 replaces the flash backend for the rest of the process, so it runs last.
Writes attention_backends.json.

Another cuDNN 9 than the one PyTorch ships with: HASTEN_CUDNN_LIB=FOLDER (the `lib` folder of an
nvidia-cudnn-cu13 wheel, or of any cuDNN 9 install; libcudnn.so.9, libcudnn_graph.so.9 and
libcudnn_engines_runtime_compiled.so.9, which holds the attention kernels, suffice) loads those
libraries before torch; the JSON records the cuDNN version that ran.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from pathlib import Path

CUDNN_LIBS = ("libcudnn_graph.so.9", "libcudnn_engines_runtime_compiled.so.9", "libcudnn_heuristic.so.9",
              "libcudnn.so.9")
_CUDNN_DIR = os.environ.get("HASTEN_CUDNN_LIB")  # loaded before torch, whose own cuDNN has the same soname
for _path in [os.path.join(_CUDNN_DIR, name) for name in CUDNN_LIBS] if _CUDNN_DIR else []:
    if os.path.exists(_path):
        ctypes.CDLL(_path, mode=ctypes.RTLD_GLOBAL)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from hasten.provenance import source_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "fa4": SDPBackend.FLASH_ATTENTION}


def qkv(batch: int, seq: int, heads: int, head_dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            .transpose(1, 2).requires_grad_() for _ in range(3)]


def forward_backward(backend: SDPBackend, q, k, v, grad_out) -> list[torch.Tensor]:
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out)]


def check(backend: SDPBackend, heads: int, head_dim: int, seq: int) -> dict:
    """Largest error of output and gradients against fp32 math, relative to each tensor's max."""
    q, k, v = qkv(2, seq, heads, head_dim, seed=1)
    grad_out = torch.randn_like(q.detach())
    got = forward_backward(backend, q, k, v, grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref = [ref_out, *torch.autograd.grad(ref_out, ref_in, grad_out.float())]
    return {name: ((g.float() - r).abs().max() / r.abs().max()).item()
            for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}


def time_backend(backend: SDPBackend, batch: int, seq: int, heads: int, head_dim: int, iters: int) -> list[float]:
    q, k, v = qkv(batch, seq, heads, head_dim)
    grad_out = torch.randn_like(q.detach())
    for _ in range(5):  # warm-up: kernel selection, FA4's compilation
        forward_backward(backend, q, k, v, grad_out)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(backend, q, k, v, grad_out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--backends", default="cudnn,flash,efficient,fa4")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_backends.py times CUDA kernels: no GPU here")
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if "fa4" in names:  # it takes over the flash backend: last
        names = [n for n in names if n != "fa4"] + ["fa4"]
    flops = 4 * args.batch * args.heads * args.seq ** 2 * args.head_dim / 2 * 3.5  # causal; backward 2.5x forward
    rows = []
    for name in names:
        row = dict(backend=name)
        try:
            if name == "fa4":
                from hasten.train.build import activate_fa4
                activate_fa4(torch.device("cuda"))
            row["relative_error"] = check(BACKENDS[name], args.heads, args.head_dim, args.seq)
            times = time_backend(BACKENDS[name], args.batch, args.seq, args.heads, args.head_dim, args.iters)
            row.update(ms_fwd_bwd=statistics.median(times), ms_min=min(times),
                       tflops=flops / (statistics.median(times) / 1000) / 1e12)
        except Exception as err:  # a backend that cannot run this shape here is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
        print(json.dumps(row), flush=True)
        rows.append(row)
    commit = source_commit()
    result = dict(suite="attention_backends", date=time.strftime("%Y-%m-%d"), commit=commit,
                  device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version(), shape=dict(batch=args.batch, seq=args.seq, heads=args.heads, head_dim=args.head_dim,
                             causal=True, dtype="bf16"), iters=args.iters, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_backends.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
