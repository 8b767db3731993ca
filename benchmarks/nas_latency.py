"""The NAS latency table on a GPU: one layer's attention and Mamba-2 mixer, timed as `hasten nas` times them.

    PYTHONPATH=src python benchmarks/nas_latency.py --out benchmarks/results

`hasten.nas.latency_table` at batch 1 (inference), bf16, the `gpt2-124m` shape (d 768, 12 heads),
for each sequence length: the median of 20 eager forwards of one layer's mixer after warm-up.
Writes nas_latency.json (ms per letter per sequence length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from hasten.config import load_config
from hasten.nas import latency_table
from hasten.provenance import source_commit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="gpt2-124m")
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--letters", default="AM", help="candidates timed (mixer and FFN letters)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_config(args.recipe).model
    table = {}
    for seq in (int(s) for s in args.seqs.split(",")):
        shape = dataclasses.replace(cfg, max_seq_len=max(seq, cfg.max_seq_len))
        table[seq] = latency_table(shape, args.letters, args.batch, seq, device, dtype, repeats=20)
        print(seq, {k: round(v, 3) for k, v in table[seq].items()}, flush=True)
    commit = source_commit()
    result = dict(suite="nas_latency", date=time.strftime("%Y-%m-%d"), commit=commit,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  shape=f"{args.recipe} (d {cfg.dim}, {cfg.n_heads} heads)", batch=args.batch, dtype=str(dtype),
                  what="one layer's forward (eager, inference mode), median of 20, ms", latency_ms=table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nas_latency.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
