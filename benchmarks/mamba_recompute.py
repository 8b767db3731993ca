"""A Mamba-2 mixer with and without `recompute` (model.ssm_recompute): the bytes it keeps for
backward, per token, and the median time of a forward + backward, compiled and eager.

    PYTHONPATH=src python benchmarks/mamba_recompute.py --out benchmarks/results

Kept bytes: the tensors autograd (or the compiled graph) saves in one forward, parameters and the
input left out, each storage counted once, in bf16 at the gpt2-124m recipe's Mamba-2 shape (dim 768,
state 64, head 64, expand 2, chunk 128) and --tokens tokens. Time: --time-dim wide mixer, batch 2,
--time-tokens tokens, fp32 on the CPU (bf16 on a GPU), median of --iters. Writes
ssm_recompute_mixer.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from architectures import _environment, _time_ms  # this folder's mixer benchmark: same timer, same provenance
from hasten.models import Mamba2


def kept_kib_per_token(recompute: bool, compiled: bool, tokens: int, device: torch.device) -> float:
    torch.manual_seed(0)
    mixer = Mamba2(768, d_state=64, head_dim=64, expand=2, chunk_size=128, recompute=recompute)
    mixer = mixer.to(device, torch.bfloat16)
    x = torch.randn(1, tokens, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
    run = torch.compile(mixer) if compiled else mixer
    run(x).float().sum().backward()  # compilation outside the count
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = run(x)
    out.float().sum().backward()
    skip = {p.untyped_storage().data_ptr() for p in [*mixer.parameters(), x]}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in storages.items() if ptr not in skip) / tokens / 1024


def step_ms(recompute: bool, compiled: bool, args: argparse.Namespace, device: torch.device) -> float:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mixer = Mamba2(args.time_dim, d_state=32, head_dim=32, expand=2, chunk_size=64, recompute=recompute)
    mixer = mixer.to(device, dtype)
    x = torch.randn(2, args.time_tokens, args.time_dim, device=device, dtype=dtype, requires_grad=True)
    run = torch.compile(mixer) if compiled else mixer
    return _time_ms(lambda: run(x).sum().backward(), 2, args.iters, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--time-dim", type=int, default=256)
    parser.add_argument("--time-tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="runs/mamba-recompute")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for compiled in (True, False):
        for recompute in (False, True):
            rows.append(dict(compiled=compiled, recompute=recompute,
                             kept_kib_per_token=kept_kib_per_token(recompute, compiled, args.tokens, device),
                             fwd_bwd_ms=step_ms(recompute, compiled, args, device)))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(suite="ssm_recompute_mixer", **_environment(), tokens=args.tokens, time_dim=args.time_dim,
                  time_tokens=args.time_tokens, iters=args.iters, rows=rows)
    (out / "ssm_recompute_mixer.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
