"""What a run writes while it runs: a progress bar, a JSONL log, TensorBoard events, a loss plot.

Only rank 0 writes. Each JSONL record is one event (`train`, `eval`, `summary`) with its step, so
the log can be re-read by `hasten bench` and by the plot; on resume, records past the checkpoint's
step are dropped so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only records at or before `last_step` (used when resuming from a checkpoint)."""
    kept = [r for r in read_log(path) if r.get("step", 0) <= last_step and r.get("event") != "summary"]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class RunLogger:
    """Rank-0 logging sink. A disabled logger (other ranks) accepts every call and does nothing."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._file = open(self.jsonl_path, "a") if enabled else None  # noqa: SIM115 - closed in close()
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self._interactive = enabled and progress and self.console.is_terminal
        self._progress = self._make_progress(total_steps, start_step) if self._interactive else None

    def _make_progress(self, total: int, start: int) -> Progress:
        progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self._task = progress.add_task("train", total=total, completed=start, loss="-", tps="-")
        progress.start()
        return progress

    def log(self, event: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{event}/{key}", value, step)

    def advance(self, step: int, loss: float | None = None, tokens_per_second: float | None = None,
                total: int | None = None) -> None:
        """Move the progress bar to `step` (and its end to `total`, when given: a time-limited run's
        expected last step); on a non-interactive stream print a line instead."""
        if not self.enabled:
            return
        if self._progress is not None:
            fields: dict[str, Any] = {}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            if tokens_per_second is not None:
                fields["tps"] = f"{tokens_per_second:,.0f}"
            if total is not None:
                fields["total"] = total
            self._progress.update(self._task, completed=step, **fields)
        elif loss is not None:
            tps = f"{tokens_per_second:,.0f}" if tokens_per_second else "-"
            self.print(f"step {step:>6}  loss {loss:.4f}  {tps} tok/s")

    def print(self, message: str) -> None:
        if self.enabled:
            if self._progress is not None:
                self._progress.console.print(message)
            else:
                print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def plot_losses(jsonl_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Training and validation loss against step, as a PNG; None when there is nothing to plot.
    Where the training loss has extra terms (distillation, MoE auxiliary losses), its
    cross-entropy, the quantity validation measures, is drawn too."""
    records = read_log(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records if r["event"] == "train" and "loss" in r]
    ce = [(r["step"], r["ce"]) for r in records if r["event"] == "train" and "ce" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r["event"] == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train (with its extra terms)" if ce else "train", linewidth=1.2)
    if ce:
        ax.plot(*zip(*ce), label="train cross-entropy", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "hasten run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
