"""The bench's pure parts: rows registry, steps-to-target, ratios, Pareto front, report files.

No training here: row results are written by hand, with numbers chosen so the answers are known.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from hasten.bench import rows as bench_rows
from hasten.bench.cli import add_parser, concurrency_slots, select_rows
from hasten.bench.report import (
    HEADERS,
    NOT_REACHED,
    add_ratios,
    build_report,
    compare_markdown,
    load_report,
    markdown,
    pareto_front,
    ratio,
    row_metrics,
    steps_to_target,
    write_report,
)
from hasten.bench.rows import ROWS, Row, combine, get_row, parse_custom_row, register
from hasten.bench.runner import (
    BenchSettings,
    other_cpu_share,
    parameter_bytes,
    row_overrides,
    run_concurrently,
    train_command,
)
from hasten.config import ConfigError, load_config

EVALS = [dict(step=25, val_loss=6.0, elapsed_s=5.0), dict(step=50, val_loss=5.5, elapsed_s=10.0),
         dict(step=75, val_loss=5.2, elapsed_s=15.0), dict(step=100, val_loss=5.0, elapsed_s=20.0)]


def _result(name: str, *, val_losses: list[float], seconds_per_eval: float, tokens_per_second: float,
            peak_gib: float, inference_ms: float, status: str = "ok") -> dict:
    """A bench_row.json as the runner writes it, with hand-picked numbers."""
    evals = [dict(step=25 * (i + 1), val_loss=v, elapsed_s=seconds_per_eval * (i + 1))
             for i, v in enumerate(val_losses)]
    summary = dict(steps=25 * len(val_losses), wall_time_s=seconds_per_eval * len(val_losses),
                   tokens_per_second=tokens_per_second, mfu=None, peak_memory_gib=peak_gib, params=1000,
                   final_val_loss=val_losses[-1], tokens=1, stop_reason="")
    if status != "ok":
        return dict(name=name, family="custom", benefit="reference", overrides=["optim.lr=-1"], description="",
                    status=status, error="hasten train exited with status 2:\nhasten: error: optim.lr=-1.0 bad.")
    return dict(name=name, family="f", benefit="training time", overrides=[], description="d", status="ok",
                error=None, summary=summary, evals=evals, train=[], inference_ms=inference_ms, model_bytes=4_000_000)


RESULTS = [
    _result("baseline", val_losses=[6.0, 5.5, 5.2, 5.0], seconds_per_eval=5.0, tokens_per_second=1000.0,
            peak_gib=2.0, inference_ms=10.0),
    # twice as fast per step, reaches 5.0 at its 3rd eval: 3 * 2.5 s = 7.5 s vs the baseline's 20 s
    _result("fast", val_losses=[5.8, 5.3, 5.0, 4.9], seconds_per_eval=2.5, tokens_per_second=2000.0,
            peak_gib=1.0, inference_ms=5.0) | dict(other_cpu_share=0.3),
    # slower and never reaches 5.0
    _result("slow", val_losses=[6.5, 6.0, 5.7, 5.6], seconds_per_eval=10.0, tokens_per_second=500.0,
            peak_gib=3.0, inference_ms=20.0),
    _result("broken", val_losses=[0.0], seconds_per_eval=0.0, tokens_per_second=0.0, peak_gib=0.0,
            inference_ms=0.0, status="failed"),
]


def test_steps_to_target_first_eval_at_or_below() -> None:
    assert steps_to_target(EVALS, 5.2) == (75, 15.0)
    assert steps_to_target(EVALS, 5.25) == (75, 15.0)
    assert steps_to_target(EVALS, 6.0) == (25, 5.0)
    assert steps_to_target(EVALS, 4.9) is None
    assert steps_to_target(list(reversed(EVALS)), 5.5) == (50, 10.0)  # order of records does not matter
    assert steps_to_target(EVALS, None) is None
    assert steps_to_target(EVALS + [dict(step=125, val_loss=math.nan, elapsed_s=25.0)], 4.0) is None
    # Newer runs record the training seconds (compilation and evaluations left out): those count.
    timed = [dict(r, train_s=r["elapsed_s"] / 2) for r in EVALS]
    assert steps_to_target(timed, 5.2) == (75, 7.5)


def test_ratio_handles_missing_and_zero() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(math.nan, 1.0) is None


def test_row_metrics_and_ratios_from_known_numbers() -> None:
    report = build_report(RESULTS, dict(device="cpu", budget=dict(kind="steps", value=100)))
    rows = {r["name"]: r for r in report["rows"]}
    assert report["baseline_final_val_loss"] == 5.0
    base, fast, slow, broken = rows["baseline"], rows["fast"], rows["slow"], rows["broken"]
    assert (base["steps_to_baseline_loss"], base["time_to_baseline_loss_s"]) == (100, 20.0)
    assert (fast["steps_to_baseline_loss"], fast["time_to_baseline_loss_s"]) == (75, 7.5)
    assert fast["tokens_per_second_ratio"] == pytest.approx(2.0)
    assert fast["time_to_baseline_loss_ratio"] == pytest.approx(7.5 / 20.0)
    assert fast["memory_ratio"] == pytest.approx(0.5)
    assert fast["inference_latency_ratio"] == pytest.approx(0.5)
    assert fast["model_mb"] == pytest.approx(4.0)
    assert slow["reached_baseline_loss"] is False and slow["time_to_baseline_loss_ratio"] is None
    assert slow["tokens_per_second_ratio"] == pytest.approx(0.5)
    assert base["tokens_per_second_ratio"] == 1.0
    assert broken["status"] == "failed" and broken["tokens_per_second_ratio"] is None
    assert "optim.lr" in broken["error"]


def test_ratios_are_none_without_a_baseline() -> None:
    rows = add_ratios([row_metrics(r, 5.0) for r in RESULTS[1:]])
    assert all(r["tokens_per_second_ratio"] is None for r in rows)


def test_pareto_front() -> None:
    points = [("a", 1.0, 5.0), ("b", 2.0, 4.0), ("c", 3.0, 4.5), ("d", 4.0, 3.0), ("e", 2.0, 4.0 + 1e-9)]
    assert pareto_front(points) == ["a", "b", "d"]  # c is beaten by b; e by b on loss at equal time
    assert pareto_front([("only", 1.0, 1.0)]) == ["only"]
    assert pareto_front([]) == []


def test_registry_rejects_duplicates_and_bad_rows() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register(Row(name="baseline", family="x", benefit="reference", overrides=(), description=""))
    with pytest.raises(ConfigError, match="benefit"):
        Row(name="x", family="x", benefit="speed", overrides=(), description="")
    with pytest.raises(ConfigError, match="section.field=value"):
        Row(name="x", family="x", benefit="memory", overrides=("precision.dtype",), description="")
    with pytest.raises(ConfigError, match="Did you mean bf16"):
        get_row("bf61")


def test_combinations_join_overrides_and_reject_conflicts() -> None:
    row = get_row("wsd+compile")  # not registered: composed on the fly
    assert row.overrides == ("optim.schedule=wsd", "train.compile=true")
    assert row.benefit == "quality at equal budget + training time"
    assert ROWS["bf16+compile"].family == "mixed precision + compilation"
    with pytest.raises(ConfigError, match="different values"):
        combine("bf16", "fp16")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_registered_row_is_a_valid_config(name: str) -> None:
    """Registering a row registers this test: its overrides must load over the shipped default."""
    load_config("default", row_overrides(BenchSettings(), ROWS[name], Path("/tmp/bench/rows") / name))


def test_a_distilled_row_learns_from_the_baseline_with_half_its_layers(tmp_path: Path) -> None:
    command = train_command(BenchSettings(), ROWS["distill"], tmp_path / "rows" / "distill")
    assert f"distill.teacher={tmp_path / 'rows' / 'baseline'}" in command
    assert "model.n_layers=2" in command  # the default recipe's small model has 4
    gpt2 = train_command(BenchSettings(recipe="gpt2-124m"), ROWS["distill"], tmp_path / "rows" / "distill")
    assert "model.n_layers=6" in gpt2


def test_default_rows_and_selection() -> None:
    for device in ("cpu", "cuda"):
        names = bench_rows.default_row_names(device)
        assert names[0] == "baseline" and len(set(names)) == len(names)
        assert all(bench_rows.get_row(name) for name in names)
    chosen = select_rows("wsd,bf16", ["odd:optim.lr=3e-3 train.grad_clip=0.5"], "cpu")
    assert [r.name for r in chosen] == ["baseline", "wsd", "bf16", "odd"]
    assert chosen[-1].overrides == ("optim.lr=3e-3", "train.grad_clip=0.5")
    with pytest.raises(ConfigError, match="given twice"):
        select_rows("wsd", ["wsd:optim.lr=1"], "cpu")
    with pytest.raises(ConfigError, match="NAME:"):
        parse_custom_row("nocolon")


def test_settings_order_budget_and_fingerprint(tmp_path: Path) -> None:
    settings = BenchSettings(overrides=("train.eval_every=5",), budget_steps=40)
    command = train_command(settings, ROWS["wsd"], tmp_path / "wsd")
    overrides = command[command.index("train") + 1:]
    assert overrides.index("train.eval_every=25") < overrides.index("train.eval_every=5")  # user wins
    assert "train.steps=40" in overrides
    assert overrides[-2:] == ["optim.schedule=wsd", f"train.out_dir={tmp_path / 'wsd'}"]
    timed = BenchSettings(budget_seconds=30.0).common_overrides()
    assert "train.time_limit_s=30.0" in timed and "train.steps=1000000" in timed
    assert "optim.horizon=time" in timed  # each row's schedule ends with its time
    assert "optim.horizon=time" not in BenchSettings(budget_seconds=30.0,
                                                     overrides=("optim.horizon=steps",)).common_overrides()
    assert settings.fingerprint(ROWS["wsd"]) != BenchSettings(budget_steps=41).fingerprint(ROWS["wsd"])
    assert settings.fingerprint(ROWS["wsd"]) != settings.fingerprint(ROWS["bf16"])
    with pytest.raises(ConfigError, match="not both"):
        BenchSettings(budget_steps=1, budget_seconds=1.0)
    assert BenchSettings().resolved_steps() == 250 and BenchSettings(recipe="gpt2-124m").resolved_steps() is None


def test_other_cpu_share_from_counters() -> None:
    cores = os.cpu_count() or 1
    # the machine was busy 5 CPU-s more, of which the row's own process used 3: others used 2 of 10 s * cores
    assert other_cpu_share((100.0, 10.0), (105.0, 13.0), 10.0) == pytest.approx(2.0 / (10.0 * cores))
    assert other_cpu_share((100.0, 10.0), (101.0, 13.0), 10.0) == 0.0  # clock granularity: never negative
    assert other_cpu_share(None, (1.0, 1.0), 10.0) is None


def test_parameter_bytes_counts_tied_weights_once() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    untied = parameter_bytes(model)
    model[1].weight = model[0].weight
    assert untied == 2 * 40 * 4 and parameter_bytes(model) == 40 * 4


def test_report_files_have_the_columns(tmp_path: Path) -> None:
    report = build_report(RESULTS, dict(device="cpu (test)", torch="x", hasten="y", date="today",
                                        budget=dict(kind="steps", value=100)))
    paths = write_report(report, tmp_path)
    names = {p.name for p in paths}
    assert {"report.json", "report.md", "report.html", "loss_vs_time.png", "pareto_time.png",
            "quality_latency.png", "peak_memory.png"} <= names
    assert all(p.stat().st_size > 0 for p in paths)
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["columns"] == HEADERS
    assert [r["name"] for r in stored["rows"]] == ["baseline", "fast", "slow", "broken"]
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == HEADERS
    slow_line = next(line for line in md.splitlines() if line.startswith("| slow"))
    assert NOT_REACHED in slow_line and "0.50x" in slow_line
    assert "Row `broken` failed" in md
    assert "fast (30%)" in md  # the row that shared the CPU with other processes is flagged
    assert "computed by" not in md  # no row ran the chunked head and loss
    kernels = [r | dict(summary=r["summary"] | dict(loss_kernel=k)) for r, k in zip(RESULTS[:3], ["quack", "triton", "quack"])]
    md = markdown(build_report(kernels, dict(device="cuda (test)", budget=dict(kind="steps", value=100))))
    assert "Output head and loss (train.loss_chunk, train.loss_kernel) computed by: quack (baseline, slow); triton (fast)." in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and all(h in page for h in HEADERS)


def test_a_partial_report_counts_trained_rows_and_names_the_pending_ones(tmp_path: Path) -> None:
    """Written as rows finish: a row that trained but whose inference is not timed yet ("trained")
    has its training numbers and ratios against a trained baseline, and no latency; the notes say
    which rows are still to come and that the report is partial; no figures are drawn."""
    trained = [{**r, "status": "trained", "inference_ms": None} for r in RESULTS[:2]]
    report = build_report(trained, dict(device="cpu (test)", budget=dict(kind="steps", value=100),
                                        pending_rows=["slow", "broken"]))
    rows = {r["name"]: r for r in report["rows"]}
    assert report["baseline_final_val_loss"] == 5.0
    assert rows["fast"]["tokens_per_second_ratio"] == pytest.approx(2.0)
    assert rows["fast"]["time_to_baseline_loss_ratio"] == pytest.approx(7.5 / 20.0)
    assert rows["fast"]["inference_latency_ratio"] is None
    paths = write_report(report, tmp_path, plots=False)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    md = (tmp_path / "report.md").read_text()
    assert "Partial report, rewritten as rows finish: rows not finished yet: slow, broken" in md
    assert "failed" not in md
    assert "data:image/png" not in (tmp_path / "report.html").read_text()
    final = build_report(RESULTS, dict(device="cpu (test)", budget=dict(kind="steps", value=100)))
    write_report(final, tmp_path)
    assert "Partial report" not in (tmp_path / "report.md").read_text()


def test_compare_two_reports(tmp_path: Path) -> None:
    env = dict(device="cpu", budget=dict(kind="steps", value=100))
    a = build_report(RESULTS[:2], env)
    b = build_report([RESULTS[0], RESULTS[2]], env)
    (tmp_path / "a.json").write_text(json.dumps(a))
    text = compare_markdown(load_report(tmp_path / "a.json"), b, ("a.json", "b.json"))
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines] == ["row", "baseline", "fast", "slow"]
    assert "1.00x" in lines[1]
    with pytest.raises(ConfigError, match="not a file"):
        load_report(tmp_path / "missing.json")


def test_add_parser_builds_the_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="hasten")
    add_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "default", "train.seq_len=64", "--rows", "wsd", "--budget-steps", "5"])
    assert (ns.args, ns.rows, ns.budget_steps, ns.fresh) == (["default", "train.seq_len=64"], "wsd", 5, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--budget-steps", "5", "--budget-seconds", "3"])


def test_a_token_budget_becomes_steps_of_the_recipes_global_batch() -> None:
    from hasten.bench.cli import steps_for_tokens

    overrides = ["train.batch_size=4", "train.seq_len=32", "train.grad_accum=2"]
    assert steps_for_tokens(25_600, None, overrides) == 100  # 4 * 32 * 2 = 256 tokens a step
    with pytest.raises(ConfigError, match="must be > 0"):
        steps_for_tokens(0, None, overrides)


def test_distributed_rows_launch_under_torchrun_and_join_the_defaults_with_several_processes(tmp_path: Path) -> None:
    from hasten.bench.runner import train_command

    assert "zero3" not in bench_rows.default_row_names("cpu", 1)
    assert {"ddp", "zero2", "zero3"} <= set(bench_rows.default_row_names("cpu", 2))
    settings = BenchSettings(budget_steps=4, nproc=2)
    command = train_command(settings, bench_rows.get_row("zero2+bf16"), tmp_path / "rows" / "zero2+bf16")
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert "parallel.strategy=zero2" in command
    plain = train_command(settings, bench_rows.get_row("wsd"), tmp_path / "rows" / "wsd")
    assert plain[1:4] == ["-m", "hasten", "train"]


def test_run_concurrently_fills_the_slots_and_holds_rows_that_need_the_baseline() -> None:
    import threading
    import time

    lock, running, peak, spans = threading.Lock(), [], [0], {}

    def start(row: Row, slot: str) -> str:
        with lock:
            running.append(slot)
            peak[0] = max(peak[0], len(running))
            assert running.count(slot) == 1  # a slot holds one row at a time
        began = time.monotonic()
        time.sleep(0.3 if row.name == "baseline" else 0.05)
        with lock:
            running.remove(slot)
        spans[row.name] = (began, time.monotonic())
        return f"{row.name}@{slot}"

    rows = [get_row("baseline"), get_row("lora"), get_row("wsd"), get_row("bf16"), get_row("distill")]
    outcomes = run_concurrently(rows, ["gpu0", "gpu1"], start)
    assert sorted(outcomes) == sorted(r.name for r in rows) and peak[0] == 2
    for waiting in ("lora", "distill"):  # both start from the trained baseline
        assert spans[waiting][0] >= spans["baseline"][1]
    assert spans["wsd"][0] < spans["baseline"][1]  # the others did not wait: they filled the second slot


def test_concurrency_slots_and_their_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert concurrency_slots(1, "cpu", ["a=1"]) == ([{}], ["a=1"])
    cores = len(os.sched_getaffinity(0))
    slots, overrides = concurrency_slots(min(2, cores), "cpu", ["a=1"])
    assert len(slots) == min(2, cores) and overrides[-1] == f"train.threads={cores // min(2, cores)}"
    assert concurrency_slots(min(2, cores), "cpu", ["train.threads=1"])[1] == ["train.threads=1"]  # the user's wins
    with pytest.raises(ConfigError, match="must be >= 1"):
        concurrency_slots(0, "cpu", [])
    with pytest.raises(ConfigError, match="CPU cores"):
        concurrency_slots(cores + 1, "cpu", [])
    with pytest.raises(ConfigError, match="without an index"):
        concurrency_slots(2, "cuda", ["train.device=cuda:1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a slot is one of the visible GPUs, named as the user named it
    assert concurrency_slots(2, "cuda", ["a=1"]) == ([{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}], ["a=1"])
    with pytest.raises(ConfigError, match="needs 3 GPUs, one per row; 2 visible"):
        concurrency_slots(3, "cuda", [])


def test_seed_summary_pairs_each_row_with_the_baseline_of_its_seed() -> None:
    from hasten.bench.report import seed_summary, seeds_markdown

    def report(base: float, wsd: float, wsd_status: str = "ok", wsd_steps: int | None = None) -> dict:
        row = dict(tokens_per_second_ratio=1.0, memory_ratio=1.0)
        return dict(rows=[dict(name="baseline", status="ok", final_val_loss=base, steps_to_baseline_loss=10, **row),
                          dict(name="wsd", status=wsd_status, final_val_loss=wsd, steps_to_baseline_loss=wsd_steps,
                               **row)])

    summary = seed_summary({1: report(4.0, 3.9, wsd_steps=8), 2: report(4.2, 4.0), 3: report(4.1, 1.0, "failed", 2)})
    wsd = next(r for r in summary["rows"] if r["name"] == "wsd")
    assert wsd["seeds"] == [1, 2]  # the failed seed does not count
    assert wsd["val_loss_minus_baseline"]["values"] == pytest.approx([-0.1, -0.2])
    assert wsd["val_loss_minus_baseline"]["mean"] == pytest.approx(-0.15)
    assert wsd["val_loss_minus_baseline"]["std"] == pytest.approx(math.sqrt(0.005))  # sample std of -0.1, -0.2
    assert wsd["final_val_loss"]["mean"] == pytest.approx(3.95)
    assert wsd["steps_to_baseline_loss"]["values"] == [8]  # reached at seed 1 only (seed 3 failed)
    assert "| wsd | 2 | 3.9500 ± 0.0707 | -0.1500 ± 0.0707 | 1.000 ± 0.000 | 1.000 ± 0.000 | 8.0 (1 of 2) |" \
        in seeds_markdown(summary)
