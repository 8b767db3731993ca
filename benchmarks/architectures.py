"""Efficient architectures on one GPU: Mamba-2 vs attention mixers, and dense vs MoE vs Mamba-2 vs
hybrid language models at equal wall time.

    python benchmarks/architectures.py --out benchmarks/results          # on the H200
    python benchmarks/architectures.py --smoke --out /tmp/arch-smoke     # any CPU, tiny sizes

(a) Mixer forward+backward time, bf16: a Mamba-2 mixer (SSD scan, torch.compile) vs attention
    (SDPA, flash kernel), same d_model and heads, batch*seq = 32k tokens, seq 2k..32k. Backward
    starts from a dense random gradient of the output, as inside a model.
    -> summary.mamba_vs_attention_speedup {seq: attention_ms / mamba_ms}
(b) Whole models through `hasten.train` with the same wall-time budget (train.time_limit_s), the
    gpt2-124m shape: dense; MoE (every FFN 8 experts, top-2, expert width = dense width / 2, so the
    same active parameters); optionally moe-alt (the moe-gpu recipe as shipped: MoE on every other
    layer); optionally moe-scaled (moe with model.moe_routed_scale=2: the top-2 weights, which
    sum to 1, then sum to 2, as a dense SwiGLU of twice an expert's width would add both halves);
    optionally moe-shared (moe plus one shared expert every token uses, DeepSeekMoE; each of the
    three experts a token uses is a third of the dense width, so active parameters still match);
    Mamba-2 (every mixer); hybrid (hybrid-gpu recipe). Each reports steady
    tokens/s and the validation loss at the end of its budget. With --horizon time (the default)
    each model's cosine spans its time budget (optim.horizon=time), so every model ends decayed
    however fast it steps; rows run with --horizon steps (the cosine over 10^6 steps: the rate
    stays at its peak) compare only with each other.
    -> summary.moe_tokens_per_second_ratio (MoE / dense), summary.moe_val_loss_delta_at_equal_time
       (MoE - dense; negative = MoE better)
(c) One MoE layer forward+backward: grouped dispatch (torch._grouped_mm) vs the per-expert loop.
    -> summary.grouped_vs_loop_speedup

Each model checks that its loss is finite and falling before its numbers are accepted. With
--parallel N the models of (b) train N at a time, one process per GPU, so that models compared
with each other ran on one host at the same time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time_ms(fn, warmup: int, iters: int, device) -> float:
    import torch
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def bench_mixers(args, device) -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hasten.models import Attention, Mamba2, rope_tables

    dim, heads = (64, 4) if args.smoke else (2048, 16)
    seqs = [64, 128] if args.smoke else [2048, 4096, 8192, 16384, 32768]
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else seqs
    tokens = 256 if args.smoke else 32768
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for seq in seqs:
        batch = max(1, tokens // seq)
        x = torch.randn(batch, seq, dim, device=device, dtype=dtype, requires_grad=True)
        rope = tuple(t.to(device) for t in rope_tables(dim // heads, seq))
        attention = Attention(dim, heads).to(device, dtype)
        mamba = Mamba2(dim, d_state=64 if not args.smoke else 16, head_dim=2 * dim // heads, expand=2,
                       chunk_size=128 if not args.smoke else 16).to(device, dtype)
        mamba_fn = torch.compile(mamba, dynamic=False) if not args.smoke else mamba  # one shape: no dynamic recompile

        grad = torch.randn_like(x)  # a dense upstream gradient, as a layer inside a model receives

        def attn_step():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]):
                attention(x, rope).backward(grad)

        def mamba_step():
            mamba_fn(x).backward(grad)

        row = dict(seq=seq, batch=batch, dim=dim, heads=heads,
                   attention_ms=_time_ms(attn_step, args.warmup, args.iters, device),
                   mamba_ms=_time_ms(mamba_step, args.warmup, args.iters, device))
        row["speedup"] = row["attention_ms"] / row["mamba_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_grouped(args, device) -> dict:
    import torch

    from hasten.models import MoE

    dim, hidden, tokens = (64, 64, 512) if args.smoke else (768, 1024, 32768)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    grouped = MoE(dim, hidden, num_experts=8, top_k=2, impl="grouped").to(device)
    loop = MoE(dim, hidden, num_experts=8, top_k=2, impl="loop").to(device)
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(1, tokens, dim, device=device, requires_grad=True)
    result = {}
    for name, layer in (("grouped", grouped), ("loop", loop)):
        def step(layer=layer):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                y = layer(x)
            y.float().sum().backward()
        result[f"{name}_ms"] = _time_ms(step, args.warmup, args.iters, device)
    outputs = {}  # the same numbers both ways: output and expert-weight gradients, relative error
    for name, layer in (("grouped", grouped), ("loop", loop)):
        layer.zero_grad()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x).float()
        (y * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        outputs[name] = [y.detach(), *(p.grad.float() for p in (layer.w1, layer.w3, layer.w2, layer.router.weight))]
    result["grouped_vs_loop_rel_error"] = max(((a - b).norm() / b.norm()).item()
                                              for a, b in zip(outputs["grouped"], outputs["loop"]))
    from hasten.models.ops import grouped_mm_available
    result.update(dim=dim, hidden=hidden, tokens=tokens, experts=8, top_k=2,
                  grouped_kernel=grouped_mm_available(x.to(dtype)), speedup=result["loop_ms"] / result["grouped_ms"])
    print(json.dumps(result), flush=True)
    return result


# MoE variants compared with dense as moe is: model name -> (summary key prefix, how the report names it).
MOE_VARIANTS = {"moe-alt": ("moe_alternating", "MoE on every other layer"),
                "moe-scaled": ("moe_scaled", "MoE with routed scale 2"),
                "moe-shared": ("moe_shared", "MoE with a shared expert")}


def _model_variants(smoke: bool) -> dict[str, tuple[str, list[str]]]:
    if smoke:
        base = ["model.preset=tiny", "model.n_layers=4", "model.ssm_state=16", "model.ssm_head_dim=16",
                "model.ssm_chunk=16", "data.tokenizer=byte", "data.max_documents=60", "train.batch_size=4",
                "train.seq_len=64", "model.max_seq_len=64", "train.device=cpu", "precision.dtype=fp32"]
        return {"dense": ("default", base), "moe": ("default", [*base, "model.ffns=EEEE"]),
                "moe-alt": ("default", [*base, "model.ffns=DEDE"]),
                "moe-scaled": ("default", [*base, "model.ffns=EEEE", "model.moe_routed_scale=2"]),
                "moe-shared": ("default", [*base, "model.ffns=EEEE", "model.moe_shared_expert=true"]),
                "mamba": ("default", [*base, "model.mixers=MMMM"]),
                "hybrid": ("default", [*base, "model.mixers=MMAM", "model.ffns=DEDE"])}
    every = "E" * 12
    return {"dense": ("gpt2-124m", ["train.loss_chunk=0"]),  # the plain loss, as the other recipes "moe": ("moe-gpu", [f"model.ffns={every}"]), "moe-alt": ("moe-gpu", []),
            "moe-scaled": ("moe-gpu", [f"model.ffns={every}", "model.moe_routed_scale=2"]),
            "moe-shared": ("moe-gpu", [f"model.ffns={every}", "model.moe_shared_expert=true"]),
            "mamba": ("mamba-gpu", []), "hybrid": ("hybrid-gpu", [])}


def bench_model(args, name: str) -> dict:
    import hasten
    from hasten.config import load_config
    from hasten.train.log import read_log

    recipe, overrides = _model_variants(args.smoke)[name]
    out = Path(args.workdir) / name
    data = [f"data.source={args.data}", f"data.max_documents={args.max_documents}"] if args.data else []
    # Smoke runs count steps, not seconds: on a loaded machine a few seconds can hold too few steps
    # to see the loss fall, and the check below would fail for no fault of the code.
    budget = ["train.steps=24"] if args.smoke else ["train.steps=1000000", f"train.time_limit_s={args.seconds}",
                                                    f"optim.horizon={args.horizon}"]
    budget += [f"train.seed={args.seed}"] if args.seed is not None else []
    cfg = load_config(recipe, [*overrides, *data, f"train.out_dir={out}", f"data.cache_dir={args.workdir}/cache",
                               *budget, "train.eval_every=0",
                               "train.eval_batches=20", "checkpoint.every=0", "checkpoint.at_end=false",
                               "log.progress=false", "log.plot=false", "log.tensorboard=false", "log.sample_tokens=0",
                               f"log.every={1 if args.smoke else 50}"])
    summary = hasten.train(cfg)
    losses = [r["loss"] for r in read_log(out / "metrics.jsonl") if r["event"] == "train"]
    if not losses or not all(math.isfinite(v) for v in losses) or not losses[-1] < losses[0]:
        raise SystemExit(f"{name}: loss is not finite and falling: {losses[:3]} ... {losses[-3:]}")
    return dict(name=name, data=args.data_label or args.data or "recipe (stdlib)", seconds=args.seconds,
                horizon="steps" if args.smoke else args.horizon, seed=cfg.train.seed,
                tokens_per_second=summary["tokens_per_second"], val_loss=summary["final_val_loss"],
                steps=summary["steps"], wall_time_s=summary["wall_time_s"], params=summary["params"],
                flops_per_token=summary["flops_per_token"], mfu=summary["mfu"],
                peak_memory_gib=summary["peak_memory_gib"], final_loss=losses[-1])


def _environment() -> dict:
    import torch

    from hasten.provenance import source_commit
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return dict(date=time.strftime("%Y-%m-%d"), commit=source_commit(),
                device=device, torch=torch.__version__, cuda=torch.version.cuda)


def _markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Efficient architectures ({result['device']}, torch {result['torch']})", "",
             "## Mixer forward+backward, bf16, 32k tokens per call", "",
             "| seq | batch | attention (flash) ms | Mamba-2 (SSD, compiled) ms | attention / Mamba-2 |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['seq']} | {r['batch']} | {r['attention_ms']:.2f} | {r['mamba_ms']:.2f} | {r['speedup']:.2f} |"
              for r in result["mixers"]]
    if "layers_from" in result:
        lines += ["", f"(Mixer and MoE-layer timings from commit {result['layers_from']['commit'][:7]}, "
                  f"{result['layers_from']['date']}.)"]
    lines += ["", "## Whole models at equal wall time", "",
              "Data: " + "; ".join(f"{source} ({', '.join(r['name'] for r in result['models'] if r.get('data', 'recipe (stdlib)') == source)})"
                                   for source in dict.fromkeys(r.get("data", "recipe (stdlib)") for r in result["models"])) + ".",
              "",
              "| model | training s | lr decay | seed | params | tokens/s | MFU | val loss | steps | peak GiB | commit |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["models"]:
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") else "-"
        decay = "over its time" if r.get("horizon") == "time" else "none"
        lines.append(f"| {r['name']} | {r.get('seconds', result['seconds']):g} | {decay} | {r.get('seed', '-')} | {r['params'] / 1e6:.1f}M | {r['tokens_per_second']:,.0f} | {mfu} | "
                     f"{r['val_loss']:.3f} | {r['steps']} | {r['peak_memory_gib']:.1f} | {r.get('commit', result['commit'][:7])} |")
    g = result["grouped"]
    pairs = [] if math.isnan(s["moe_tokens_per_second_ratio"]) else [  # all-MoE ran beside dense
        f"MoE tokens/s over dense: **{s['moe_tokens_per_second_ratio']:.3f}**; MoE val loss minus dense "
        f"at equal time: **{s['moe_val_loss_delta_at_equal_time']:+.3f}**."]
    pairs += [f"{label} ({name}): **{s[f'{key}_tokens_per_second_ratio']:.3f}**, "
              f"**{s[f'{key}_val_loss_delta_at_equal_time']:+.3f}**."
              for name, (key, label) in MOE_VARIANTS.items() if f"{key}_tokens_per_second_ratio" in s]
    lines += [*(["", result["note"] + "."] if result.get("note") else []), "", " ".join(pairs),
              f"One MoE layer ({g['tokens']} tokens, {g['experts']} experts, top-{g['top_k']}), grouped over loop: "
              f"**{s['grouped_vs_loop_speedup']:.2f}x** (grouped GEMM kernel: {g['grouped_kernel']})" + (
                  f"; output and gradients differ from the loop's by {g['grouped_vs_loop_rel_error']:.1e} (relative)."
                  if "grouped_vs_loop_rel_error" in g else ".")]
    return "\n".join(lines) + "\n"


def _train_in_parallel(args, names: list[str], result: dict) -> list[dict]:
    """The model rows of (b) from `args.parallel` processes of this script at once, each on a GPU of its own
    (the i-th of CUDA_VISIBLE_DEVICES, else GPU i) and with its share of the models, one after another."""
    import torch
    on_gpus = torch.cuda.is_available() and not args.smoke  # smoke: processes on the CPU, the variable unused
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()] or \
        [str(i) for i in range(torch.cuda.device_count() if on_gpus else args.parallel)]
    if len(gpus) < args.parallel:
        raise SystemExit(f"--parallel={args.parallel} needs {args.parallel} GPUs; {len(gpus)} visible")
    shared = ["--seconds", str(args.seconds), "--horizon", args.horizon, "--workdir", args.workdir,
              "--warmup", str(args.warmup), "--iters", str(args.iters), "--skip-layers",
              *(["--seed", str(args.seed)] if args.seed is not None else []), *(["--smoke"] if args.smoke else []),
              *(["--data", args.data, "--data-label", args.data_label, "--max-documents", str(args.max_documents)]
                if args.data else [])]
    layers = {k: result[k] for k in ("mixers", "grouped", "layers_from", "commit", "date") if k in result}
    procs = []
    for i in range(min(args.parallel, len(names))):
        part = Path(args.workdir) / f"parallel-{i}"
        part.mkdir(parents=True, exist_ok=True)
        (part / "architectures.json").write_text(json.dumps({**layers, "models": []}))  # (a), (c) are not rerun
        command = [sys.executable, __file__, *shared, "--models", ",".join(names[i::args.parallel]), "--out", str(part)]
        log = (part / "log.txt").open("w")
        procs.append((part, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i].strip()})))
    rows = []
    for part, log, proc in procs:
        proc.wait()
        log.close()
        if proc.returncode:
            tail = "".join((part / "log.txt").read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise SystemExit(f"the process training {part.name} exited with {proc.returncode}:\n{tail}")
        rows += [r for r in json.loads((part / "architectures.json").read_text())["models"] if r["name"] in names]
    return sorted(rows, key=lambda r: names.index(r["name"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for architectures.json and .md")
    parser.add_argument("--workdir", default="/tmp/hasten-arch-bench", help="run folders and token cache")
    parser.add_argument("--seconds", type=float, default=300, help="training budget of each model in (b) (--smoke: 24 steps instead)")
    parser.add_argument("--horizon", choices=("time", "steps"), default="time",
                        help="what each model's lr decay spans in (b): its time budget, or 10^6 steps (no decay)")
    parser.add_argument("--seed", type=int, default=None, help="train.seed of every model in (b) (default: the recipes' "
                                                                  "own): repeats of a comparison with other draws")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CPU ok): checks the script")
    parser.add_argument("--seqs", default="", help="(a) at these sequence lengths only, e.g. 16384 (default: all)")
    parser.add_argument("--skip-models", action="store_true", help="only the layer benchmarks (a) and (c)")
    parser.add_argument("--models", default="dense,moe,mamba,hybrid", help="which models (b) trains, in order")
    parser.add_argument("--data", default="", help="data.source for (b) instead of each recipe's (the embedded corpus, "
                                                     "7.4M training tokens: about two passes per 30 s for the dense model): a folder or glob of "
                                                     "local text, for budgets longer than one pass")
    parser.add_argument("--data-label", default="", help="with --data: how the rows name the data (default: --data "
                                                           "itself); rows compare with dense only under the same name")
    parser.add_argument("--max-documents", type=int, default=0, help="with --data: data.max_documents (0 = all)")
    parser.add_argument("--skip-layers", action="store_true",
                        help="only the models (b); (a) and (c) are read from --out's architectures.json "
                             "(models not run now are always kept from it)")
    parser.add_argument("--rows-from", default="",
                        help="comma-separated architectures.json files whose model rows join --out's (a row of the same "
                             "name is replaced; rows run now win): to put side by side models trained at the same time "
                             "on the GPUs of one host, one process per GPU. --models '' runs none, only joins")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="train the models of (b) N at a time, each process on a GPU of its own "
                             "(CUDA_VISIBLE_DEVICES), models dealt round-robin, then join their rows here: models "
                             "compared on one host at the same time (default: 1, one after another in this process)")
    args = parser.parse_args()
    if args.parallel < 1:
        raise SystemExit(f"--parallel={args.parallel} must be >= 1")
    if args.smoke:
        args.seconds, args.warmup, args.iters = min(args.seconds, 10), 1, 3
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(**_environment(), smoke=args.smoke, seconds=args.seconds)
    if args.skip_layers:  # keep (a) and (c) of an earlier run of this script, with the commit they came from
        earlier = json.loads((out / "architectures.json").read_text())
        result.update(mixers=earlier["mixers"], grouped=earlier["grouped"],
                      layers_from=earlier.get("layers_from", dict(commit=earlier["commit"], date=earlier["date"])))
    else:
        result["mixers"] = bench_mixers(args, device)
        result["grouped"] = bench_grouped(args, device)
    names = [] if args.skip_models else [n for n in args.models.split(",") if n]
    joined = [Path(p) for p in args.rows_from.split(",") if p]
    if missing := [str(p) for p in joined if not p.is_file()]:
        raise SystemExit(f"--rows-from: no such file: {', '.join(missing)}")
    earlier = [out / "architectures.json"] if (out / "architectures.json").is_file() else []
    kept = {}  # models of an earlier run, or of --rows-from, not run again now
    for path in [*earlier, *joined]:
        kept.update({r["name"]: r for r in json.loads(path.read_text()).get("models", []) if r["name"] not in names})
    result["models"] = list(kept.values())
    if args.parallel > 1 and len(names) > 1:
        result["models"] += _train_in_parallel(args, names, result)
    else:
        for name in names:
            result["models"].append({**bench_model(args, name), "commit": result["commit"][:7]})  # rows outlive this run
            (out / "architectures.partial.json").write_text(json.dumps(result, indent=1))  # kept if a later one dies
    models = {r["name"]: r for r in result["models"]}

    def against_dense(name: str) -> tuple[float, float]:
        """(tokens/s ratio, val loss delta) of a model against dense, when both ran on the same data, budget and
        seed: a paired comparison (rows of older runs drew their validation windows from the seed, too)."""
        other, dense = models.get(name), models.get("dense")
        if not other or not dense or any(other.get(k) != dense.get(k) for k in ("data", "seconds", "seed")) \
                or other.get("horizon", "steps") != dense.get("horizon", "steps"):
            return math.nan, math.nan
        return other["tokens_per_second"] / dense["tokens_per_second"], other["val_loss"] - dense["val_loss"]

    moe_ratio, moe_delta = against_dense("moe")
    result["summary"] = dict(
        mamba_vs_attention_speedup={str(r["seq"]): r["speedup"] for r in result["mixers"]},
        grouped_vs_loop_speedup=result["grouped"]["speedup"],
        moe_tokens_per_second_ratio=moe_ratio, moe_val_loss_delta_at_equal_time=moe_delta)
    for name, (key, _) in MOE_VARIANTS.items():
        ratio, delta = against_dense(name)
        if not math.isnan(ratio):  # ran beside dense, on its data and budget
            result["summary"].update({f"{key}_tokens_per_second_ratio": ratio,
                                      f"{key}_val_loss_delta_at_equal_time": delta})
    (out / "architectures.json").write_text(json.dumps(result, indent=1))
    (out / "architectures.md").write_text(_markdown(result))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
