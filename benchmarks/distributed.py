"""Distributed training on 1/2/4 GPUs: tokens/s per GPU and peak memory per GPU for ddp, zero2,
zero3 and zero3 + CPU offload on a 1B-class model in bf16, and the largest model zero3 trains.

Each configuration is one `torchrun --nproc-per-node N -m hasten train` subprocess (the real launch
path); its numbers are read from the run's summary.json. Writes benchmarks/results/distributed.json.

    python benchmarks/distributed.py                 # on a machine with 4 GPUs
    python benchmarks/distributed.py --smoke         # CPU, tiny model, 1-2 ranks: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hasten.parallel import zero_memory_bytes
from hasten.provenance import source_commit

RESULTS = Path(__file__).parent / "results" / "distributed.json"
STRATEGIES = [("ddp", []), ("zero2", []), ("zero3", []), ("zero3+offload", ["parallel.cpu_offload=true"])]
# Bigger than the largest preset: Llama-2-7B and -13B shapes (dim, layers, heads), for the "largest" search.
LARGE_SHAPES = [("1b", ["model.preset=1b"]),
                ("3b", ["model.dim=3200", "model.n_layers=26", "model.n_heads=32", "model.ffn_dim=8640",
                        "model.max_seq_len=2048"]),
                ("7b", ["model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.ffn_dim=11008",
                        "model.max_seq_len=2048"]),
                ("13b", ["model.dim=5120", "model.n_layers=40", "model.n_heads=40", "model.ffn_dim=13824",
                         "model.max_seq_len=2048"])]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(nproc: int, overrides: list[str], out: Path, timeout: int) -> dict:
    """One torchrun launch; returns its summary (or the failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_port()), "-m", "hasten", "train", *overrides, f"train.out_dir={out}"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {timeout} s")
    if proc.returncode or not (out / "summary.json").exists():
        return dict(ok=False, error=proc.stderr[-1500:], wall_s=time.perf_counter() - start)
    summary = json.loads((out / "summary.json").read_text())
    return dict(ok=True, steps=summary["steps"], params=summary["params"],
                tokens_per_second=summary["tokens_per_second"],
                tokens_per_second_per_gpu=summary["tokens_per_second"] / nproc,
                peak_memory_gib_per_gpu=summary["peak_memory_gib"],  # rank 0's; ranks are symmetric
                memory_per_rank=summary["memory_per_rank"], mfu=summary.get("mfu"),
                wall_s=time.perf_counter() - start)


def _base(smoke: bool, steps: int) -> list[str]:
    if smoke:
        return ["model.preset=tiny", "data.tokenizer=byte", "data.max_documents=40", "train.batch_size=2",
                "train.seq_len=32", f"train.steps={steps}", "train.device=cpu", "train.threads=1"] + _QUIET
    return ["model.preset=1b", "data.tokenizer=byte", "data.max_documents=2000", "train.batch_size=8",
            "train.seq_len=2048", f"train.steps={steps}", "precision.dtype=bf16", "train.compile=true",
            "parallel.activation_checkpointing=none"] + _QUIET


_QUIET = ["log.every=5", "log.progress=false", "log.tensorboard=false", "log.plot=false", "log.sample_tokens=0",
          "train.eval_every=0", "train.eval_batches=1", "checkpoint.at_end=false", "checkpoint.every=0",
          "optim.warmup_steps=2"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 1 and 2 ranks; results not kept")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--world-sizes", default="1,2,4", help="GPU counts to run (those above the visible GPUs are left out)")
    parser.add_argument("--strategies", default=",".join(name for name, _ in STRATEGIES),
                        help="a subset of " + ",".join(name for name, _ in STRATEGIES))
    parser.add_argument("--largest", default=",".join(name for name, _ in LARGE_SHAPES),
                        help="shapes tried in turn for the largest model under zero3 ('' skips the search)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[],
                        help="train nothing: combine the rows of earlier results (later ones win) into --out")
    args = parser.parse_args()
    if args.merge:
        return _merge(args.merge, args.out)
    gpus = torch.cuda.device_count()
    if not args.smoke and gpus < 1:
        parser.error("no GPU visible; use --smoke to check the script on CPU")
    unknown = set(args.strategies.split(",")) - {name for name, _ in STRATEGIES}
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {[name for name, _ in STRATEGIES]}")
    world_sizes = [1, 2] if args.smoke else [n for n in map(int, args.world_sizes.split(",")) if n <= gpus]
    steps = 5 if args.smoke else args.steps
    work = Path(tempfile.mkdtemp(prefix="hasten-dist-"))
    os.environ.setdefault("HASTEN_CACHE", str(work / "cache"))
    rows = []
    for nproc in world_sizes:
        for name, extra in (item for item in STRATEGIES if item[0] in args.strategies.split(",")):
            if name == "ddp" and nproc == 1:
                extra = []  # one rank: ddp is the plain single-GPU baseline
            strategy = "none" if nproc == 1 and name == "ddp" else name.split("+")[0]
            overrides = [*_base(args.smoke, steps), f"parallel.strategy={strategy}", *extra]
            result = run_one(nproc, overrides, work / f"{name}-{nproc}", args.timeout)
            rows.append(dict(strategy=name, gpus=nproc, **result))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "memory_per_rank"}), flush=True)
    largest = _largest(args, work, max(world_sizes))
    report = dict(device=torch.cuda.get_device_name(0) if gpus else "cpu", gpus=gpus, torch=torch.__version__,
                  python=platform.python_version(), commit=source_commit(), smoke=args.smoke, steps=steps, rows=rows,
                  largest=largest, summary=_summary(rows, largest, max(world_sizes)))
    out = work / "distributed.json" if args.smoke else args.out  # smoke results are never kept in the repo
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {out}")
    return 0


def _merge(paths: list[Path], out: Path) -> int:
    """One report from several calls (e.g. the strategies in one, the largest-model search in another)."""
    reports = [json.loads(path.read_text()) for path in paths]
    rows = {(r["strategy"], r["gpus"]): r for report in reports for r in report["rows"]}
    largest = next((report["largest"] for report in reversed(reports) if report["largest"]), [])
    nproc = max(r["gpus"] for r in rows.values())
    merged = dict(reports[-1], rows=list(rows.values()), largest=largest, merged_from=[str(p) for p in paths],
                  commits=sorted({report["commit"] for report in reports}))
    merged["summary"] = _summary(merged["rows"], largest, nproc)
    out.write_text(json.dumps(merged, indent=1))
    print(json.dumps(merged["summary"], indent=1))
    return 0


def _largest(args: argparse.Namespace, work: Path, nproc: int) -> list[dict]:
    """Grow the model under zero3 until a shape no longer trains 3 steps."""
    shapes = [("tiny", ["model.preset=tiny"]), ("small", ["model.preset=small"])] if args.smoke else \
        [item for item in LARGE_SHAPES if item[0] in args.largest.split(",")]
    tried = []
    for name, shape in shapes:
        overrides = [*_base(args.smoke, 3), *shape, "parallel.strategy=zero3", "train.batch_size=1",
                     "parallel.activation_checkpointing=full"]
        result = run_one(nproc, overrides, work / f"largest-{name}", args.timeout)
        tried.append(dict(shape=name, gpus=nproc, **{k: v for k, v in result.items() if k != "memory_per_rank"}))
        print(json.dumps(tried[-1])[:400], flush=True)
        if not result["ok"]:
            break
    return tried


def _summary(rows: list[dict], largest: list[dict], nproc: int) -> dict:
    def find(strategy: str, gpus: int) -> dict | None:
        return next((r for r in rows if r["strategy"] == strategy and r["gpus"] == gpus and r["ok"]), None)

    def efficiency(strategy: str) -> float | None:  # per-GPU throughput at N GPUs over that at 1 GPU
        one, many = find(strategy, 1), find(strategy, nproc)
        return many["tokens_per_second_per_gpu"] / one["tokens_per_second_per_gpu"] if one and many else None

    single = find("ddp", 1)  # one GPU, no wrapper: the baseline every strategy's per-GPU rate is held to
    best = max((r for r in rows if r["gpus"] == nproc and r["ok"]), key=lambda r: r["tokens_per_second_per_gpu"],
               default=None)
    ddp, z3 = find("ddp", nproc), find("zero3", nproc)
    ratio = None
    if ddp and z3:
        state = lambda r: sum(r["memory_per_rank"][0][k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes"))  # noqa: E731
        ratio = state(z3) / state(ddp)
    ok = [t for t in largest if t["ok"]]
    return {f"scaling_efficiency_{nproc}gpu": best["tokens_per_second_per_gpu"] / single["tokens_per_second_per_gpu"]
            if best and single else None,
            f"best_strategy_{nproc}gpu": best["strategy"] if best else None,
            f"ddp_scaling_efficiency_{nproc}gpu": efficiency("ddp"), f"zero3_scaling_efficiency_{nproc}gpu": efficiency("zero3"),
            "zero3_state_bytes_per_gpu_ratio": ratio,
            "zero3_state_bytes_per_gpu_expected": 1 / nproc,
            f"largest_params_{nproc}gpu": ok[-1]["params"] if ok else None,
            "zero3_expected_bytes_per_gpu_16B": zero_memory_bytes(ok[-1]["params"], "zero3", nproc)["total_bytes"]
            if ok else None}


if __name__ == "__main__":
    sys.exit(main())
