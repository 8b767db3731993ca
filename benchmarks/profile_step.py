"""Where one training step's GPU time goes: a torch.profiler table of hasten's own step.

    PYTHONPATH=src python benchmarks/profile_step.py --out /tmp/profile gpt2-124m

Builds the run exactly as `hasten train RECIPE` would (byte tokenizer by default, to skip BPE
training; `model.vocab_size` keeps the recipe's head width), runs warm-up steps (compilation),
then profiles a few steps and prints the kernels by total GPU time, grouped into rough families
(matmul, attention, optimizer, cross-entropy, other) with their share of the step.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hasten.config import load_config
from hasten.train.build import build_run, compiled_loss
from hasten.train.loop import train_step

FAMILIES = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
            ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "mm_")),
            ("optimizer", ("adam", "foreach", "multi_tensor")),
            ("cross-entropy", ("cross_entropy", "nll", "log_softmax", "logsumexp", "ce_rows")))


def family(name: str) -> str:
    lowered = name.lower()
    for label, keys in FAMILIES:
        if any(key in lowered for key in keys):
            return label
    return "other (element-wise, norms, copies)"


def _annotation(name: str) -> bool:
    """Whether a GPU-timeline event is a span that torch.compile or the optimizer puts around its
    kernels ("## Call CompiledFxGraph ..", "Optimizer.step#AdamW.step"), not a kernel or copy."""
    return name.startswith("## ") or "#" in name.split("(")[0]


def idle_gaps(prof: profile, min_us: float = 20.0) -> dict:
    """Where the GPU waited: the gaps between consecutive kernels (and copies) longer than `min_us`,
    with the kernels around each and the host operations that began during it; and the idle time
    of all gaps, however short (launch latency between back-to-back kernels included)."""
    device, host = [], []
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            host.append(e)
        elif not (getattr(e, "is_user_annotation", False) or _annotation(e.name)):  # a span over many kernels would hide the gaps between them
            device.append(e)
    device.sort(key=lambda e: e.time_range.start)
    host.sort(key=lambda e: e.time_range.start)
    found, end, last, idle_all = [], None, None, 0.0
    bins = {"under 2 us": [0, 0.0], "2-5 us": [0, 0.0], "5-20 us": [0, 0.0], "over 20 us": [0, 0.0]}
    for e in device:
        if end is not None and e.time_range.start > end:
            gap = e.time_range.start - end
            idle_all += gap
            bin_ = bins["under 2 us" if gap < 2 else "2-5 us" if gap < 5 else "5-20 us" if gap <= 20 else "over 20 us"]
            bin_[0] += 1
            bin_[1] += gap / 1000
        if end is not None and e.time_range.start - end > min_us:
            found.append((e.time_range.start - end, end, e.time_range.start, last.name, e.name))
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e
    longest = []
    for us, lo, hi, before, after in sorted(found, reverse=True)[:25]:
        during = [h.name for h in host if lo <= h.time_range.start < hi][:6]
        longest.append(dict(ms=us / 1000, after=before, before=after, host=", ".join(during)))
    return dict(idle_ms_total=sum(g[0] for g in found) / 1000, count=len(found), idle_ms_all_gaps=idle_all / 1000,
                device_events=len(device), by_size={k: dict(count=n, ms=ms) for k, (n, ms) in bins.items()},
                longest=longest)


def matmul_table(prof: profile, steps: int) -> list[dict]:
    """Each distinct matmul of the step (operator, operand shapes and strides) with the kernels it
    ran and their GPU time per step: which of a linear's three GEMMs a slow kernel belongs to."""
    table: dict[tuple, dict] = {}
    for e in prof.events():
        if e.name not in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm"):
            continue
        strides = getattr(e, "structured_input_strides", None) or getattr(e, "input_strides", None)
        key = (e.name, str(e.input_shapes), str(strides))
        row = table.setdefault(key, dict(op=e.name, shapes=e.input_shapes, strides=strides, calls=0, ms=0.0, kernels=set()))
        row["calls"] += 1
        for k in getattr(e, "kernels", []):
            row["ms"] += k.duration / 1000
            row["kernels"].add(k.name[:80])
    rows = sorted(table.values(), key=lambda r: -r["ms"])
    return [dict(r, calls=r["calls"] / steps, ms=r["ms"] / steps, kernels=sorted(r["kernels"])) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="gpt2-124m")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="/tmp/hasten-profile")
    parser.add_argument("--top", type=int, default=30, help="kernels listed, the longest first")
    parser.add_argument("--gaps", action="store_true", help="also record the host side and report where the GPU "
                        "sat idle between kernels (wall time per step against kernel time, the longest gaps)")
    parser.add_argument("--matmuls", action="store_true", help="also record operand shapes and list each distinct "
                        "matmul with its kernels and GPU time")
    args = parser.parse_args()
    out = Path(args.out)
    cfg = load_config(args.recipe, ["data.tokenizer=byte", "model.vocab_size=50304", f"train.out_dir={out}/run",
                                    "log.tensorboard=false", *args.overrides])
    run = build_run(cfg)
    forward_loss = compiled_loss(run)
    for step in range(args.warmup):
        train_step(run, forward_loss, step)
    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    activities = [ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]
    if (args.gaps or args.matmuls) and gpu:
        activities.append(ProfilerActivity.CPU)
    with profile(activities=activities, record_shapes=args.matmuls) as prof:
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            train_step(run, forward_loss, step)
        sync()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    gaps = idle_gaps(prof) if args.gaps and gpu else None
    matmuls = matmul_table(prof, args.steps) if args.matmuls and gpu else None
    events = [e for e in prof.key_averages() if (e.device_time_total if gpu else e.self_cpu_time_total) > 0]
    if gpu:  # kernels only (with the host side recorded, host operations carry their kernels' time too), and
        # not the spans that annotate them on the GPU's timeline ("## Call CompiledFxGraph ..", "Optimizer.step#..")
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False) and not _annotation(e.key)]
    if not gpu:  # a CPU run only checks the script: rank operators by their own CPU time
        for e in events:
            e.device_time_total = e.self_cpu_time_total
    total = sum(e.device_time_total for e in events)
    by_family: dict[str, float] = defaultdict(float)
    for e in events:
        by_family[family(e.key)] += e.device_time_total
    rows = sorted(events, key=lambda e: -e.device_time_total)[:args.top]
    report = dict(recipe=args.recipe, overrides=args.overrides, steps=args.steps, device=torch.cuda.get_device_name() if gpu else "cpu",
                  gpu_ms_per_step=total / 1000 / args.steps, wall_ms_per_step=wall_ms, gaps=gaps,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
                  families={k: dict(ms_per_step=v / 1000 / args.steps, share=v / total) for k, v in by_family.items()},
                  top_kernels=[dict(name=e.key[:120], ms_per_step=e.device_time_total / 1000 / args.steps,
                                    calls_per_step=e.count / args.steps, share=e.device_time_total / total)
                               for e in rows], matmuls=matmuls)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.json").write_text(json.dumps(report, indent=1))
    print(f"GPU time per step: {report['gpu_ms_per_step']:.1f} ms, peak memory {report['peak_memory_gib'] or 0:.2f} GiB")
    for name, v in sorted(report["families"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
        print(f"  {name:<40} {v['ms_per_step']:7.2f} ms  {100 * v['share']:5.1f} %")
    print(f"wall time per step: {wall_ms:.1f} ms (under the profiler)")
    if gaps:
        print(f"GPU idle: {gaps['idle_ms_all_gaps'] / args.steps:.2f} ms per step in all, "
              f"{gaps['idle_ms_total'] / args.steps:.2f} ms in gaps over 20 us; {gaps['device_events'] / args.steps:.0f} "
              "kernels and copies a step; by gap size, per step:")
        for size, b in gaps["by_size"].items():
            print(f"  {size:<11} {b['count'] / args.steps:7.1f} gaps {b['ms'] / args.steps:6.2f} ms")
        print("longest:")
        for g in gaps["longest"][:12]:
            print(f"  {g['ms']:6.2f} ms after {g['after'][:50]} before {g['before'][:50]} | host: {g['host'][:120]}")
    for m in matmuls or []:
        print(f"  {m['ms']:7.2f} ms x{m['calls']:<4.0f} {m['op']} {m['shapes']} strides {m['strides']}: {', '.join(m['kernels'])[:80]}")
    for k in report["top_kernels"]:
        print(f"  {k['ms_per_step']:7.2f} ms {100 * k['share']:5.1f} % x{k['calls_per_step']:<5.0f} {k['name'][:90]}")


if __name__ == "__main__":
    main()
