"""Run bench rows: each one is a real `hasten train` in its own process, under the same budget.

    for row in rows:
        skip it if <out>/rows/<row>/bench_row.json holds a finished result of the same settings
        python -m hasten train RECIPE <bench defaults> <user overrides> <budget> <row> out_dir=<row dir>
        read summary.json and metrics.jsonl; load the produced model and time its forward pass
        write <out>/rows/<row>/bench_row.json (or the error: the last lines of stderr)

A subprocess per row means a crash, a hang in a compiler or an out-of-memory in one row cannot
take the others down, and each row's peak memory is its own process's.

`run_concurrently` trains several rows at once, one per slot (a GPU, or a share of the CPU's
cores): a row that starts from the baseline's run waits for the baseline; the caller then times
each row's inference alone (`measure_row`), so no measurement shares the device with training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hasten.bench.rows import Row
from hasten.config import ConfigError, load_config
from hasten.train.metrics import median_ms, parameter_bytes

ROW_RESULT = "bench_row.json"
ERROR_LINES = 20  # lines of a failed row's stderr kept in its result

# On CPU the shipped default recipe takes ~10 minutes per run; these make one row a few minutes
# so that the default rows together finish within ~15 minutes on 2 cores.
CPU_DEFAULTS = ("model.preset=small", "data.max_documents=400", "train.batch_size=8", "train.seq_len=128",
                "train.eval_every=25", "train.eval_batches=5", "optim.warmup_steps=30")
CPU_DEFAULT_STEPS = 250
# Every row, on every device: no console chatter, no sample, no mid-run checkpoints (only the
# final one, which the inference measurement loads).
QUIET = ("log.progress=false", "log.sample_tokens=0", "log.tensorboard=false", "checkpoint.every=0",
         "checkpoint.at_end=true")
UNBOUNDED_STEPS = 1_000_000  # train.steps under a time budget: the time limit stops the run
STOP_GRACE_S = 60.0  # a row past --row-timeout: seconds between SIGTERM (checkpoint and exit) and SIGKILL


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """What every row shares: recipe, overrides, budget. Equal settings mean a row can be reused."""

    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    budget_steps: int | None = None
    budget_seconds: float | None = None
    device_type: str = "cpu"
    nproc: int = 1  # processes of the distributed rows (torchrun --nproc-per-node)
    inference_batch: int = 4
    inference_repeats: int = 20

    def __post_init__(self) -> None:
        if self.budget_steps is not None and self.budget_seconds is not None:
            raise ConfigError("Give --budget-steps or --budget-seconds, not both.")
        if self.budget_steps is not None and self.budget_steps <= 0:
            raise ConfigError(f"--budget-steps={self.budget_steps} must be > 0.")
        if self.budget_seconds is not None and self.budget_seconds <= 0:
            raise ConfigError(f"--budget-seconds={self.budget_seconds} must be > 0.")

    def budget(self) -> dict[str, Any]:
        """The budget every row gets, as recorded in the report."""
        if self.budget_seconds is not None:
            return dict(kind="seconds", value=self.budget_seconds)
        return dict(kind="steps", value=self.resolved_steps())

    def resolved_steps(self) -> int | None:
        """Steps of a step budget: the flag, else the CPU default for the default recipe, else the recipe's."""
        if self.budget_steps is not None:
            return self.budget_steps
        if self.recipe is None and self.device_type == "cpu" and not _sets(self.overrides, "train.steps"):
            return CPU_DEFAULT_STEPS
        return None

    def common_overrides(self) -> list[str]:
        """Overrides shared by all rows, lowest priority first: bench defaults, user's, budget."""
        defaults = list(CPU_DEFAULTS) if self.recipe is None and self.device_type == "cpu" else []
        budget: list[str] = []
        if self.budget_seconds is not None:
            budget.append(f"train.time_limit_s={self.budget_seconds}")
            if not _sets(self.overrides, "train.steps"):
                budget.append(f"train.steps={UNBOUNDED_STEPS}")
            if not _sets(self.overrides, "optim.horizon"):  # every row ends its decay as its time runs out
                budget.append("optim.horizon=time")
        elif (steps := self.resolved_steps()) is not None:
            budget.append(f"train.steps={steps}")
        return [*defaults, *QUIET, *self.overrides, *budget]

    def fingerprint(self, row: Row) -> str:
        """A short hash of everything that decides a row's result; a stored result of another hash is stale."""
        payload = json.dumps([asdict(self), list(row.overrides)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def override_value(overrides: tuple[str, ...] | list[str], key: str) -> str | None:
    """The value the overrides give `key` (the last one, as the config applies them), unquoted; None if unset."""
    values = [o.split("=", 1)[1].strip().strip("'\"") for o in overrides if "=" in o and o.split("=", 1)[0].strip() == key]
    return values[-1] if values else None


def _sets(overrides: tuple[str, ...] | list[str], key: str) -> bool:
    return override_value(overrides, key) is not None


def row_overrides(settings: BenchSettings, row: Row, row_dir: Path) -> list[str]:
    """A row's overrides with its placeholders filled: `{baseline}` is the baseline row's run
    folder (rows that start from the trained baseline, or learn from it, name it so) and
    `{half_layers}` half the bench model's layers (a smaller student)."""
    values = {"{baseline}": str(row_dir.parent / "baseline")}
    if any("{half_layers}" in o for o in row.overrides):
        layers = load_config(settings.recipe, settings.common_overrides()).model.n_layers
        values["{half_layers}"] = str(max(1, layers // 2))
    filled = []
    for override in row.overrides:
        for key, value in values.items():
            override = override.replace(key, value)
        filled.append(override)
    return filled


def train_command(settings: BenchSettings, row: Row, row_dir: Path) -> list[str]:
    """The `hasten train` command line of one row; the row's own overrides win over shared ones."""
    recipe = [settings.recipe] if settings.recipe else []
    own = row_overrides(settings, row, row_dir)
    launch = [sys.executable, "-m", "hasten"]
    if row.distributed:  # torchrun, never a launcher of hasten's own; --standalone picks a free port
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={settings.nproc}", "-m", "hasten"]
    return [*launch, "train", *recipe, *settings.common_overrides(), *own, f"train.out_dir={row_dir}"]


def prepare(settings: BenchSettings) -> None:
    """Check the shared settings and fill the token cache once, before any row runs.

    A typo in a shared key fails here, before any training; a row's own bad override fails that
    row alone. With the cache filled, no row pays for tokenizing (or training a BPE tokenizer) in
    its wall time or peak memory, so the first row is not penalised for going first.
    """
    from hasten.data import prepare_data

    prepare_data(load_config(settings.recipe, settings.common_overrides()).data)


@dataclass
class RowOutcome:
    """What the runner reports to the progress display for one row."""

    result: dict[str, Any]
    reused: bool = False
    notes: list[str] = field(default_factory=list)


def load_finished(row_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """A stored result of the same settings that trained ("trained": inference not timed yet) or
    completed ("ok"); failed rows are retried, not reused."""
    path = row_dir / ROW_RESULT
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if result.get("fingerprint") != fingerprint or result.get("status") not in ("ok", "trained"):
        return None
    return result


def run_row(settings: BenchSettings, row: Row, out: Path, *, fresh: bool = False,
            on_step: Callable[[int], None] | None = None, env: dict[str, str] | None = None,
            measure: bool = True, alone: bool = True, timeout_s: float | None = None) -> RowOutcome:
    """Run one row (or reuse its finished result) and store its result in its folder.

    `env` is added to the training process's environment (a GPU slot's CUDA_VISIBLE_DEVICES). With
    `measure=False` the row ends "trained" and `measure_row` times its inference later. `alone=False`
    (rows running side by side) leaves out the share of CPU time other processes used, as the
    other rows would be counted in it. A training process still running after `timeout_s` is stopped
    and the row fails (a hung compile must not hold up the rest of the bench)."""
    row_dir = out / "rows" / row.name
    fingerprint = settings.fingerprint(row)
    if not fresh and (done := load_finished(row_dir, fingerprint)) is not None:
        if measure and done["status"] == "trained":
            measure_row(settings, done, row_dir)
        return RowOutcome(done, reused=True)
    row_dir.mkdir(parents=True, exist_ok=True)
    (row_dir / ROW_RESULT).unlink(missing_ok=True)
    result: dict[str, Any] = dict(name=row.name, family=row.family, benefit=row.benefit,
                                  overrides=list(row.overrides), description=row.description,
                                  fingerprint=fingerprint, command=train_command(settings, row, row_dir),
                                  slot=env or None)
    result["started_at"], started, cpu_before = time.time(), time.perf_counter(), cpu_counters()
    error = _train(result["command"], row_dir, on_step, env, timeout_s)
    result["ended_at"], result["process_time_s"] = time.time(), time.perf_counter() - started
    result["other_cpu_share"] = other_cpu_share(cpu_before, cpu_counters(), result["process_time_s"]) if alone else None
    if error is None:
        error = _collect(result, row_dir)
    result["status"] = "trained" if error is None else "failed"
    result["error"] = error
    _store(result, row_dir)
    if measure and error is None:
        measure_row(settings, result, row_dir)
    return RowOutcome(result)


def measure_row(settings: BenchSettings, result: dict[str, Any], row_dir: Path) -> None:
    """Time the forward pass of a trained row's model, mark the row ok (or failed) and store it."""
    try:
        result.update(measure_inference(row_dir, settings.inference_batch, settings.inference_repeats))
        result["status"], result["error"] = "ok", None
    except Exception as err:  # noqa: BLE001 - any failure here is this row's, reported, not the bench's
        result["status"], result["error"] = "failed", f"measuring inference failed: {type(err).__name__}: {err}"
    _store(result, row_dir)


def waits_for_baseline(row: Row) -> bool:
    """Whether the row starts from, or learns from, the trained baseline's run folder."""
    return any("{baseline}" in override for override in row.overrides)


def run_concurrently(rows: Sequence[Row], slots: Sequence[Any], start: Callable[[Row, Any], RowOutcome]
                     ) -> dict[str, RowOutcome]:
    """`start(row, slot)` for every row, one row per slot at a time, in the rows' order, except that
    a row waiting for the baseline starts once the baseline has finished. Returns the outcomes by name."""
    names = {row.name for row in rows}
    waiting, free, outcomes = list(rows), list(slots), {}
    running: dict[Future, tuple[Row, Any]] = {}
    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        while waiting or running:
            for row in list(waiting):
                if free and not (waits_for_baseline(row) and "baseline" in names and "baseline" not in outcomes):
                    waiting.remove(row)
                    slot = free.pop(0)
                    running[pool.submit(start, row, slot)] = (row, slot)
            if not running:  # only rows waiting for a baseline that is not among the rows to run
                raise RuntimeError(f"rows {[r.name for r in waiting]} wait for a baseline row that does not run")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                row, slot = running.pop(future)
                outcomes[row.name] = future.result()
                free.append(slot)
    return outcomes


def _store(result: dict[str, Any], row_dir: Path) -> None:
    (row_dir / ROW_RESULT).write_text(json.dumps(result, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def _train(command: list[str], row_dir: Path, on_step: Callable[[int], None] | None,
           env: dict[str, str] | None = None, timeout_s: float | None = None) -> str | None:
    """Run the training process; None when it succeeded, else the last lines of its stderr, or why it
    was stopped: past `timeout_s` it gets SIGTERM (hasten saves a checkpoint and exits), then SIGKILL
    if it is still there after STOP_GRACE_S."""
    stdout_path, stderr_path = row_dir / "bench_stdout.log", row_dir / "bench_stderr.log"
    metrics = row_dir / "metrics.jsonl"
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env} if env else None)
        while proc.poll() is None:
            time.sleep(0.5)
            if on_step is not None and (step := last_step(metrics)) is not None:
                on_step(step)
            if deadline is not None and time.monotonic() > deadline:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return f"hasten train was still running after {timeout_s:g} s (--row-timeout) and was stopped."
    if proc.returncode == 0:
        return None
    lines = stderr_path.read_text(errors="replace").strip().splitlines()
    tail = "\n".join(lines[-ERROR_LINES:]) or "(no output on stderr)"
    return f"hasten train exited with status {proc.returncode}:\n{tail}"


def cpu_counters() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process's finished children).

    Linux only (/proc/stat); None elsewhere.
    """
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


def other_cpu_share(before: tuple[float, float] | None, after: tuple[float, float] | None,
                    wall_s: float) -> float | None:
    """Fraction of the machine's CPU time that processes other than the row used while it ran.

    Rows are timed on a machine that others may share; a share well above zero means the row's
    timings are inflated and should not be compared with rows that ran alone.
    """
    if before is None or after is None or wall_s <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return min(1.0, max(0.0, others / (wall_s * (os.cpu_count() or 1))))


def last_step(metrics_path: Path) -> int | None:
    """The step of the newest record in a metrics.jsonl that is being written, if any."""
    try:
        with metrics_path.open("rb") as f:
            f.seek(max(0, metrics_path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, IndexError):
        return None  # not written yet, or a line half-written: try again at the next poll


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (train, eval, summary events)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _collect(result: dict[str, Any], row_dir: Path) -> str | None:
    """Add the run's summary and curves to `result`; None on success, else the error."""
    summary_path = row_dir / "summary.json"
    if not summary_path.exists():
        return f"hasten train finished without writing {summary_path}."
    result["summary"] = json.loads(summary_path.read_text())
    records = read_metrics(row_dir / "metrics.jsonl")
    result["evals"] = [dict(step=r["step"], val_loss=r["val_loss"], elapsed_s=r["elapsed_s"],
                            **({"train_s": r["train_s"]} if "train_s" in r else {}))
                       for r in records if r.get("event") == "eval"]
    result["train"] = [dict(step=r["step"], loss=r["loss"], elapsed_s=r["elapsed_s"])
                       for r in records if r.get("event") == "train"]
    return None


def measure_inference(run_dir: Path, batch_size: int, repeats: int) -> dict[str, Any]:
    """Median forward-pass time of the produced model on a fixed batch, and its parameter bytes.

    The model is loaded as `hasten generate` would load it (eager, fp32 weights, CPU unless a GPU
    is present), so the number says what the method left behind, not how it trained. A run that
    quantized its model (qat.scheme) is measured quantized.
    """
    import torch

    from hasten.methods import qat
    from hasten.train.export import load_trained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quantized = (run_dir / qat.QUANTIZED_FILE).exists()
    model = qat.load_quantized(run_dir, device)[0] if quantized else load_trained(run_dir, device)[0]
    seq_len = load_config(run_dir / "config.toml").train.seq_len
    vocab = model.tok_embeddings.num_embeddings if hasattr(model, "tok_embeddings") else 256
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    return dict(inference_ms=median_ms(lambda: model(ids), device, repeats), model_bytes=parameter_bytes(model),
                inference_shape=[batch_size, seq_len], inference_device=str(device))


