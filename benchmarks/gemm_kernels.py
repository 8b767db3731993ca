"""cuBLAS against QuACK's GEMM (untuned and autotuned) on the fused layers' forward and dX GEMMs.

    PYTHONPATH=src python benchmarks/gemm_kernels.py --out benchmarks/results/gemm_kernels.json

With `model.fuse_projections`, a gpt2-124m block runs four products a step in each direction:
qkv, wo, gate+up and down, forward y = x W^T and input gradient dX = dY W (the weight gradient
stays on cuBLAS). `train.gemm_kernel` picks the library for those two. This times each of them
alone, sustained: every timing follows 0.4 s of the same kernel, so that the H200 sits at its
power limit and its lowered clock as it does inside the training step; a cold GPU at boost clock
ranks the kernels differently. Three operand sets are cycled so that no kernel reads from L2
what the previous launch left there. Each row also records the relative error against an fp64
product, identical for all three when they accumulate the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

M = 32 * 1024  # tokens a step: batch 32 x seq 1024
SHAPES = {"qkv": (768, 2304), "wo": (768, 768), "gateup": (768, 4096), "down": (2048, 768)}  # (K, N)


def backends() -> dict[str, Callable]:
    import quack.gemm_interface  # noqa: F401  (registers torch.ops.quack.gemm)

    return {
        "cublas": lambda a, b: a @ b,
        "quack": lambda a, b: torch.ops.quack.gemm(a, b, tuned=False),
        "quack_tuned": lambda a, b: torch.ops.quack.gemm(a, b, tuned=True),
    }


def operands(a_shape, w_shape, transposed: bool, sets: int = 3):
    """`sets` (A, B) pairs for A @ B; B is W^T (a view, as F.linear sees it) for the forward."""
    out = []
    for _ in range(sets):
        a = torch.randn(*a_shape, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(*w_shape, device="cuda", dtype=torch.bfloat16) * 0.05
        out.append((a, w.t() if transposed else w))
    return out


def sustained_ms(fn, sets, heat_s: float = 0.4, reps: int = 150) -> float:
    end = time.perf_counter() + heat_s
    i = 0
    while time.perf_counter() < end:
        for _ in range(20):
            fn(*sets[i % len(sets)])
            i += 1
        torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for j in range(reps):
        fn(*sets[j % len(sets)])
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm_kernels.json"))
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds; the median is kept")
    args = p.parse_args()
    fns = backends()
    rows = {}
    for name, (k, n) in SHAPES.items():
        for direction, a_shape, transposed, n_out in (("fwd", (M, k), True, n), ("dx", (M, n), False, k)):
            sets = operands(a_shape, (n, k), transposed)
            a, b = sets[0]
            ref = a.double() @ b.double()
            row = {}
            for be, fn in fns.items():
                y = fn(a, b)
                row[be + "_err"] = float((y.double() - ref).norm() / ref.norm())
            del ref
            times = {be: [] for be in fns}
            for _ in range(args.rounds):
                for be, fn in fns.items():
                    times[be].append(sustained_ms(fn, sets))
            flops = 2 * a_shape[0] * a_shape[1] * n_out
            for be in fns:
                ms = sorted(times[be])[len(times[be]) // 2]
                row[be + "_ms"] = round(ms, 4)
                row[be + "_tflops"] = round(flops / ms / 1e9, 1)
            rows[f"{name} {direction}"] = row
            print(f"{name} {direction}", {k: v for k, v in row.items() if k.endswith("_ms")}, flush=True)
    total = {be: round(sum(r[be + "_ms"] for r in rows.values()), 4) for be in fns}
    print("per layer, forward + dX, ms:", total)
    result = {"device": torch.cuda.get_device_name(), "tokens": M, "rows": rows, "per_layer_ms": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
