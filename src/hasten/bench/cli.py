"""`hasten bench`: run the rows under one budget, then write and print the trade-off report.

`add_parser(subparsers)` adds the subcommand to `hasten`'s parser and `run(ns)` executes it;
`python -m hasten.bench` runs the same two functions on their own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hasten.bench.rows import ROWS, Row, default_row_names, get_row, parse_custom_row
from hasten.config import ConfigError, load_config
from hasten.provenance import source_commit

DEFAULT_OUT = "runs/bench"

DESCRIPTION = """\
Train the same model once per row (baseline, bf16, compile, wsd, ... each a `hasten train` in its
own process) under one budget, measure every row (wall time, tokens/s, MFU, peak memory, val loss,
steps and time to the baseline's final val loss, inference latency, model size) and write
report.json, report.md, report.html and plots into --out. Finished rows are reused on a rerun with
the same settings; --fresh reruns them. With no recipe on a CPU the bench shrinks the default
recipe so that the default rows finish in about 15 minutes on 2 cores."""


def add_parser(subparsers: Any) -> None:
    """Add the `bench` subcommand to an argparse subparsers object."""
    rows = ", ".join(f"{name} ({row.family})" for name, row in ROWS.items())
    bench = subparsers.add_parser("bench", help="measure methods side by side: the trade-off report",
                                  description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=f"rows: {rows}; join names with '+' to combine them (bf16+compile).")
    bench.add_argument("args", nargs="*", metavar="RECIPE | key=value",
                       help="recipe first (optional), then overrides applied to every row")
    bench.add_argument("--rows", default=None, help="comma-separated rows (default: baseline,bf16,compile,wsd "
                       "on CPU); the baseline is always run, first")
    bench.add_argument("--row", action="append", default=[], metavar="NAME:OVERRIDES",
                       help="an extra one-off row, e.g. --row 'lr3e-3:optim.lr=3e-3' (repeatable)")
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, default=None,
                        help="optimizer steps per row (default: 250 with the CPU defaults, else the recipe's)")
    budget.add_argument("--budget-seconds", type=float, default=None,
                        help="training seconds per row (train.time_limit_s) instead of a step count")
    budget.add_argument("--budget-tokens", type=int, default=None,
                        help="training tokens per row, turned into steps with the recipe's global batch")
    bench.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                       help="processes of the distributed rows (ddp, zero2, zero3), launched with torchrun; with "
                            "N > 1 they join the default rows (default: the visible GPUs, 1 on CPU)")
    bench.add_argument("--concurrent", type=int, default=1, metavar="N",
                       help="train up to N single-process rows at the same time: on GPUs one row per GPU (N <= the "
                            "visible GPUs), on a CPU each with its share of the cores (train.threads); rows that "
                            "start from the baseline wait for it, the distributed rows run after, alone, and "
                            "inference is timed after all training, one row at a time (default: 1, one row at a time)")
    bench.add_argument("--row-timeout", type=float, default=None, metavar="S",
                       help="stop a row's training process still running after S seconds (start-up and compilation "
                            "included) and record the row as failed; the other rows go on (default: no limit)")
    bench.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="run the whole bench N times, train.seed = the recipe's + 0..N-1, each into "
                            "OUT/seed-<seed>/, then write OUT/seeds.md and seeds.json: every row's mean and spread, and "
                            "its val loss minus the baseline's seed by seed (default: 1, one run into OUT)")
    bench.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT})")
    bench.add_argument("--fresh", action="store_true", help="rerun every row, even those finished before")
    bench.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                       help="print two report.json files side by side and write compare.md (no training)")


def steps_for_tokens(tokens: int, recipe: str | None, overrides: list[str]) -> int:
    """The step budget that trains about `tokens` tokens with the recipe's global batch (one process)."""
    if tokens <= 0:
        raise ConfigError(f"--budget-tokens={tokens} must be > 0.")
    train = load_config(recipe, overrides).train
    return max(1, round(tokens / (train.batch_size * train.seq_len * train.grad_accum)))


def run(ns: argparse.Namespace) -> int:
    """Execute `hasten bench`; returns the exit status (1 when every row failed)."""
    if ns.compare:
        return _compare(ns.compare[0], ns.compare[1], Path(ns.out or "."))
    from hasten.bench.report import seed_summary, seeds_markdown

    recipe, overrides = _split_recipe(ns.args)
    budget_steps = ns.budget_steps
    if ns.budget_tokens is not None:
        budget_steps = steps_for_tokens(ns.budget_tokens, recipe, overrides)
    device_type = _device_type(overrides)
    slots, overrides = concurrency_slots(ns.concurrent, device_type, overrides)
    if ns.row_timeout is not None and ns.row_timeout <= 0:
        raise ConfigError(f"--row-timeout={ns.row_timeout:g} must be > 0 seconds.")
    if ns.seeds < 1:
        raise ConfigError(f"--seeds={ns.seeds} must be >= 1.")
    out = Path(ns.out or DEFAULT_OUT)
    if ns.seeds == 1:
        return _exit_status([_bench_once(ns, recipe, overrides, budget_steps, device_type, slots, out)])
    first = load_config(recipe, overrides).train.seed
    reports = {}
    for seed in range(first, first + ns.seeds):
        print(f"seed {seed} ({seed - first + 1} of {ns.seeds})")
        reports[seed] = _bench_once(ns, recipe, [*overrides, f"train.seed={seed}"], budget_steps, device_type,
                                    slots, out / f"seed-{seed}")
    summary = seed_summary(reports)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1))
    (out / "seeds.md").write_text(seeds_markdown(summary))
    print(seeds_markdown(summary))
    print(f"over the seeds: {out / 'seeds.md'}  {out / 'seeds.json'}")
    return _exit_status(list(reports.values()))


def _exit_status(reports: list[dict[str, Any]]) -> int:
    """1 when every row of every report failed, else 0."""
    return 0 if any(r["status"] == "ok" for report in reports for r in report["rows"]) else 1


def _bench_once(ns: argparse.Namespace, recipe: str | None, overrides: list[str], budget_steps: int | None,
                device_type: str, slots: list[dict[str, str]], out: Path) -> dict[str, Any]:
    """One bench: run the rows into `out`, write the report there and return it."""
    from hasten.bench.report import build_report, write_report
    from hasten.bench.runner import BenchSettings, prepare

    settings = BenchSettings(recipe=recipe, overrides=tuple(overrides), budget_steps=budget_steps,
                             budget_seconds=ns.budget_seconds, device_type=device_type,
                             nproc=_nproc(ns.nproc_per_node, device_type))
    rows = select_rows(ns.rows, ns.row, settings.device_type, settings.nproc)
    prepare(settings)
    env = {**environment(settings, rows), "concurrent": len(slots)}

    def partial(results: list[dict[str, Any]]) -> None:  # a bench stopped midway still leaves its report
        finished = {r["name"] for r in results}
        pending = [row.name for row in rows if row.name not in finished]
        write_report(build_report(results, {**env, "pending_rows": pending}), out, plots=False)

    results = _run_rows(settings, rows, out, ns.fresh, slots, ns.row_timeout, on_result=partial)
    report = build_report(results, env)
    paths = write_report(report, out)
    _print_table(report)
    print(f"report: {paths[1]}  {paths[2]}  {paths[0]}")
    return report


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    """(recipe or None, overrides): the first argument is a recipe unless it is a key=value."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def _device_type(overrides: list[str]) -> str:
    """'cuda' or 'cpu': where the rows will train, from train.device or what is visible."""
    import torch

    from hasten.bench.runner import override_value

    device = override_value(overrides, "train.device") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _nproc(given: int | None, device_type: str) -> int:
    """Processes for the distributed rows: as given, else every visible GPU (1 on CPU)."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"--nproc-per-node={given} must be >= 1.")
        return given
    if device_type == "cuda":
        import torch
        return max(1, torch.cuda.device_count())
    return 1


def concurrency_slots(n: int, device_type: str, overrides: list[str]) -> tuple[list[dict[str, str]], list[str]]:
    """(one environment per row that may train at once, the overrides with a CPU row's thread share).

    On GPUs a slot is one visible GPU (CUDA_VISIBLE_DEVICES); on a CPU every slot gets cores // n
    threads (train.threads, unless the overrides set it), so that n rows do not oversubscribe the cores."""
    if n < 1:
        raise ConfigError(f"--concurrent={n} must be >= 1.")
    if n == 1:
        return [{}], overrides
    from hasten.bench.runner import override_value

    if ":" in (override_value(overrides, "train.device") or ""):
        raise ConfigError(f"--concurrent={n} gives each row a GPU of its own; leave train.device without an index.")
    if device_type == "cuda":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else \
            [str(i) for i in range(torch.cuda.device_count())]
        if n > len(gpus):
            raise ConfigError(f"--concurrent={n} needs {n} GPUs, one per row; {len(gpus)} visible.")
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus[:n]], overrides
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n > cores:
        raise ConfigError(f"--concurrent={n} needs at least {n} CPU cores, a thread per row; {cores} available.")
    if override_value(overrides, "train.threads") is None:
        overrides = [*overrides, f"train.threads={cores // n}"]
    return [{} for _ in range(n)], overrides


def select_rows(names: str | None, custom: list[str], device_type: str, nproc: int = 1) -> list[Row]:
    """The rows to run: named or default, then custom ones; the baseline first, each name once."""
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else default_row_names(device_type, nproc)
    rows = [get_row(n) for n in dict.fromkeys(["baseline", *chosen])]
    rows += [parse_custom_row(spec) for spec in custom]
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            raise ConfigError(f"Bench row {row.name!r} is given twice; give each row a distinct name.")
        seen.add(row.name)
    return rows


def _run_rows(settings: Any, rows: list[Row], out: Path, fresh: bool, slots: list[dict[str, str]] | None = None,
              timeout_s: float | None = None, on_result: Callable[[list[dict[str, Any]]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Run the rows with a progress display, one after another or several at once (`slots`, see
    `concurrency_slots`); a failed row does not stop the others. Results in the rows' order.
    `on_result` gets the results so far (in the rows' order) each time a row trains, fails or is
    measured."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from hasten.bench.runner import measure_row, run_concurrently, run_row

    slots = slots or [{}]
    steps = settings.resolved_steps() if settings.budget_seconds is None else None
    outcomes = {}
    done: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()  # rows trained together finish on the pool's threads

    def record(result: dict[str, Any]) -> None:
        with lock:
            done[result["name"]] = result
            if on_result is not None:
                on_result([done[row.name] for row in rows if row.name in done])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        overall = bar.add_task("bench rows", total=len(rows))

        def say(line: str) -> None:
            bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

        def report(outcome: Any, printed: bool = False) -> None:
            if not printed:
                say(_row_line(outcome.result, outcome.reused))
            bar.advance(overall)

        def train(row: Row, env: dict[str, str] | None, together: bool) -> Any:
            task = bar.add_task(f"  {row.name}" + (f" ({', '.join(env.values())})" if env else ""), total=steps)
            outcome = run_row(settings, row, out, fresh=fresh, env=env, measure=not together, alone=not together,
                              timeout_s=timeout_s, on_step=lambda step: bar.update(task, completed=step))
            bar.update(task, completed=steps or 0, visible=False)
            record(outcome.result)
            if not together:
                report(outcome)
            elif not outcome.reused:  # a line as it trains (or fails); a trained row's full one after inference
                say(_row_line(outcome.result, outcome.reused))
            return outcome

        together = [row for row in rows if not row.distributed] if len(slots) > 1 else []
        if together:
            outcomes = run_concurrently(together, slots, lambda row, env: train(row, env, True))
            say("rows trained; timing each row's inference alone")
            for row in together:
                failed = (outcome := outcomes[row.name]).result["status"] == "failed"  # its line is out already
                if outcome.result["status"] == "trained":
                    measure_row(settings, outcome.result, out / "rows" / row.name)
                    record(outcome.result)
                report(outcome, printed=failed)
        for row in rows:
            if row.name not in outcomes:  # one at a time: all rows, or the distributed ones after the others
                outcomes[row.name] = train(row, None, False)
    return [outcomes[row.name].result for row in rows]


def _row_line(result: dict[str, Any], reused: bool) -> str:
    """One line per row as it finishes, so that logs (not only terminals) show the progress."""
    name = result["name"]
    if reused:
        return f"row {name}: skipped, finished in an earlier run with the same settings (--fresh reruns it)"
    summary = result.get("summary") or {}
    if result["status"] == "trained":  # several rows at once: inference is timed after all of them train
        return (f"row {name}: trained, {summary['steps']} steps in {summary['wall_time_s']:.1f} s, "
                f"val loss {summary['final_val_loss']:.4f} (inference timed after all rows train)")
    if result["status"] != "ok":
        last = (result.get("error") or "").strip().splitlines()
        return f"row {name}: FAILED ({last[-1] if last else 'no error recorded'}); see {name}/bench_stderr.log"
    return (f"row {name}: done, {summary['steps']} steps in {summary['wall_time_s']:.1f} s, "
            f"val loss {summary['final_val_loss']:.4f}, inference {result['inference_ms']:.2f} ms")


def environment(settings: Any, rows: list[Row]) -> dict[str, Any]:
    """Where and how the report was measured: device, versions, date, budget, settings."""
    import torch

    import hasten

    if settings.device_type == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()}, {torch.cuda.device_count()} visible)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return dict(device=device, torch=torch.__version__, hasten=hasten.__version__, python=platform.python_version(),
                cpu_count=os.cpu_count(), commit=source_commit(),
                date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                budget=settings.budget(), recipe=settings.recipe or "default",
                overrides=settings.common_overrides(), rows=[row.name for row in rows])


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from hasten.bench.report import HEADERS, table_cells

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 220))  # logs: one line per row rather than wrapped cells
    table = Table(title=f"hasten bench ({report['environment']['device']})")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 4 else "right", overflow="fold")
    for cells in table_cells(report):
        table.add_row(*cells, style=None if cells[3] == "ok" else "red")
    console.print(table)


def _compare(path_a: str, path_b: str, out: Path) -> int:
    """`--compare A.json B.json`: print the rows side by side and write compare.md."""
    from rich.console import Console
    from rich.table import Table

    from hasten.bench.report import compare_markdown, compare_rows, load_report

    a, b = load_report(path_a), load_report(path_b)
    headers, cells = compare_rows(a, b)
    table = Table(title=f"A = {path_a}   B = {path_b}")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for line in cells:
        table.add_row(*line)
    Console().print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(compare_markdown(a, b, (path_a, path_b)))
    print(f"comparison: {out / 'compare.md'}")
    return 0
