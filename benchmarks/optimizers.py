"""Optimizers compared on one model and one token budget: how many steps and how much time each
needs to reach AdamW's final validation loss, and how much optimizer state it keeps.

Every registered optimizer (`hasten.optim.optimizer_names()`) trains the GPT-2-124M-shaped recipe
on the embedded corpus through `hasten.train`, with the same steps, batch, sequence length,
warmup and cosine schedule (schedule-free AdamW keeps only the warmup, by design). Each runs a small
learning-rate sweep: its grid centre times `--lr-mults`; the best final validation loss picks the
run that is reported. AdamW's best final validation loss is the target:

    steps_to_adamw_loss_ratio[opt] = first eval step where opt's val loss <= target / AdamW's step
    time_to_adamw_loss_ratio[opt]  = training time to that eval / AdamW's, at each run's steady
                                     tokens/s (Sophia's Hessian refreshes are inside its steps;
                                     compilation and evaluation passes are not: the first run of a
                                     call pays the cold compile, which would favour every later one)
    state_bytes_ratio[opt]         = optimizer-state bytes / AdamW's

Within one schedule an optimizer can hardly reach AdamW's final loss much before the end: the
cosine decay brings most of the last gains. The papers' "fewer steps" claims (Sophia, Muon) come
from shorter schedules instead, and so does the second measure here: with `--horizons`, each
optimizer's best rate trains again with `steps * h` steps (warmup scaled alike, the whole schedule
compressed), and

    steps_to_adamw_loss_ratio_by_horizon[opt] = the smallest h whose final val loss <= target
    time_to_adamw_loss_ratio_by_horizon[opt]  = h * AdamW's tokens/s / that run's tokens/s

On the H200 (one run per optimizer and rate; finished runs are reused, so the command can be
repeated after a time limit):

    PYTHONPATH=src python benchmarks/optimizers.py --out benchmarks/results --steps 2000

Smoke test on CPU (a tiny model; results go under /tmp and are not measurements):

    PYTHONPATH=src python benchmarks/optimizers.py --smoke

After a change of the measures, `--from-json benchmarks/results/X.json` derives the summary, table
and plot of a written result again from its recorded curves, training nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Grid centres for the GPT-2-124M recipe (AdamW 6e-4), from each method's published guidance; they
# are starting points, and a best rate at the edge of its grid is flagged in the results.
LR_CENTRE = {
    "adamw": 6e-4,               # the recipe's (nanoGPT's GPT-2 small)
    "sophia": 6e-4,              # Sophia's authors: about AdamW's rate, with rho ~0.04
    "lion": 1.5e-4,              # Lion paper: 3-10x smaller than AdamW ...
    "muon": 6e-4,                # match_rms_adamw scaling: AdamW's rate carries over (Moonlight)
    "adafactor": 1e-2,           # relative step size (torch's default), scaled by each weight's RMS
    "schedulefree_adamw": 1.2e-3,  # schedule-free authors: 1-10x the scheduled AdamW rate
    "adamw8bit": 6e-4,           # same as AdamW
}
EMBEDDED = "the embedded corpus (the Python standard library's .py files)"
EXTRA = {"lion": ["optim.weight_decay=0.4"]}  # ... with wd raised so that lr*wd matches AdamW's

SMOKE = ["model.preset=tiny", "data.tokenizer=byte", "data.max_documents=60", "train.batch_size=4",
         "train.seq_len=32", "train.eval_batches=2", "train.compile=false", "optim.warmup_steps=5",
         "precision.dtype=fp32"]


def run_one(name: str, lr: float, args: argparse.Namespace, horizon: float = 1.0) -> dict[str, Any]:
    """Train one (optimizer, rate, horizon); a finished run in the work folder is read back instead."""
    import hasten
    from hasten.config import load_config
    from hasten.train.log import read_log

    steps = round(args.steps * horizon)
    warmup = round(args.warmup_frac * steps)
    eval_every = args.eval_every if horizon == 1.0 else steps  # a shorter run is judged at its end
    overrides = [*(SMOKE if args.smoke else []), f"optim.name={name}", f"optim.lr={lr}",
                 f"train.steps={steps}", f"train.eval_every={eval_every}", "log.every=10",
                 f"optim.warmup_steps={warmup}",
                 "checkpoint.every=0", "checkpoint.at_end=false", "log.sample_tokens=0", "log.progress=false",
                 "log.plot=false", "log.tensorboard=false", f"data.cache_dir={args.cache_dir or Path(args.workdir) / 'cache'}",
                 *EXTRA.get(name, [])]
    overrides += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    overrides += [f"train.eval_batches={args.eval_batches}"] if args.eval_batches else []
    overrides += [f"data.source={args.data}", f"data.max_documents={args.max_documents}"] if args.data else []
    # A run is reused only under the same recipe and overrides: their hash is part of its folder's name.
    key = hashlib.sha1(" ".join([args.recipe, *overrides]).encode()).hexdigest()[:8]
    out = Path(args.workdir) / (f"{name}_lr{lr:.3g}" + (f"_h{horizon:g}" if horizon != 1.0 else "") + f"_{key}")
    if not (out / "summary.json").exists() or not json.loads((out / "summary.json").read_text())["completed"]:
        if args.reuse_only:
            raise RuntimeError(f"no finished run in {out.name} (--reuse-only)")
        overrides.append(f"train.out_dir={out}")
        hasten.train(load_config(args.recipe if not args.smoke else "default", overrides))
    summary = json.loads((out / "summary.json").read_text())
    records = read_log(out / "metrics.jsonl")
    curve = [dict(step=r["step"], elapsed_s=r["elapsed_s"], val_loss=r["val_loss"])
             for r in records if r["event"] == "eval"]
    return dict(optimizer=name, lr=lr, horizon=horizon, steps=steps, final_val_loss=summary["final_val_loss"], curve=curve,
                tokens_per_second=summary["tokens_per_second"], tokens_per_step=summary["global_batch_tokens"],
                wall_time_s=summary["wall_time_s"],
                optimizer_state_bytes=summary["optimizer_state_bytes"], peak_memory_gib=summary["peak_memory_gib"],
                params=summary.get("params"), completed=summary["completed"])


def training_seconds(run: dict[str, Any], step: int) -> float:
    """Seconds to train `step` steps at the run's steady tokens/s (no compilation, no evaluation)."""
    return step * run["tokens_per_step"] / run["tokens_per_second"]


def _reach(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """(step, training seconds) of the first evaluation at or below `target`."""
    for point in run["curve"]:
        if point["val_loss"] <= target:
            return point["step"], training_seconds(run, point["step"])
    return None, None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def by_horizon(best: dict[str, dict[str, Any]], shorter: list[dict[str, Any]]) -> dict[str, Any]:
    """The shortest schedule (fraction of the full one) whose final loss reaches AdamW's final loss."""
    target, base_tps = best["adamw"]["final_val_loss"], best["adamw"]["tokens_per_second"]
    finals: dict[str, dict[str, float]] = {n: {"1": r["final_val_loss"]} for n, r in best.items()}
    for run in shorter:
        finals[run["optimizer"]][f"{run['horizon']:g}"] = run["final_val_loss"]
    steps, times = {}, {}
    for name, full in best.items():
        reached = [(r["horizon"], r["tokens_per_second"]) for r in [full, *shorter]
                   if r["optimizer"] == name and r["final_val_loss"] <= target]
        h, tps = min(reached) if reached else (None, None)
        steps[name], times[name] = h, (h * base_tps / tps if h is not None else None)
    return dict(steps_to_adamw_loss_ratio_by_horizon=steps, time_to_adamw_loss_ratio_by_horizon=times,
                final_val_loss_by_horizon=finals)


def summarize(best: dict[str, dict[str, Any]], grid: dict[str, list[float]]) -> dict[str, Any]:
    target = best["adamw"]["final_val_loss"]
    base_step, base_time = _reach(best["adamw"], target)
    steps, times = {}, {}
    for name, run in best.items():
        step, seconds = _reach(run, target)
        steps[name], times[name] = _ratio(step, base_step), _ratio(seconds, base_time)
    base_bytes = best["adamw"]["optimizer_state_bytes"]
    return dict(adamw_final_val_loss=target, steps_to_adamw_loss_ratio=steps, time_to_adamw_loss_ratio=times,
                state_bytes_ratio={n: r["optimizer_state_bytes"] / base_bytes for n, r in best.items()},
                tokens_per_second={n: r["tokens_per_second"] for n, r in best.items()},
                best_lr={n: r["lr"] for n, r in best.items()},
                best_lr_at_grid_edge={n: len(grid[n]) > 1 and r["lr"] in (min(grid[n]), max(grid[n]))
                                      for n, r in best.items()})


def markdown(result: dict[str, Any], image: str = "optimizers.png") -> str:
    """The results table (one row per optimizer at its best rate, with the sweep)."""
    s, runs = result["summary"], result["runs"]
    fmt = lambda v, digits=2: "not reached" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = [f"# Optimizers ({result['device']}, torch {result['torch']})", "",
             f"`{result['recipe']}` model on {result.get('data', EMBEDDED)}, "
             f"{'batch ' + str(result['batch_size']) + ' x' if result['batch_size'] else 'the recipe’s batch of'} "
             f"{'1024 tokens' if not result['smoke'] else 'sequences'}, {result['steps']} steps, warmup "
             f"{result.get('warmup_frac', 0.5):g} of the run then cosine (schedule-free: warmup only), bf16, compiled; "
             f"validation every {result['eval_every']} steps. Target: AdamW's best final validation loss, "
             f"**{s['adamw_final_val_loss']:.3f}**.", "",
             "| optimizer | best lr (sweep: final val loss) | final val loss | steps to target / AdamW, same schedule "
             "| shortest schedule reaching it | time to target / AdamW (shortest schedule) | state bytes / AdamW | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    horizon = s.get("steps_to_adamw_loss_ratio_by_horizon", {})
    horizon_time = s.get("time_to_adamw_loss_ratio_by_horizon", {})
    for name, lr in s["best_lr"].items():
        sweep = ", ".join(f"{r['lr']:.3g}: {r['final_val_loss']:.3f}" for r in runs if r["optimizer"] == name)
        edge = " (edge)" if s["best_lr_at_grid_edge"].get(name) else ""
        best = next(r for r in runs if r["optimizer"] == name and r["lr"] == lr)
        finals = s.get("final_val_loss_by_horizon", {}).get(name, {})
        shortest = fmt(horizon.get(name)) + (" (" + ", ".join(f"{h}: {v:.3f}" for h, v in finals.items() if h != "1") + ")"
                                              if len(finals) > 1 else "")
        shortest, shortest_time = (shortest, fmt(horizon_time.get(name))) if result.get("horizons") else ("-", "-")
        lines.append(f"| {name} | {lr:.3g}{edge} ({sweep}) | {best['final_val_loss']:.3f} | "
                     f"{fmt(s['steps_to_adamw_loss_ratio'].get(name))} | {shortest} | {shortest_time} | "
                     f"{s['state_bytes_ratio'][name]:.3f} | {s['tokens_per_second'][name]:,.0f} |")
    lines += ["", f"![validation loss by step and by training time]({image})", ""]
    return "\n".join([*lines, result["note"], ""] if result.get("note") else lines)


def plot(best: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in best.items():
        label = f"{name} (lr {run['lr']:.2g})"
        by_step.plot([p["step"] for p in run["curve"]], [p["val_loss"] for p in run["curve"]], label=label)
        by_time.plot([training_seconds(run, p["step"]) for p in run["curve"]], [p["val_loss"] for p in run["curve"]],
                     label=label)
    for ax, xlabel in ((by_step, "step"), (by_time, "training time at the steady tokens/s (s)")):
        ax.axhline(best["adamw"]["final_val_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
    by_step.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(result: dict[str, Any], best: dict[str, dict[str, Any]], path: Path) -> None:
    """X.json, X.md (the table) and X.png (the curves) for `path` = X.json."""
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result, path.with_suffix(".png").name))
    plot(best, path.with_suffix(".png"))


def rederive(path: Path) -> None:
    """The summary, table and plot of a written result again, from its recorded runs. Runs recorded
    before `tokens_per_step` was kept get the result's batch times the recipe's sequence length."""
    from hasten.config import load_config

    result = json.loads(path.read_text())
    if not result.get("runs"):
        raise SystemExit(f"{path} records no runs (a summary only): nothing to derive again.")
    seq_len = load_config(result["recipe"]).train.seq_len if not result["smoke"] else None
    for run in [*result["runs"], *result["shorter_runs"]]:
        if "tokens_per_step" not in run:
            if seq_len is None or not result["batch_size"]:
                raise SystemExit(f"{path}: a run without tokens_per_step, and no batch to derive it from.")
            run["tokens_per_step"] = result["batch_size"] * seq_len
    best = {name: next(r for r in result["runs"] if r["optimizer"] == name and r["lr"] == lr)
            for name, lr in result["summary"]["best_lr"].items()}
    result["summary"] = summarize(best, result["lr_grid"])
    if result["horizons"]:
        result["summary"].update(by_horizon(best, result["shorter_runs"]))
    write_report(result, best, path)
    print(json.dumps(result["summary"]["time_to_adamw_loss_ratio"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="where optimizers.json and .png go (default benchmarks/results; "
                                                   "with --smoke a folder under /tmp)")
    parser.add_argument("--workdir", default="", help="run folders, reused (default /tmp/hasten-bench-optimizers; "
                                                       "with --smoke, runs/ under --out)")
    parser.add_argument("--recipe", default="gpt2-124m", help="recipe of the model and data")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps, the same for every run")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr-mults", default="0.5,1,2", help="the sweep: multiples of each grid centre")
    parser.add_argument("--adamw-lr-mults", default="", help="AdamW's own sweep (the target), if wider")
    parser.add_argument("--lr-mults-for", default="", help="per-optimizer sweeps, e.g. 'muon=1,2,4;lion=0.5,1'")
    parser.add_argument("--overrides-for", default="",
                        help="per-optimizer config overrides, e.g. 'sophia:optim.sophia_bias_correction=true;muon:...'")
    parser.add_argument("--warmup-frac", type=float, default=0.1, help="warmup steps as a fraction of each run's")
    parser.add_argument("--horizons", default="", help="shorter schedules to try, fractions of --steps, e.g. 0.5,0.7")
    parser.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: the recipe's)")
    parser.add_argument("--data", default="", help="data.source instead of the recipe's (the embedded corpus, 7.4M "
                                                     "training tokens, 0.9 of them in 400 steps of batch 16): a folder or "
                                                     "glob of local text, for budgets longer than one pass")
    parser.add_argument("--data-label", default="", help="with --data: how the report names the data (default: --data)")
    parser.add_argument("--max-documents", type=int, default=0, help="with --data: data.max_documents (0 = all)")
    parser.add_argument("--eval-batches", type=int, default=0, help="batches per evaluation (0: the recipe's)")
    parser.add_argument("--deadline-s", type=float, default=0, help="start no run after this many seconds")
    parser.add_argument("--optimizers", default="", help="comma-separated subset (adamw is always run)")
    parser.add_argument("--cache-dir", default="", help="tokenized data (default: under --workdir)")
    parser.add_argument("--reuse-only", action="store_true", help="train nothing: report the finished runs in --workdir")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, to test the script")
    parser.add_argument("--from-json", default="", help="train nothing: derive a written result's summary, table and "
                        "plot again from its recorded runs")
    args = parser.parse_args()
    if args.from_json:
        return rederive(Path(args.from_json))
    if args.smoke:
        args.out = args.out or "/tmp/hasten-bench-optimizers-smoke"
        args.workdir = args.workdir or f"{args.out}/runs"
        args.steps, args.eval_every = 30, 10
        LR_CENTRE.update(adamw=3e-3, sophia=3e-3, lion=1e-3, muon=3e-3, schedulefree_adamw=3e-3, adamw8bit=3e-3)

    args.out = args.out or "benchmarks/results"
    for item in filter(None, args.overrides_for.split(";")):
        name, _, overrides = item.partition(":")
        EXTRA[name] = [*EXTRA.get(name, []), *overrides.split()]  # in the runs' folder hash: folders of their own
    args.workdir = args.workdir or "/tmp/hasten-bench-optimizers"

    from hasten.optim import optimizer_names, optimizer_spec
    from hasten.provenance import source_commit
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [n for n in optimizer_names() if not args.optimizers or n == "adamw" or n in args.optimizers.split(",")]
    names.sort(key=lambda n: n != "adamw")  # the reference first
    skipped = {n: r for n in names if (r := optimizer_spec(n).unavailable(device))}
    mults = [float(m) for m in args.lr_mults.split(",")]
    grid = {n: [LR_CENTRE.get(n, LR_CENTRE["adamw"]) * m for m in mults] for n in names if n not in skipped}
    if "adamw" in grid and args.adamw_lr_mults:
        grid["adamw"] = [LR_CENTRE["adamw"] * float(m) for m in args.adamw_lr_mults.split(",")]
    for item in filter(None, args.lr_mults_for.split(";")):
        name, values = item.split("=")
        if name in grid:
            grid[name] = [LR_CENTRE.get(name, LR_CENTRE["adamw"]) * float(m) for m in values.split(",")]
    horizons = sorted(float(h) for h in args.horizons.split(",") if h)
    runs, shorter, best, failed = [], [], {}, {}
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def attempt(name: str, lr: float, horizon: float = 1.0) -> dict[str, Any] | None:
        key = f"{name}_lr{lr:.3g}" + (f"_h{horizon:g}" if horizon != 1.0 else "")
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            failed[key] = f"not run: the {args.deadline_s:.0f} s deadline had passed"
            return None
        try:
            return run_one(name, lr, args, horizon)
        except Exception as err:  # one optimizer's failure is recorded; the others still run
            failed[key] = f"{type(err).__name__}: {err}"
            print(f"{key} failed: {failed[key]}", flush=True)
            return None

    def write() -> None:
        """After every optimizer, so a run stopped by a time limit keeps what it measured."""
        summary = summarize(best, grid)
        if horizons:
            summary.update(by_horizon(best, shorter))
        result = dict(suite="optimizers", smoke=args.smoke, device=torch.cuda.get_device_name()
                      if device.type == "cuda" else platform.processor() or "cpu", torch=torch.__version__,
                      commit=source_commit(), recipe="default (tiny smoke overrides)" if args.smoke else args.recipe,
                      data=args.data_label or args.data or EMBEDDED,
                      steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                      warmup_frac=args.warmup_frac, lr_grid=grid, horizons=horizons, extra_overrides=EXTRA,
                      skipped=skipped, failed=failed, summary=summary, runs=runs, shorter_runs=shorter,
                      bench_seconds=time.perf_counter() - start)
        write_report(result, best, out / "optimizers.json")
        print(json.dumps(summary, indent=1), flush=True)

    for name, rates in grid.items():
        tried = [run for lr in rates if (run := attempt(name, lr))]
        runs += tried
        finite = [r for r in tried if math.isfinite(r["final_val_loss"])]
        if finite:
            best[name] = min(finite, key=lambda r: r["final_val_loss"])
        if "adamw" not in best:
            raise SystemExit("AdamW, the reference, did not finish: nothing to compare against.")
        write()
    target = best["adamw"]["final_val_loss"]
    for name, run in best.items():
        if horizons and run["final_val_loss"] <= target:  # one that misses at full length is not shortened
            for horizon in sorted(horizons, reverse=True):  # longest first; stop at the first miss
                short = attempt(name, run["lr"], horizon)
                if short is None:
                    break
                shorter.append(short)
                if not short["final_val_loss"] <= target:
                    break
            write()
    print(f"wrote {out / 'optimizers.json'} and {out / 'optimizers.png'}")


if __name__ == "__main__":
    main()
