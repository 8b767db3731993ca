"""How fast each matmul of a recipe's training step runs, in each operand layout and BLAS library.

    PYTHONPATH=src python benchmarks/gemm_layouts.py --out /tmp/gemm gpt2-124m

A linear layer y = x W^T (x: M x K tokens by features, W: N x K) costs three GEMMs a step: the
forward, the input gradient dX = dY W and the weight gradient dW = dY^T x. The step's profile
(profile_step.py) shows their kernels at very different speeds. This times each GEMM of the
recipe's decoder (q/k/v/o, gate/up/down, the vocabulary head) alone, in bf16, as autograd issues
it and with the other operand layouts that give the same product (a transposed copy of W for the
forward, the transposed product for dW), under cuBLAS and cuBLASLt, with the kernel each one
ran, so that a slow one can be traced to its layout. With --triton, Inductor's autotuned Triton
templates (max-autotune) as well, for the three GEMMs as autograd issues them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hasten.config import load_config
from hasten.models.gpt import ffn_hidden_dim, resolve_vocab_size


def shapes(recipe: str) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count per step) of every linear layer of the recipe's dense decoder."""
    cfg = load_config(recipe)
    c, M = cfg.model, cfg.train.batch_size * cfg.train.seq_len
    d, F = c.dim, ffn_hidden_dim(c)
    kv = (c.n_kv_heads or c.n_heads) * (d // c.n_heads)
    V = resolve_vocab_size(c, cfg.data.bpe_vocab_size)  # the recipe's BPE vocabulary, padded as the model pads it
    L = c.n_layers
    attention = [("wq/wk/wv/wo", M, d, d, 4 * L)] if kv == d else [("wq/wo", M, d, d, 2 * L), ("wk/wv", M, d, kv, 2 * L)]
    return [*attention, ("w1/w3", M, d, F, 2 * L), ("w2", M, F, d, L), ("head", M, d, V, 1)]


def variants(M: int, K: int, N: int) -> dict[str, callable]:
    """Each GEMM of one linear as autograd issues it, and its same-product alternatives."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16, generator=g)

    x, w, dy = rand(M, K), rand(N, K), rand(M, N)
    wt = w.t().contiguous()  # K x N: W^T laid out for x @ W^T without a transpose in the GEMM
    return {
        "fwd x@W^T": lambda: x @ w.t(),
        "fwd x@Wt (W^T contiguous)": lambda: x @ wt,
        "dX dY@W": lambda: dy @ w,
        "dX dY@Wt^T (W^T contiguous)": lambda: dy @ wt.t(),
        "dW dY^T@x": lambda: dy.t() @ x,
        "dW (x^T@dY)^T": lambda: (x.t() @ dy).t(),
    }


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_of(fn) -> str:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if e.device_time_total > 0]
    return ", ".join(names)[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="gpt2-124m")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--libraries", default="cublas,cublaslt", help="comma-separated torch BLAS backends")
    parser.add_argument("--triton", action="store_true", help="also Inductor's autotuned Triton templates")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_layouts.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name, M, K, N, count in shapes(args.recipe):
        flops = 2 * M * K * N
        for variant, fn in variants(M, K, N).items():
            for library in args.libraries.split(","):
                torch.backends.cuda.preferred_blas_library(library)
                ms = time_ms(fn, args.reps)
                rows.append(dict(linear=name, M=M, K=K, N=N, per_step=count, gemm=variant, library=library,
                                 ms=ms, tflops=flops / ms / 1e9, kernel=kernel_of(fn)))
                print(f"{name:12s} {variant:28s} {library:9s} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  {rows[-1]['kernel'][:70]}",
                      flush=True)
            if args.triton and variant in ("fwd x@W^T", "dX dY@W", "dW dY^T@x"):
                torch.backends.cuda.preferred_blas_library("cublas")
                torch._dynamo.reset()
                compiled = torch.compile(fn, mode="max-autotune-no-cudagraphs")
                t0 = time.perf_counter()
                compiled()
                ms = time_ms(compiled, args.reps)
                rows.append(dict(linear=name, M=M, K=K, N=N, per_step=count, gemm=variant, library="triton-autotune",
                                 ms=ms, tflops=flops / ms / 1e9, kernel=kernel_of(compiled),
                                 compile_s=time.perf_counter() - t0))
                print(f"{name:12s} {variant:28s} triton    {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  {rows[-1]['kernel'][:70]}",
                      flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    best = {}
    for r in rows:  # fastest way to each of the three products of each linear
        key = (r["linear"], r["gemm"].split()[0])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    default = {(r["linear"], r["gemm"].split()[0]): r for r in rows
               if r["library"] == "cublas" and r["gemm"] in ("fwd x@W^T", "dX dY@W", "dW dY^T@x")}
    summary = dict(
        default_ms_per_step=sum(r["ms"] * r["per_step"] for r in default.values()),
        best_ms_per_step=sum(r["ms"] * r["per_step"] for r in best.values()),
        best=[{k: r[k] for k in ("linear", "gemm", "library", "ms", "tflops")} for r in best.values()])
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_layouts.json").write_text(json.dumps(dict(
        recipe=args.recipe, device=torch.cuda.get_device_name(), torch=torch.__version__, summary=summary, rows=rows,
        command="PYTHONPATH=src python benchmarks/gemm_layouts.py " + args.recipe + (" --triton" if args.triton else "")),
        indent=1))


if __name__ == "__main__":
    main()
