"""The training loop, explicit and in one place.

    for step in range(start, steps):
        lr ← peak · schedule(step)
        for micro in range(grad_accum):                  # accumulate
            loss ← loss_fn(model, batch(step, micro))     # under autocast
            backward(loss / grad_accum)                   # scaled for fp16
        norm ← clip(grads)                                # after unscaling
        optimizer step unless norm is non-finite          # counted, no host sync when fused
        every log.every:      read the loss (the only host sync), log, progress
        every eval_every:     validation loss
        every checkpoint.every, on SIGTERM/SIGINT, on a run of bad steps: checkpoint
    finish: checkpoint, summary.json, loss.png, a generated sample

Methods that act inside a step do so through the loss function or the optimizer, never through
a branch here.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from hasten.train.build import Batch, Run, compiled_loss
from hasten.train.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from hasten.train.guard import StopSignal, step_if_finite
from hasten.train.log import RunLogger, plot_losses, truncate_log
from hasten.train.metrics import mfu, peak_flops, peak_memory_bytes, reset_peak_memory, synchronize

GIB = 2**30


@dataclass
class DeviceCounters:
    """Running sums kept on the device so that no step has to wait for the host."""

    loss_sum: torch.Tensor
    finite_steps: torch.Tensor
    skipped: torch.Tensor
    bad_streak: torch.Tensor
    worst_streak: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> DeviceCounters:
        return cls(*(torch.zeros((), device=device) for _ in range(5)))

    def add_step(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss)).float()
        self.loss_sum += torch.where(bad > 0, torch.zeros_like(loss), loss)
        self.finite_steps += 1 - bad
        self.skipped += skipped
        self.bad_streak.copy_((self.bad_streak + bad) * bad)
        torch.maximum(self.worst_streak, self.bad_streak, out=self.worst_streak)

    def read_and_reset(self) -> dict[str, float]:
        """One host sync: the interval's mean loss and the guard counters."""
        values = torch.stack([self.loss_sum, self.finite_steps, self.skipped, self.bad_streak,
                              self.worst_streak]).tolist()
        loss_sum, finite, skipped, streak, worst = values
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        self.skipped.zero_()
        self.worst_streak.copy_(self.bad_streak)
        return dict(loss=loss_sum / finite if finite else math.nan, skipped=skipped, streak=streak, worst=worst)


@dataclass
class Timer:
    """Wall time of the steps alone: evaluation and checkpoints are excluded from throughput."""

    start: float = field(default_factory=time.perf_counter)
    interval_start: float = field(default_factory=time.perf_counter)
    interval_steps: int = 0
    rates: list[float] = field(default_factory=list)  # tokens/s per log interval
    first_step_s: float | None = None  # the first step holds compilation and warm-up

    def training_seconds(self) -> float:
        """Seconds since the first step ended: what train.time_limit_s is compared with."""
        return time.perf_counter() - self.start - (self.first_step_s or 0.0)

    def restart_interval(self) -> None:
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def close_interval(self, tokens_per_step: int) -> float:
        elapsed = time.perf_counter() - self.interval_start
        rate = self.interval_steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
        self.rates.append(rate)
        self.restart_interval()
        return rate

    def steady_tokens_per_second(self) -> float:
        """Median over log intervals, leaving out the first (compilation and warm-up)."""
        rates = self.rates[1:] or self.rates
        return statistics.median(rates) if rates else 0.0


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _grad_norm(run: Run) -> torch.Tensor:
    params = [p for p in run.model.parameters() if p.grad is not None]
    max_norm = run.config.train.grad_clip or math.inf
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=run.device.type == "cuda" or None)


def train_step(run: Run, forward_loss: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, skipped flag)."""
    accum = run.config.train.grad_accum
    lr = run.config.optim.lr * run.schedule(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    for micro in range(accum):
        batch = _to_device(run.train_batches(step, micro), run.device)
        with run.precision.autocast():
            loss = forward_loss(batch)
        scaled = loss / accum
        (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        step_loss += loss.detach().float() / accum
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    skipped = step_if_finite(run.optimizer, _grad_norm(run), run.scaler)
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, skipped


@torch.no_grad()
def evaluate(run: Run, forward_loss: Any) -> float:
    """Mean loss over the same `eval_batches` validation batches every time."""
    if run.val_batches is None:
        return math.nan
    run.model.eval()
    total = torch.zeros((), device=run.device)
    for i in range(run.config.train.eval_batches):
        with run.precision.autocast():
            total += forward_loss(_to_device(run.val_batches(i, 0), run.device)).float()
    run.model.train()
    value = total.item() / run.config.train.eval_batches
    if torch.distributed.is_initialized():
        tensor = torch.tensor(value, device=run.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.AVG)
        value = tensor.item()
    return value


def _resume(run: Run, logger_path: Any) -> TrainerState:
    path = resolve_resume(run.run_dir, run.config.train.resume)
    if path is None:
        return TrainerState()
    state = load_checkpoint(path, run.model, run.optimizer, run.device)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    if run.rank == 0:
        truncate_log(logger_path, state.step)
    return state


def _save(run: Run, state: TrainerState) -> None:
    if run.scaler is not None:
        state.scaler = run.scaler.state_dict()
    save_checkpoint(run.run_dir, run.model, run.optimizer, state, run.device, run.config.checkpoint.keep)


def train_loop(run: Run) -> dict[str, Any]:
    """Run the loop to the configured number of steps (or a stop) and return the run's metrics."""
    cfg = run.config
    tokens_per_step = run.tokens_per_micro_batch * cfg.train.grad_accum * run.world_size
    state = _resume(run, run.run_dir / "metrics.jsonl")
    logger = RunLogger(run.run_dir, total_steps=cfg.train.steps, start_step=state.step, enabled=run.rank == 0,
                       progress=cfg.log.progress, tensorboard=cfg.log.tensorboard)
    if state.step:
        logger.print(f"resumed from step {state.step}")
    forward_loss = compiled_loss(run)
    counters, timer = DeviceCounters.zeros(run.device), Timer()
    peak = peak_flops(run.device, run.precision.name)
    last = dict(loss=math.nan, val_loss=math.nan, tokens_per_second=0.0)
    stop_reason = ""
    reset_peak_memory(run.device)
    run.model.train()
    with StopSignal() as stop:
        while state.step < cfg.train.steps and not stop_reason:
            loss, skipped = train_step(run, forward_loss, state.step)
            counters.add_step(loss, skipped)
            state.step += 1
            state.tokens_seen += tokens_per_step
            timer.interval_steps += 1
            if timer.first_step_s is None:
                timer.first_step_s = time.perf_counter() - timer.start
            if state.step % cfg.log.every == 0 or state.step == cfg.train.steps or stop.requested:
                stop_reason = _log_interval(run, state, counters, timer, logger, tokens_per_step, peak, last)
            if stop.requested and not stop_reason:
                stop_reason = f"received {stop.signal_name}"
            if cfg.train.time_limit_s and timer.training_seconds() >= cfg.train.time_limit_s:
                stop_reason = stop_reason or f"time limit of {cfg.train.time_limit_s:g} s reached"
            if (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or state.step == cfg.train.steps \
                    or stop_reason:
                _log_eval(run, state, forward_loss, logger, last, timer.start)
                timer.restart_interval()
            if stop_reason or (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or (
                    state.step == cfg.train.steps and cfg.checkpoint.at_end):
                _save(run, state)
                timer.restart_interval()
    return _finish(run, state, logger, timer, peak, last, stop_reason)


def _log_interval(run: Run, state: TrainerState, counters: DeviceCounters, timer: Timer, logger: RunLogger,
                  tokens_per_step: int, peak: float | None, last: dict[str, Any]) -> str:
    """Read the device counters, log them; return a stop reason when the guard trips."""
    values = counters.read_and_reset()
    rate = timer.close_interval(tokens_per_step)
    state.skipped_steps += int(values["skipped"])
    state.bad_loss_streak = int(values["streak"])
    lr = run.optimizer.param_groups[0]["lr"]
    record = dict(loss=values["loss"], lr=float(lr), tokens=state.tokens_seen, tokens_per_second=rate,
                  skipped_steps=state.skipped_steps, elapsed_s=time.perf_counter() - timer.start)
    if run.scaler is not None:
        record["loss_scale"] = float(run.scaler.get_scale())
    if (utilization := mfu(rate, run.flops_per_token or 0.0, peak)) is not None:
        record["mfu"] = utilization
    logger.log("train", state.step, **record)
    logger.advance(state.step, values["loss"], rate)
    last.update(loss=values["loss"], tokens_per_second=rate)
    if values["worst"] >= run.config.train.max_bad_steps:
        return (f"stopped: {int(values['worst'])} consecutive steps had a non-finite loss (limit "
                f"train.max_bad_steps={run.config.train.max_bad_steps}); lower optim.lr or use bf16/fp32")
    return ""


def _log_eval(run: Run, state: TrainerState, forward_loss: Any, logger: RunLogger, last: dict[str, Any],
              timer_start: float) -> None:
    val_loss = evaluate(run, forward_loss)
    if math.isnan(val_loss):
        return
    elapsed = time.perf_counter() - timer_start
    last["val_loss"] = val_loss
    last.setdefault("best_val_loss", val_loss)
    last["best_val_loss"] = min(last["best_val_loss"], val_loss)
    logger.log("eval", state.step, val_loss=val_loss, tokens=state.tokens_seen, elapsed_s=elapsed)
    baseline = run.info.get("unigram_val_loss")
    note = f" (unigram baseline {baseline:.4f})" if baseline else ""
    logger.print(f"step {state.step:>6}  val loss {val_loss:.4f}{note}")


def _finish(run: Run, state: TrainerState, logger: RunLogger, timer: Timer, peak: float | None,
            last: dict[str, Any], stop_reason: str) -> dict[str, Any]:
    from hasten.optim import optimizer_state_bytes

    synchronize(run.device)
    tokens_per_second = timer.steady_tokens_per_second()
    summary = dict(
        steps=state.step, completed=state.step >= run.config.train.steps and not stop_reason,
        stop_reason=stop_reason, tokens=state.tokens_seen, wall_time_s=time.perf_counter() - timer.start,
        first_step_s=timer.first_step_s,
        final_loss=last["loss"], final_val_loss=last["val_loss"], best_val_loss=last.get("best_val_loss", math.nan),
        tokens_per_second=tokens_per_second, mfu=mfu(tokens_per_second, run.flops_per_token or 0.0, peak),
        peak_memory_gib=peak_memory_bytes(run.device) / GIB, skipped_steps=state.skipped_steps,
        optimizer_state_bytes=optimizer_state_bytes(run.optimizer), precision=run.precision.name,
        device=str(run.device), world_size=run.world_size, flops_per_token=run.flops_per_token, **run.info)
    logger.log("summary", state.step, **summary)
    if stop_reason:
        logger.print(stop_reason)
    logger.close()
    if run.rank == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if run.config.log.plot:
            plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png", title=str(run.run_dir))
    return summary
