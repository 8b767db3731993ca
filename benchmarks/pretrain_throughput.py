"""Pre-training throughput on one GPU: hasten's trainer vs a plain compiled loop vs HF Trainer.

GPT-2-124M-shaped models, seq 1024, batch 32, bf16, all fed windows of the same token stream
(the embedded corpus, BPE with GPT-2's vocabulary size). Each side runs in its own subprocess of
this one command, so their memory peaks and compile caches stay apart:

    python benchmarks/pretrain_throughput.py --out benchmarks/results

(a) hasten: `hasten.train` with the shipped `gpt2-124m` recipe (compile on, fused AdamW, bf16).
(b) plain: the same hasten model definition, `torch.compile`, fused AdamW, bf16 autocast, a loop
    written as in nanoGPT.
(c) HF: `transformers.Trainer` with `GPT2LMHeadModel`, `bf16=True`, `torch_compile=True`, fused
    AdamW.

Variants (`--sides side:variant,...`) add overrides to the hasten side; `model.*` overrides (the
`bf16res` variant: model.fp32_residual=false) apply to the plain side too, which is then reported
beside the recipe's rows and compared with hasten's row of the same variant.

Throughput is measured after warm-up (compilation excluded) between two synchronizations. Each
row also records the GPU's SM clock and power while it was busy (`gpu_busy`, from nvidia-smi): at
its power limit an H200 runs these steps well below its datasheet clock.
Each side checks its loss is finite and falling before its numbers are accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEQ, BATCH = 1024, 32
ROOT = Path(__file__).resolve().parents[1]


def _token_stream(cache_dir: str):
    from hasten.config import load_config
    from hasten.data import prepare_data

    cfg = load_config("gpt2-124m", [f"data.cache_dir={cache_dir}"])
    return prepare_data(cfg.data)


def _check_loss(losses: list[float]) -> None:
    import math
    if not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
        raise SystemExit(f"loss is not finite and falling: {losses[:3]} ... {losses[-3:]}")


def run_hasten(args: argparse.Namespace) -> dict:
    import hasten
    from hasten.config import load_config

    steps = args.warmup + args.steps
    cfg = load_config("gpt2-124m", [
        f"train.steps={steps}", f"train.out_dir={args.workdir}/hasten", f"data.cache_dir={args.workdir}/cache",
        f"log.every={args.log_every}", "train.eval_every=0", "train.eval_batches=2", "checkpoint.every=0",
        "checkpoint.at_end=false", "log.sample_tokens=0", "log.progress=false", "log.plot=false",
        "log.tensorboard=false", f"optim.warmup_steps={args.warmup}", *overrides(args.variant)])
    summary = hasten.train(cfg)
    records = [json.loads(x) for x in (Path(args.workdir) / "hasten" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    _check_loss(losses)
    return dict(name=f"hasten[{args.variant}]", overrides=overrides(args.variant),
                tokens_per_second=summary["tokens_per_second"], mfu=summary["mfu"],
                peak_memory_gib=summary["peak_memory_gib"], step_ms=1000 * BATCH * SEQ / summary["tokens_per_second"],
                final_loss=summary["final_loss"], params=summary["params"], flops_per_token=summary["flops_per_token"],
                wall_time_s=summary["wall_time_s"],  # compilation included
                loss_kernel=summary["loss_kernel"],  # what train.loss_kernel ran: quack, triton or torch
                gemm_kernel=summary.get("gemm_kernel"))  # what train.gemm_kernel ran the fused layers' GEMMs on


def _timed_loop(step_fn, batches, warmup: int, steps: int) -> tuple[float, list[float]]:
    """Run warm-up steps, then time `steps` steps between two synchronizations; returns step ms."""
    import torch
    losses = []
    for i in range(warmup):
        losses.append(step_fn(batches(i)))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step_fn(batches(i)))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 1000 * elapsed / steps, [x.item() for x in losses[:: max(1, len(losses) // 20)]] + [losses[-1].item()]


def run_plain(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from hasten.config import load_config
    from hasten.models import build_model, resolve_vocab_size

    data = _token_stream(f"{args.workdir}/cache")
    tokens = torch.from_numpy(data.train.astype("int64"))
    cfg = load_config("gpt2-124m", [o for o in overrides(args.variant) if o.startswith("model.")]).model
    torch.manual_seed(0)
    model = build_model(cfg, resolve_vocab_size(cfg, data.tokenizer.vocab_size), torch.device("cuda"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator().manual_seed(0)

    def batches(_: int):
        starts = torch.randint(0, len(tokens) - SEQ - 1, (BATCH,), generator=gen)
        window = torch.stack([tokens[s: s + SEQ + 1] for s in starts.tolist()]).pin_memory()
        window = window.to("cuda", non_blocking=True)
        return window[:, :-1], window[:, 1:]

    def forward_loss(x, y):  # the loss inside the compiled graph, as nanoGPT's model(x, y) does
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    compiled = torch.compile(forward_loss)

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    torch.cuda.reset_peak_memory_stats()
    step_ms, losses = _timed_loop(step, batches, args.warmup, args.steps)
    _check_loss(losses)
    tps = BATCH * SEQ / (step_ms / 1000)
    fpt = model.flops_per_token(SEQ)
    name = "plain_compiled" if args.variant == "recipe" else f"plain_compiled[{args.variant}]"
    return dict(name=name, tokens_per_second=tps, mfu=tps * fpt / 989e12, step_ms=step_ms,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, final_loss=losses[-1],
                params=model.num_params(), flops_per_token=fpt)


def run_hf(args: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    data = _token_stream(f"{args.workdir}/cache")
    tokens = torch.from_numpy(data.train.astype("int64"))
    steps = args.warmup + args.steps

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return steps * BATCH

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            s = int(torch.randint(0, len(tokens) - SEQ, (1,), generator=g))
            ids = tokens[s: s + SEQ]
            return {"input_ids": ids, "labels": ids}

    marks: dict[str, float] = {}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                marks["start"] = time.perf_counter()

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_end(self, targs, state, control, **kw):
            torch.cuda.synchronize()
            marks["end"] = time.perf_counter()

    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=SEQ, vocab_size=50304)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).cuda()
    targs = TrainingArguments(output_dir=f"{args.workdir}/hf", per_device_train_batch_size=BATCH, max_steps=steps,
                              learning_rate=6e-4, weight_decay=0.1, adam_beta2=0.95, warmup_steps=args.warmup,
                              bf16=True, torch_compile=True, optim="adamw_torch_fused", logging_steps=args.log_every,
                              save_strategy="no", report_to=[], dataloader_num_workers=4, dataloader_pin_memory=True,
                              max_grad_norm=1.0, disable_tqdm=True)
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Clock()]).train()
    _check_loss(losses)
    step_ms = 1000 * (marks["end"] - marks["start"]) / args.steps
    tps = BATCH * SEQ / (step_ms / 1000)
    return dict(name="hf_trainer", tokens_per_second=tps, step_ms=step_ms, final_loss=losses[-1],
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                params=sum(p.numel() for p in model.parameters()))


SIDES = {"hasten": run_hasten, "plain": run_plain, "hf": run_hf}
# hasten runs the shipped recipe as is ("recipe"), and with single knobs changed, to show what each buys.
VARIANTS = {"recipe": [], "flash": ["train.attention_backend=flash"], "cudnn": ["train.attention_backend=cudnn"],
            "fa4": ["train.attention_backend=fa4"],
            "autotune": ["train.compile_mode=max-autotune-no-cudagraphs"],
            "blocks": ["train.compile_scope=blocks"],  # each block compiled alone: less compile time
            "cudagraphs": ["train.compile_mode=reduce-overhead"], "maxautotune": ["train.compile_mode=max-autotune"],
            "bf16res": ["model.fp32_residual=false"],  # model.* apply to plain too
            "split": ["model.split_residual=true"],  # the fp32 stream stored as a bf16 pair (the recipe's default)
            "nosplit": ["model.split_residual=false"],  # the fp32 stream as one fp32 tensor (the default before)
            "losschunk": ["train.loss_chunk=8192"],
            "plainloss": ["train.loss_chunk=0"],  # the recipe's loss chunk off: cross-entropy in the compiled graph
            "triton": ["train.loss_kernel=triton"],  # the loss chunk's Triton kernel, also where QuACK is installed
            "quack": ["train.loss_kernel=quack"],  # QuACK's fused linear cross-entropy (Hopper, quack-kernels)
            "fused": ["model.fuse_projections=true"], "unfused": ["model.fuse_projections=false"],  # plain too
            "fusednorms": ["model.fuse_norms=true"], "unfusednorms": ["model.fuse_norms=false"],  # plain too
            "fp8": ["precision.fp8=rowwise"], "fp8_tensorwise": ["precision.fp8=tensorwise"]}
# Variants of the compiler's own settings, through its environment (each side runs in its own process):
# programmatic dependent launch (Hopper: a kernel starts while the one before it finishes) and
# Inductor's mix-order reductions (a norm's backward and its weight's gradient in one kernel) off.
VARIANT_ENV = {"pdl": {"TORCHINDUCTOR_ENABLE_PDL": "1"}, "nomix": {"TORCHINDUCTOR_MIX_ORDER_REDUCTION": "0"},
               "pdl_nomix": {"TORCHINDUCTOR_ENABLE_PDL": "1", "TORCHINDUCTOR_MIX_ORDER_REDUCTION": "0"}}


def overrides(variant: str) -> list[str]:
    """A variant's config overrides (none for the compiler's environment variants)."""
    return VARIANTS.get(variant, [])


TARGETS = {"ratio_vs_plain": 1.0, "ratio_vs_hf": 1.5, "hasten_mfu": 0.50}  # of the shipped recipe
ORDER = [("plain", "recipe"), ("hasten", "recipe"), ("hasten", "cudnn"), ("hf", "recipe"), ("hasten", "autotune")]


def _environment() -> dict:
    import torch

    from hasten.provenance import source_commit
    return dict(date=time.strftime("%Y-%m-%d"), commit=source_commit(),
                device=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), torch=torch.__version__,
                cuda=torch.version.cuda)


def _markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"# Pre-training throughput ({result['device']}, torch {result['torch']})", "",
             f"GPT-2-124M shape, seq {SEQ}, batch {BATCH}, bf16; {result['steps']} timed steps after "
             f"{result['warmup']} warm-up steps.", "",
             "| system | tokens/s | MFU | peak GiB | step ms | final loss | SM MHz, W (busy) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in result["rows"] if "error" not in r):
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") else "-"
        busy = r.get("gpu_busy")
        gpu = f"{busy['sm_clock_mhz_median']:.0f}, {busy['power_w_median']:.0f}" if busy else "-"
        lines.append(f"| {r['name']} | {r['tokens_per_second']:,.0f} | {mfu} | {r['peak_memory_gib']:.1f} | "
                     f"{r['step_ms']:.1f} | {r['final_loss']:.3f} | {gpu} |")
    failed = [r["name"] for r in result["rows"] if "error" in r]
    if failed:
        lines += ["", "Failed (error kept in the JSON): " + ", ".join(failed) + "."]
    ratios = [f"{name} / {over}: **{v[key]:.3f}**" for name, v in [("hasten", s), *s.get("variants", {}).items()]
              for key, over in (("ratio_vs_plain", "plain compiled"), ("ratio_vs_plain_same_variant",
                                                                        "plain compiled of the same variant"),
                                ("ratio_vs_hf", "HF Trainer")) if key in v]
    if s.get("hasten_mfu"):
        ratios.append(f"hasten MFU **{s['hasten_mfu']:.3f}** of the 989 TFLOP/s bf16 peak")
    lines += ["", "; ".join(ratios) + "."] if ratios else []
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SIDES), help="run one side in this process (used internally)")
    parser.add_argument("--steps", type=int, default=150, help="timed steps")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps (compilation happens here)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--variant", default="recipe", choices=sorted(VARIANTS.keys() | VARIANT_ENV.keys()))
    parser.add_argument("--sides", default=",".join(f"{a}:{b}" for a, b in ORDER), help="side:variant, comma-separated")
    parser.add_argument("--workdir", default="/tmp/hasten-bench")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(SIDES[args.only](args)), flush=True)
        return
    _token_stream(f"{args.workdir}/cache")  # tokenize once, outside every side's timing
    rows = []
    for item in args.sides.split(","):
        side, variant = item.split(":")
        cmd = [sys.executable, __file__, "--only", side, "--variant", variant, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--log-every", str(args.log_every), "--workdir", args.workdir]
        env = VARIANT_ENV.get(variant, {})
        with GpuSampler() as gpu:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", flush=True)
            rows.append(dict(name=side, error=proc.stderr[-2000:]))
            _write(args, rows)
            continue
        rows.append(json.loads(found[-1][len("RESULT "):]) | ({"env": env} if env else {}) | gpu.summary())
        print(json.dumps(rows[-1]), flush=True)
        _write(args, rows)


class GpuSampler:
    """The GPU's SM clock and power draw, sampled by nvidia-smi every `interval_ms` while a side runs.
    Under sustained load an H200 can sit at its power limit, its clock well below the 1980 MHz its
    datasheet peak assumes; the samples of the busy part of the run (over half the power limit)
    say how far. Nothing is recorded where nvidia-smi is missing. (`step_clocks.py` uses it too.)"""

    QUERY = "clocks.sm,power.draw,power.limit,clocks_event_reasons.sw_power_cap"

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"hasten-gpu-{os.getpid()}.csv"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                                          "-i", "0", "-lms", str(self.interval_ms)], stdout=self.log.open("w"),
                                         stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def samples(self) -> list[tuple[float, float, float, bool]]:
        """(SM MHz, power W, power limit W, power-capped) per readable sample; the log is removed."""
        rows, text = [], self.log.read_text() if self.log.exists() else ""
        self.log.unlink(missing_ok=True)
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                rows.append((float(parts[0]), float(parts[1]), float(parts[2]), parts[3] == "Active"))
            except (ValueError, IndexError):
                continue
        return rows

    @staticmethod
    def stats(rows: list[tuple[float, float, float, bool]]) -> dict:
        import statistics
        return dict(samples=len(rows), sm_clock_mhz_median=statistics.median(r[0] for r in rows),
                    power_w_median=statistics.median(r[1] for r in rows), power_limit_w=rows[0][2],
                    power_capped_share=sum(r[3] for r in rows) / len(rows)) if rows else dict(samples=0)

    def summary(self) -> dict:
        busy = [r for r in self.samples() if r[1] > 0.5 * r[2]]
        return dict(gpu_busy=self.stats(busy)) if busy else {}


def _summary(rows: list[dict]) -> dict:
    """The shipped recipe against the plain loop and HF Trainer, with each variant beside it.

    The summary compares the shipped recipe as is; the variants are reported beside it, not
    picked from after the fact (the best of several noisy runs would overstate the result).
    """
    by = {r["name"]: r for r in rows if "error" not in r}
    h, p, f = by.get("hasten[recipe]", {}), by.get("plain_compiled", {}), by.get("hf_trainer", {})
    summary = dict(hasten_config="hasten[recipe]", hasten_tokens_per_second=h.get("tokens_per_second"),
                   plain_compiled_tokens_per_second=p.get("tokens_per_second"),
                   hf_trainer_tokens_per_second=f.get("tokens_per_second"), hasten_mfu=h.get("mfu"),
                   hasten_peak_gib=h.get("peak_memory_gib"))
    if h and p:
        summary["ratio_vs_plain"] = h["tokens_per_second"] / p["tokens_per_second"]
    if h and f:
        summary["ratio_vs_hf"] = h["tokens_per_second"] / f["tokens_per_second"]
    variants = {name: dict(tokens_per_second=r["tokens_per_second"], overrides=r["overrides"], mfu=r["mfu"],
                           peak_memory_gib=r["peak_memory_gib"]) | ({"env": r["env"]} if r.get("env") else {})
                for name, r in by.items() if name.startswith("hasten[") and name != "hasten[recipe]"}
    for name, v in variants.items():
        plain_same = by.get(name.replace("hasten[", "plain_compiled["))  # the plain loop of the same variant
        for key, other in (("ratio_vs_plain", p), ("ratio_vs_plain_same_variant", plain_same), ("ratio_vs_hf", f)):
            if other:
                v[key] = v["tokens_per_second"] / other["tokens_per_second"]
    if variants:
        summary["variants"] = variants
    summary["targets"] = {key: f">= {value}" for key, value in TARGETS.items()}
    summary["targets_met"] = {key: summary[key] >= value for key, value in TARGETS.items()
                              if summary.get(key) is not None}
    return summary


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    """Write the results so far (a later side that fails or times out loses nothing)."""
    summary = _summary(rows)
    result = dict(suite="pretrain_throughput", **_environment(), steps=args.steps, warmup=args.warmup,
                  seq_len=SEQ, batch_size=BATCH, precision="bf16", rows=rows, summary=summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_throughput.json").write_text(json.dumps(result, indent=1))
    (out / "pretrain_throughput.md").write_text(_markdown(result))
    print(_markdown(result))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
