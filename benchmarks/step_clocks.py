"""The recipe's step at full clock and at the power limit: how much of the gap to the datasheet is power.

    PYTHONPATH=src python benchmarks/step_clocks.py --out benchmarks/results gpt2-124m

Builds the run as `benchmarks/profile_step.py` does and, after warm-up, times (a) single steps
queued in full behind a 100 ms sleep kernel, after half a second of rest (the GPU cool, at its
boost clock, the host never in the way), (b) the host's own time to queue one step while the GPU
sleeps, and (c) a steady loop of back-to-back steps, as training runs. nvidia-smi samples the SM
clock, power draw and the power-cap throttle flag every 50 ms during each phase (the
sampler of `pretrain_throughput.py`). On a GPU whose steady loop sits at its power limit the clock drops, and the
step with it, whatever the software does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hasten.config import load_config
from hasten.train.build import build_run, compiled_loss
from hasten.train.loop import train_step
from hasten.train.metrics import cluster_peak_flops, mfu
from pretrain_throughput import GpuSampler  # this folder is first on a script's import path

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="gpt2-124m")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steady-steps", type=int, default=150)
    parser.add_argument("--out", default="/tmp/hasten-clocks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_clocks.py measures a GPU's clock under load: no CUDA device here")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.recipe, ["data.tokenizer=byte", "model.vocab_size=50304", f"train.out_dir={out}/run",
                                    "log.tensorboard=false", *args.overrides])
    run = build_run(cfg)
    forward_loss = compiled_loss(run)
    step = 0

    def steps(n: int) -> None:
        nonlocal step
        for _ in range(n):
            train_step(run, forward_loss, step)
            step += 1

    steps(20)  # compilation and warm-up
    torch.cuda.synchronize()
    sleep_cycles = int(2e8)  # about 100 ms at an H200's 1980 MHz

    def rested_steps() -> list[float]:
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            time.sleep(0.5)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(sleep_cycles)  # the step is queued whole before the GPU reaches it
            begin.record()
            steps(1)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return times

    def host_ms() -> list[float]:
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            torch.cuda._sleep(sleep_cycles * 3)
            began = time.perf_counter()
            steps(1)
            times.append(1000 * (time.perf_counter() - began))
        torch.cuda.synchronize()
        return times

    def steady() -> float:
        torch.cuda.synchronize()
        began = time.perf_counter()
        steps(args.steady_steps)
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - began) / args.steady_steps

    report = dict(suite="step_clocks", recipe=args.recipe, overrides=args.overrides, date=time.strftime("%Y-%m-%d"),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, phases={})
    for name, fn in (("rested_step_ms", rested_steps), ("host_ms_per_step", host_ms), ("steady_ms_per_step", steady),
                     ("rested_step_ms_after", rested_steps)):
        with GpuSampler(interval_ms=50) as gpu:
            result = fn()
        samples = gpu.samples()
        if samples:
            report["power_limit_w"] = samples[0][2]
        stats = GpuSampler.stats(samples)
        stats.pop("power_limit_w", None)
        report["phases"][name] = dict(
            result=[round(x, 2) for x in result] if isinstance(result, list) else round(result, 2), **stats)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    peak = cluster_peak_flops(run.device, run.precision.name, 1)
    for name in ("rested_step_ms", "steady_ms_per_step"):
        value = report["phases"][name]["result"]
        ms = statistics.median(value) if isinstance(value, list) else value
        report["phases"][name]["mfu"] = mfu(tokens / (ms / 1000), run.flops_per_token, peak)
    (out / "step_clocks.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
