"""How fast is this GPU, in ten seconds: bf16 GEMMs of the `gpt2-124m` step's shapes and a 1 GiB copy.

    PYTHONPATH=src python benchmarks/machine_probe.py [--out FILE]

The GPUs lent for the benchmarks differ by a few percent in the GEMMs that are most of the step; this
tells which kind a machine is before a long call. Prints one line `PROBE {...}`: TFLOP/s per
M x K x N shape (mean of 50 after 3 warm-up) and the copy's TB/s (read + write).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gemm_layouts import time_ms  # this folder's GEMM timing

SHAPES = [(32768, 768, 2304), (32768, 768, 4096), (32768, 2048, 768), (8192, 768, 50304)]


def probe() -> dict:
    out = {}
    for m, k, n in SHAPES:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / time_ms(lambda: a @ b, 50) / 1e9, 1)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    out["copy_TBps"] = round(2 * 2**30 / time_ms(lambda: y.copy_(x), 20) / 1e9, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("machine_probe.py times CUDA kernels: no GPU here")
    result = probe()
    print("PROBE " + json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), **result), indent=1) + "\n")


if __name__ == "__main__":
    main()
