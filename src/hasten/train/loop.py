"""The training loop, explicit and in one place.

    for step in range(start, steps):
        lr ← peak · schedule(step)                        # or of the time spent (optim.horizon=time)
        for micro in range(grad_accum):                  # accumulate
            loss ← loss_fn(model, batch(step, micro))     # under autocast; may also return
                                                          #   {name: term} to log (e.g. MoE aux losses)
            backward(loss / grad_accum)                   # scaled for fp16
        norm ← clip(grads)                                # after unscaling; in the fused step's kernel
        optimizer step unless norm is non-finite          #   when it can; counted, no host sync when fused
        every log.every:      read the loss (the only host sync; on a GPU, once the next step is
                              queued), log, progress
        every eval_every:     validation loss
        every checkpoint.every, on SIGTERM/SIGINT, on a run of bad steps: checkpoint
    finish: checkpoint, summary.json, loss.png, a generated sample

Methods that act inside a step do so through the loss function or the optimizer, never through
a branch here. The loop honours two optional optimizer capabilities, documented in
hasten.optim.hooks: a Hessian refresh after the step (SophiaG: one extra forward/backward of
`sampled_loss_fn`, timed with the step), and evaluation weights (schedule-free: `eval()` around
evaluation and checkpoints, left in eval mode at the end). A param group's `lr_scale` multiplies
its scheduled rate (Muon's matrices).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hasten.models.ops.cross_entropy import last_kernel
from hasten.optim.hooks import (evaluation_weights, optimizer_metrics, set_learning_rate, set_train_mode,
                                wants_hessian)
from hasten.parallel import clip_grad_norm_, grad_norm, gradient_sync, memory_bytes
from hasten.train.build import Batch, Run, compiled_loss
from hasten.train.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from hasten.train.guard import StopSignal, clips_in_step, step_if_finite
from hasten.train.log import RunLogger, plot_losses, truncate_log
from hasten.train.metrics import cluster_peak_flops, mfu, peak_memory_bytes, reset_peak_memory, synchronize

GIB = 2**30


@dataclass
class DeviceCounters:
    """Running sums kept on the device so that no step has to wait for the host."""

    loss_sum: torch.Tensor
    finite_steps: torch.Tensor
    skipped: torch.Tensor
    bad_streak: torch.Tensor
    worst_streak: torch.Tensor
    term_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # extra loss terms, summed per step
    term_steps: int = 0

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

    def add_terms(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0) + value
        self.term_steps += 1

    def snapshot(self, defer: bool) -> CounterRead:
        """The counters for a log step, then reset. `defer` (CUDA): copied to pinned host memory
        without waiting, to be read once the next step is queued; else read at `result()`."""
        names = list(self.term_sums)
        stacked = torch.stack([self.loss_sum, self.finite_steps, self.skipped, self.bad_streak,
                               self.worst_streak, *(self.term_sums[n].float() for n in names)])
        done = None
        if defer and stacked.is_cuda:
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            stacked = host
        read = CounterRead(stacked, names, self.term_steps, done)
        self.term_sums, self.term_steps = {}, 0
        self.loss_sum.zero_()  # after the copy in stream order: the snapshot holds the old sums
        self.finite_steps.zero_()
        self.skipped.zero_()
        self.worst_streak.copy_(self.bad_streak)
        return read


@dataclass
class CounterRead:
    """One log step's counters on their way to the host."""

    values: torch.Tensor
    names: list[str]
    term_steps: int
    done: torch.cuda.Event | None = None  # the copy to pinned memory has landed

    def result(self) -> dict[str, Any]:
        """The interval's mean loss, the guard counters and the mean extra terms (waits for them)."""
        if self.done is not None:
            self.done.synchronize()
        values = self.values.tolist()
        loss_sum, finite, skipped, streak, worst = values[:5]
        terms = {n: v / self.term_steps for n, v in zip(self.names, values[5:])}
        return dict(loss=loss_sum / finite if finite else math.nan, skipped=skipped, streak=streak, worst=worst,
                    terms=terms)


@dataclass
class Timer:
    """Wall time of the steps alone: evaluation and checkpoints are excluded from throughput and
    from the training seconds that a time limit counts."""

    start: float = field(default_factory=time.perf_counter)
    interval_start: float = field(default_factory=time.perf_counter)
    interval_steps: int = 0
    rates: list[float] = field(default_factory=list)  # tokens/s per log interval
    first_step_s: float | None = None  # the first step holds compilation and warm-up
    paused_s: float = 0.0  # evaluation and checkpoint saves since the first step

    def training_seconds(self) -> float:
        """Seconds of training steps since the first step ended (evaluations, with the compilation
        of the evaluation graph, and checkpoint saves left out): what train.time_limit_s is
        compared with, so that methods under one time budget get the same time to train."""
        return time.perf_counter() - self.start - (self.first_step_s or 0.0) - self.paused_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed work (an evaluation, a checkpoint save) out of the training seconds
        and of the current throughput interval."""
        began = time.perf_counter()
        try:
            yield
        finally:
            if self.first_step_s is not None:
                self.paused_s += time.perf_counter() - began
            self.restart_interval()

    def restart_interval(self) -> None:
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def take_interval_steps(self) -> int:
        """The steps of the interval that a log step closes; later steps count toward the next."""
        steps, self.interval_steps = self.interval_steps, 0
        return steps

    def close_interval(self, tokens_per_step: int, steps: int) -> float:
        """The rate of `steps` steps since the interval began; the next interval begins now."""
        now = time.perf_counter()
        elapsed = now - self.interval_start
        rate = steps * tokens_per_step / elapsed if elapsed > 0 else 0.0
        self.rates.append(rate)
        self.interval_start = now
        return rate

    def steady_tokens_per_second(self) -> float:
        """Median over log intervals, leaving out the first (compilation and warm-up)."""
        rates = self.rates[1:] or self.rates
        return statistics.median(rates) if rates else 0.0


@dataclass
class BudgetClock:
    """Training seconds in all, earlier processes' included: what a schedule over time
    (optim.horizon=time) reads. Measured at log steps, where every rank takes the largest reading,
    and extrapolated between them at the last interval's seconds per step, so that every rank
    gives the same step the same rate and no step waits on the device to read a clock."""

    seconds: float  # at anchor_step
    anchor_step: int
    seconds_per_step: float = 0.0

    def at(self, step: int) -> float:
        return self.seconds + (step - self.anchor_step) * self.seconds_per_step

    def observe(self, step: int, seconds: float) -> None:
        if step > self.anchor_step:
            self.seconds_per_step = max(0.0, seconds - self.seconds) / (step - self.anchor_step)
        self.seconds, self.anchor_step = seconds, step


def _agreed_seconds(run: Run, seconds: float) -> float:
    """The largest of the ranks' readings (a log-step collective; one process: its own)."""
    if run.world_size == 1:
        return seconds
    value = torch.tensor(seconds, device=run.device, dtype=torch.float64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value.item()


# torch.compile modes that replay the compiled graphs as CUDA graphs (no launch gap between kernels)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _mark_graph_step(run: Run) -> None:
    """Tell torch.compile's CUDA graphs that a new iteration begins (PyTorch's advice for training
    loops): the previous one's outputs have been read and their memory may be reused."""
    if run.config.train.compile and run.config.train.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _clip_and_step(run: Run) -> torch.Tensor:
    """Clip to train.grad_clip and step unless the gradient is non-finite; return the skip flag.
    The norm is of the whole gradient even when each rank holds a shard. A fused optimizer clips
    inside its own kernel (no pass of its own over the gradients)."""
    params = [p for p in run.model.parameters() if p.grad is not None]
    max_norm = run.config.train.grad_clip or math.inf
    if clips_in_step(run.optimizer, run.scaler, params):
        return step_if_finite(run.optimizer, grad_norm(params), run.scaler, clip_to=max_norm)
    return step_if_finite(run.optimizer, clip_grad_norm_(params, max_norm), run.scaler)


def split_loss(out: torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss function's result as (loss, extra terms to log)."""
    return out if isinstance(out, tuple) else (out, {})


def train_step(run: Run, forward_loss: Any, step: int, terms: dict[str, torch.Tensor] | None = None,
               time_fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, skipped flag).
    The loss function's extra terms, averaged over the micro-batches, are added to `terms`.
    `time_fraction`, the share of train.time_limit_s spent, places a schedule over time."""
    accum = run.config.train.grad_accum
    lr = run.config.optim.lr * run.schedule(step, time_fraction)
    set_learning_rate(run.optimizer, lr)  # times each group's lr_scale
    step_loss = torch.zeros((), device=run.device)
    _mark_graph_step(run)  # a new iteration (its micro-batches accumulate into the same gradients)
    for micro in range(accum):
        batch = _to_device(run.train_batches(step, micro), run.device)
        # Ranks exchange gradients only after the last micro-batch; earlier ones accumulate locally.
        with gradient_sync(run.model, enabled=micro == accum - 1):
            with run.precision.autocast():
                loss, extra = split_loss(forward_loss(batch))
            scaled = loss / accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        step_loss += loss.detach().float() / accum
        if terms is not None:
            for name, value in extra.items():
                terms[name] = terms.get(name, 0) + value.detach().float() / accum
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    skipped = _clip_and_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    if wants_hessian(run.optimizer, step):
        _refresh_hessian(run, step)
    return step_loss, skipped


def _refresh_hessian(run: Run, step: int) -> None:
    """The curvature hook (hasten.optim.hooks): backpropagate the loss on labels sampled from the
    model, on this step's first micro-batch, into the optimizer's Hessian estimate."""
    batch = _to_device(run.train_batches(step, 0), run.device)
    with run.precision.autocast():
        loss = run.sampled_loss_fn(run.model, batch)
    scale = run.scaler.get_scale() if run.scaler is not None else 1.0  # fp16: keep small grads representable
    (loss * scale).backward()
    run.optimizer.update_hessian(batch_size=run.tokens_per_micro_batch * run.world_size, grad_scale=scale)
    run.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(run: Run, forward_loss: Any) -> float:
    """Mean loss over the same `eval_batches` validation batches every time."""
    if run.val_batches is None:
        return math.nan
    run.model.eval()
    total = torch.zeros((), device=run.device)
    with evaluation_weights(run.optimizer):  # schedule-free: evaluate the averaged weights
        for i in range(run.config.train.eval_batches):
            _mark_graph_step(run)
            with run.precision.autocast():
                total += split_loss(forward_loss(_to_device(run.val_batches(i, 0), run.device)))[0].float()
    run.model.train()
    return _mean_over_ranks(run, total.item() / run.config.train.eval_batches)


def global_batch_tokens(run: Run) -> int:
    """Tokens per optimizer step over all ranks: micro-batch × grad_accum × world size."""
    return run.tokens_per_micro_batch * run.config.train.grad_accum * run.world_size


def _memory_per_rank(run: Run) -> list[dict[str, int]]:
    """Each rank's parameter, gradient and optimizer-state bytes (compare `zero_memory_bytes`)."""
    mine = memory_bytes(run.model, run.optimizer)
    if not torch.distributed.is_initialized():
        return [mine]
    every: list[Any] = [None] * run.world_size
    torch.distributed.all_gather_object(every, mine)
    return every


def _mean_over_ranks(run: Run, value: float) -> float:
    if run.world_size == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=run.device)
    torch.distributed.all_reduce(tensor)  # a sum: gloo has no AVG
    return tensor.item() / run.world_size


def _agree_to_stop(run: Run, reason: str) -> str:
    """Every rank stops when any rank has a reason to (a signal, the time limit, the guard)."""
    flag = torch.tensor(float(bool(reason)), device=run.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return reason or ("stopped because another rank stopped" if flag.item() else "")


def _resume(run: Run, logger_path: Any) -> TrainerState:
    path = resolve_resume(run.run_dir, run.config.train.resume)
    if path is None:
        return TrainerState()
    state = load_checkpoint(path, run.model, run.optimizer, run.device)
    set_train_mode(run.optimizer, True)  # checkpoints hold evaluation weights (schedule-free)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    if run.rank == 0:
        truncate_log(logger_path, state.step)
    return state


def _save(run: Run, state: TrainerState) -> None:
    if run.scaler is not None:
        state.scaler = run.scaler.state_dict()
    with evaluation_weights(run.optimizer):  # schedule-free: checkpoint the averaged weights
        save_checkpoint(run.run_dir, run.model, run.optimizer, state, run.device, run.config.checkpoint.keep)


def train_loop(run: Run) -> dict[str, Any]:
    """Run the loop to the configured number of steps (or a stop) and return the run's metrics."""
    cfg = run.config
    tokens_per_step = global_batch_tokens(run)
    state = _resume(run, run.run_dir / "metrics.jsonl")
    logger = RunLogger(run.run_dir, total_steps=cfg.train.steps, start_step=state.step, enabled=run.rank == 0,
                       progress=cfg.log.progress, tensorboard=cfg.log.tensorboard)
    if state.step:
        logger.print(f"resumed from step {state.step}")
    if run.world_size > 1:
        logger.print(f"{run.world_size} ranks, {cfg.parallel.strategy}: global batch {tokens_per_step} tokens = "
                     f"{run.tokens_per_micro_batch} per micro-batch × {cfg.train.grad_accum} micro-batches × "
                     f"{run.world_size} ranks")
    forward_loss = compiled_loss(run)
    counters, timer = DeviceCounters.zeros(run.device), Timer()
    peak = cluster_peak_flops(run.device, run.precision.name, run.world_size)
    last = dict(loss=math.nan, val_loss=math.nan, tokens_per_second=0.0)
    stop_reason = ""
    # A schedule over time spans the time limit in all: earlier processes' seconds count against it.
    by_time = cfg.optim.horizon == "time"
    seconds_before = state.train_seconds
    counted_before = seconds_before if by_time else 0.0
    clock = BudgetClock(seconds_before, state.step)
    reset_peak_memory(run.device)
    run.model.train()
    defer = defers_log_read(run)
    pending: PendingLog | None = None

    def read_log() -> str:  # the pending log step's read, if any: its stop reason
        nonlocal pending
        reason = _log_interval(run, state, pending, timer, logger, tokens_per_step, peak, last, counted_before) \
            if pending is not None else ""
        pending = None
        return reason

    with StopSignal() as stop:
        while state.step < cfg.train.steps and not stop_reason:
            terms: dict[str, torch.Tensor] = {}
            time_fraction = clock.at(state.step) / cfg.train.time_limit_s if by_time else 0.0
            loss, skipped = train_step(run, forward_loss, state.step, terms, time_fraction)
            counters.add_step(loss, skipped)
            counters.add_terms(terms)
            state.step += 1
            state.tokens_seen += tokens_per_step
            timer.interval_steps += 1
            if timer.first_step_s is None:
                timer.first_step_s = time.perf_counter() - timer.start
            stop_reason = read_log()  # the previous log step's, now that this step is queued behind it
            log_step = state.step % cfg.log.every == 0 or state.step == cfg.train.steps
            if log_step or (stop.requested and run.world_size == 1):
                pending = _begin_log(run, state, counters, timer, defer)
            if stop.requested and not stop_reason:
                stop_reason = f"received {stop.signal_name}"
            spent = counted_before + timer.training_seconds()
            if log_step and (by_time or cfg.train.time_limit_s):
                spent = _agreed_seconds(run, spent)  # one reading on every rank: the same rates, the same stop
            if by_time and log_step:
                clock.observe(state.step, spent)
            if cfg.train.time_limit_s and spent >= cfg.train.time_limit_s:
                stop_reason = stop_reason or f"time limit of {cfg.train.time_limit_s:g} s reached"
            due_eval = (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or state.step == cfg.train.steps
            due_save = (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or (
                state.step == cfg.train.steps and cfg.checkpoint.at_end)
            if not defer or stop_reason or stop.requested or due_eval or due_save:
                stop_reason = read_log() or stop_reason  # logged before what follows, on every rank alike
            if stop_reason and timer.interval_steps and run.world_size == 1:  # the steps since: logged and
                pending = _begin_log(run, state, counters, timer, defer=False)  # counted before the checkpoint
                stop_reason = read_log() or stop_reason
            if run.world_size > 1:  # ranks stop together, at a log step, or the next collective hangs
                stop_reason = _agree_to_stop(run, stop_reason) if log_step else ""
            if due_eval or stop_reason:
                with timer.paused():
                    _log_eval(run, state, forward_loss, logger, last, timer.start, train_s=spent)
            if stop_reason or due_save:
                state.train_seconds = seconds_before + timer.training_seconds()
                with timer.paused():
                    _save(run, state)
        stop_reason = read_log() or stop_reason
    set_train_mode(run.optimizer, False)  # the trained model keeps the evaluation weights (schedule-free)
    return _finish(run, state, logger, timer, peak, last, stop_reason)


def expected_last_step(step: int, steps: int, seconds_left: float, tokens_per_second: float,
                       tokens_per_step: int) -> int:
    """The step a time-limited run should stop at, at its current speed (at most train.steps)."""
    if tokens_per_second <= 0:
        return steps
    return min(steps, step + math.ceil(max(0.0, seconds_left) * tokens_per_second / tokens_per_step))


@dataclass
class PendingLog:
    """A log step's record, its counters on their way to the host."""

    counters: CounterRead
    step: int
    tokens: int
    lr: float
    steps: int  # in the interval it closes


def defers_log_read(run: Run) -> bool:
    """Whether a log step's read waits for the next step to be queued. After a read that waits at
    once, the GPU idles while the host logs, fetches the next batch and launches its first kernels
    (2-3 ms on an H200 at GPT-2-124M); deferred, the next step's kernels are queued behind the log
    step's. On one CUDA device without fp16's scaler or optimizer diagnostics, which read the
    device themselves; a collective would, too."""
    return (run.device.type == "cuda" and run.world_size == 1 and run.scaler is None
            and not callable(getattr(run.optimizer, "metrics", None)))


def _begin_log(run: Run, state: TrainerState, counters: DeviceCounters, timer: Timer, defer: bool) -> PendingLog:
    return PendingLog(counters.snapshot(defer), state.step, state.tokens_seen,
                      float(run.optimizer.param_groups[0]["lr"]), timer.take_interval_steps())


def _log_interval(run: Run, state: TrainerState, pending: PendingLog, timer: Timer, logger: RunLogger,
                  tokens_per_step: int, peak: float | None, last: dict[str, Any], seconds_before: float = 0.0) -> str:
    """Read a log step's counters (waiting for them), log them; return a stop reason when the guard
    trips. Under a time limit the progress bar's end moves to the step the time should run out at
    (seconds_before: the earlier processes' seconds that count against the limit)."""
    values = pending.counters.result()
    values["loss"] = _mean_over_ranks(run, values["loss"])  # the loss of the global batch
    rate = timer.close_interval(tokens_per_step, pending.steps)
    state.skipped_steps += int(values["skipped"])
    state.bad_loss_streak = int(values["streak"])
    record = dict(loss=values["loss"], lr=pending.lr, tokens=pending.tokens, tokens_per_second=rate,
                  skipped_steps=state.skipped_steps, elapsed_s=time.perf_counter() - timer.start, **values["terms"],
                  **optimizer_metrics(run.optimizer))
    if run.scaler is not None:
        record["loss_scale"] = float(run.scaler.get_scale())
    if (utilization := mfu(rate, run.flops_per_token, peak)) is not None:
        record["mfu"] = utilization
    logger.log("train", pending.step, **record)
    limit = run.config.train.time_limit_s
    total = expected_last_step(pending.step, run.config.train.steps,
                               limit - seconds_before - timer.training_seconds(), rate, tokens_per_step) \
        if limit else None
    logger.advance(pending.step, values["loss"], rate, total=total)
    last.update(loss=values["loss"], tokens_per_second=rate)
    if values["worst"] >= run.config.train.max_bad_steps:
        return (f"stopped: {int(values['worst'])} consecutive steps had a non-finite loss (limit "
                f"train.max_bad_steps={run.config.train.max_bad_steps}); lower optim.lr or use bf16/fp32")
    return ""


def _log_eval(run: Run, state: TrainerState, forward_loss: Any, logger: RunLogger, last: dict[str, Any],
              timer_start: float, train_s: float) -> None:
    """Evaluate and log; the record holds the wall seconds since the loop began (elapsed_s) and the
    training seconds so far (train_s: steps only, as a time limit counts them)."""
    val_loss = evaluate(run, forward_loss)
    if math.isnan(val_loss):
        return
    elapsed = time.perf_counter() - timer_start
    last["val_loss"] = val_loss
    last.setdefault("best_val_loss", val_loss)
    last["best_val_loss"] = min(last["best_val_loss"], val_loss)
    logger.log("eval", state.step, val_loss=val_loss, tokens=state.tokens_seen, elapsed_s=elapsed, train_s=train_s)
    baseline = run.info.get("unigram_val_loss")
    note = f" (unigram baseline {baseline:.4f})" if baseline else ""
    logger.print(f"step {state.step:>6}  val loss {val_loss:.4f}{note}")


def _finish(run: Run, state: TrainerState, logger: RunLogger, timer: Timer, peak: float | None,
            last: dict[str, Any], stop_reason: str) -> dict[str, Any]:
    synchronize(run.device)
    memory = _memory_per_rank(run)  # optimizer-state bytes are this rank's: its shard under ZeRO
    tokens_per_second = timer.steady_tokens_per_second()
    summary = dict(
        steps=state.step, completed=state.step >= run.config.train.steps and not stop_reason,
        stop_reason=stop_reason, tokens=state.tokens_seen, wall_time_s=time.perf_counter() - timer.start,
        first_step_s=timer.first_step_s,
        final_loss=last["loss"], final_val_loss=last["val_loss"], best_val_loss=last.get("best_val_loss", math.nan),
        tokens_per_second=tokens_per_second, mfu=mfu(tokens_per_second, run.flops_per_token, peak),
        peak_memory_gib=peak_memory_bytes(run.device) / GIB, skipped_steps=state.skipped_steps,
        optimizer_state_bytes=memory[run.rank]["optimizer_state_bytes"], precision=run.precision.name,
        device=str(run.device), world_size=run.world_size, flops_per_token=run.flops_per_token,
        global_batch_tokens=global_batch_tokens(run), memory_per_rank=memory, loss_kernel=last_kernel(), **run.info)
    logger.log("summary", state.step, **summary)
    if stop_reason:
        logger.print(stop_reason)
    logger.close()
    if run.rank == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if run.config.log.plot:
            plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png", title=str(run.run_dir))
    return summary
