"""AdamW's step alone over a recipe's parameters, as hasten's loop takes it (the clip's divisor as
`grad_scale`, a `found_inf` flag): torch's fused AdamW against hasten's TritonAdamW, one launch per
parameter group, at a few block sizes.

    PYTHONPATH=src python benchmarks/adamw_step.py --out benchmarks/results

Each side first takes `--check` steps from the same parameters and gradients (the gradients copied
back before each step: torch's kernel writes the divided gradient over them) and the parameters
are compared; then `--steps` steps are timed between CUDA events. Bytes moved a step: parameter,
gradient and two moments read, parameter and moments written (28 per fp32 parameter), and the
divided gradient written back by torch's kernel (32). Writes adamw_step.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="gpt2-124m")
    parser.add_argument("--check", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--configs", default="2048x1x4x1,2048x8x4x2,2048x16x4x2,1024x16x4x2,1024x32x4x3,4096x4x8x2,"
                                             "4096x8x8x1,2048x8x8x2,1024x8x2x2",
                        help="TritonAdamW configs, comma-separated: block x blocks a program x warps x stages[x1: "
                             "streaming loads and stores]")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    from hasten.config import load_config
    from hasten.models import build_model
    from hasten.optim.builder import param_groups
    from hasten.optim.triton_adamw import TritonAdamW
    from hasten.provenance import source_commit

    if not torch.cuda.is_available():
        raise SystemExit("adamw_step.py measures a CUDA kernel: no GPU here")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(load_config(args.recipe).model, 50304, device)
    groups = param_groups(model, 0.1)
    params = [p for g in groups for p in g["params"]]
    numel = sum(p.numel() for p in params)
    start = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    hyper = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)

    def reset() -> None:
        with torch.no_grad():
            for p, w, g in zip(params, start, grads):
                p.copy_(w)
                p.grad = g.clone()

    def make(name: str) -> torch.optim.Optimizer:
        if name == "torch fused":
            return torch.optim.AdamW(groups, fused=True, **hyper)
        opt = TritonAdamW(groups, **hyper)
        opt.step = _with_config(opt, *(int(x) for x in name.split()[-1].split("x")))
        return opt

    divisor = torch.tensor(1.25, device=device)
    no_inf = torch.tensor(0.0, device=device)
    rows, finals = [], {}
    for name in ["torch fused", *(f"triton {c}" for c in args.configs.split(","))]:
        reset()
        opt = make(name)
        for _ in range(args.check):
            for p, g in zip(params, grads):
                p.grad.copy_(g)
            opt.grad_scale, opt.found_inf = divisor, no_inf
            opt.step()
        finals[name] = [p.detach().clone() for p in params]
        for _ in range(args.warmup):
            opt.grad_scale, opt.found_inf = divisor, no_inf
            opt.step()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        begin.record()
        for _ in range(args.steps):
            opt.grad_scale, opt.found_inf = divisor, no_inf
            opt.step()
        end.record()
        torch.cuda.synchronize()
        host_ms = 1000 * (time.perf_counter() - host) / args.steps
        ms = begin.elapsed_time(end) / args.steps
        moved = numel * (32 if name == "torch fused" else 28)
        diff = max((a - b).abs().max().item() for a, b in zip(finals[name], finals["torch fused"]))
        update = max((a - b).abs().max().item() for a, b in zip(finals["torch fused"], start))
        rows.append(dict(optimizer=name, ms_per_step=ms, host_ms_per_step=host_ms, tb_per_s=moved / ms / 1e9,
                         max_abs_diff_vs_torch_fused=diff, max_abs_update_torch_fused=update))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(suite="adamw_step", recipe=args.recipe, commit=source_commit(), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, params=numel, tensors=len(params), check_steps=args.check,
                  steps=args.steps, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adamw_step.json").write_text(json.dumps(result, indent=2) + "\n")


def _with_config(opt, block: int, iters: int, warps: int, stages: int, stream: int = 0):
    """opt.step with the kernel's launch settings set (the class uses the module's)."""
    import functools

    from hasten.optim import triton_adamw

    step = opt.step

    @functools.wraps(step)
    def configured(*a, **k):
        names = ("BLOCK", "ITERS", "NUM_WARPS", "STAGES", "STREAM")
        saved = [getattr(triton_adamw, n) for n in names]
        for name, value in zip(names, (block, iters, warps, stages, bool(stream))):
            setattr(triton_adamw, name, value)
        try:
            return step(*a, **k)
        finally:
            for name, value in zip(names, saved):
                setattr(triton_adamw, name, value)

    return configured


if __name__ == "__main__":
    main()
