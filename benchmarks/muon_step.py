"""Muon's optimizer step alone, on the hidden matrices of the gpt2-124m model: `torch.optim.Muon`
(one Newton-Schulz per matrix) vs hasten's `MuonNS` (matrices of one shape orthogonalized as one
batch), with fused AdamW over the same matrices as the reference cost of a plain step.

    PYTHONPATH=src python benchmarks/muon_step.py --out benchmarks/results

Each optimizer takes `--warmup` steps, then `--steps` timed steps between two synchronizations,
on fixed random gradients. The two Muons' parameters after one step from the same start are
compared (bf16 Newton-Schulz: they agree to bf16 rounding), so the faster one is known to do the
same update. Writes muon_step.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_step(opt: torch.optim.Optimizer, warmup: int, steps: int, device: torch.device) -> float:
    """Milliseconds per optimizer step."""
    for _ in range(warmup):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="gpt2-124m")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    from hasten.config import load_config
    from hasten.models import build_model
    from hasten.optim import MuonNS, muon_params
    from hasten.provenance import source_commit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(load_config(args.recipe).model, 50304, device)
    matrices = muon_params(model)
    start = [p.detach().clone() for p in matrices]
    for p in matrices:
        p.grad = torch.randn_like(p)
    kw = dict(lr=6e-4, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
    candidates = {"torch.optim.Muon": lambda: torch.optim.Muon(matrices, **kw), "hasten MuonNS (batched)":
                  lambda: MuonNS(matrices, **kw), "fused AdamW (reference)":
                  lambda: torch.optim.AdamW(matrices, lr=6e-4, fused=device.type == "cuda")}
    rows, after_one = [], {}
    for name, make in candidates.items():
        if name == "torch.optim.Muon" and not hasattr(torch.optim, "Muon"):
            continue
        with torch.no_grad():
            for p, w in zip(matrices, start):
                p.copy_(w)
        opt = make()
        opt.step()
        after_one[name] = [p.detach().clone() for p in matrices]
        rows.append(dict(optimizer=name, ms_per_step=time_step(opt, args.warmup, args.steps, device)))
        print(json.dumps(rows[-1]), flush=True)
    diff = None
    if "torch.optim.Muon" in after_one:
        diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
                   for a, b in zip(after_one["torch.optim.Muon"], after_one["hasten MuonNS (batched)"]))
    shapes = sorted({tuple(p.shape) for p in matrices})
    commit = source_commit()
    by = {r["optimizer"]: r["ms_per_step"] for r in rows}
    result = dict(suite="muon_step", date=time.strftime("%Y-%m-%d"), commit=commit, torch=torch.__version__,
                  device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", recipe=args.recipe,
                  matrices=len(matrices), shapes=shapes, params=sum(p.numel() for p in matrices), rows=rows,
                  max_relative_difference_after_one_step=diff,
                  summary=dict(batched_over_torch_muon_speedup=by.get("torch.optim.Muon", float("nan"))
                               / by["hasten MuonNS (batched)"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "muon_step.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"]), "max relative difference after one step:", diff)


if __name__ == "__main__":
    main()
