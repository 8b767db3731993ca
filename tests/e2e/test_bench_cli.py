"""`hasten bench` end to end: real training subprocesses, a failing row, the report files, resume."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hasten.bench.report import HEADERS

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None  # the ptq row's int4 conversion needs it

# On the CPU even where a GPU is visible: these tests are of the bench's scheduling, shares of the cores included.
TINY = ["model.preset=tiny", "data.tokenizer=byte", "data.max_documents=40", "train.seq_len=32",
        "train.batch_size=4", "train.eval_every=5", "train.eval_batches=2", "log.plot=false", "optim.warmup_steps=2",
        "train.device=cpu"]


def _bench_command() -> list[str]:
    """`python -m hasten bench` when hasten's CLI has the subcommand, else its own entry point.

    Both run the same `add_parser` and `run` of hasten.bench.cli.
    """
    wired = subprocess.run([sys.executable, "-m", "hasten", "bench", "--help"], capture_output=True).returncode == 0
    return [sys.executable, "-m", "hasten", "bench"] if wired else [sys.executable, "-m", "hasten.bench"]


def _run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_bench_runs_rows_records_failures_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "HASTEN_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = tmp_path / "bench"
    command = [*_bench_command(), *TINY, "--budget-steps", "10", "--rows", "baseline,wsd,lora" + ",ptq" * HAS_TORCHAO,
               "--row", "broken:optim.lr=-1", "--concurrent", "2", "--out", str(out)]
    first = _run(command, env, tmp_path)

    for name in ("report.json", "report.md", "report.html", "loss_vs_time.png", "pareto_time.png",
                 "quality_latency.png", "peak_memory.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["columns"] == HEADERS
    rows = {r["name"]: r for r in report["rows"]}
    assert [rows[n]["status"] for n in ("baseline", "wsd", "broken")] == ["ok", "ok", "failed"]
    assert "optim.lr" in rows["broken"]["error"]
    assert rows["lora"]["status"] == "ok"  # LoRA fine-tunes the trained baseline: few trainable weights
    assert rows["lora"]["trainable_params"] < rows["baseline"]["trainable_params"] / 4
    # post-training quantization: the int4 model's loss, size and inference are what the row reports
    if HAS_TORCHAO:
        assert rows["ptq"]["status"] == "ok" and 0 < rows["ptq"]["model_mb"] < rows["baseline"]["model_mb"]
        assert abs(rows["ptq"]["final_val_loss"] - rows["baseline"]["final_val_loss"]) < 0.5
    for name in ("baseline", "wsd"):
        row = rows[name]
        assert row["steps"] == 10 and row["final_val_loss"] > 0 and row["inference_ms"] > 0
        assert row["model_mb"] > 0 and row["tokens_per_second"] > 0 and len(row["evals"]) == 2
    assert rows["baseline"]["tokens_per_second_ratio"] == 1.0 and rows["baseline"]["steps_to_baseline_loss"] == 10
    header = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| row"))
    assert [c.strip() for c in header.strip("|").split("|")] == HEADERS
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4
    assert "row broken: FAILED" in first.stdout

    finished = {n: (out / "rows" / n / "bench_row.json").stat().st_mtime_ns for n in ("baseline", "wsd")}
    second = _run(command, env, tmp_path)
    assert "row baseline: skipped" in second.stdout and "row wsd: skipped" in second.stdout
    assert {n: (out / "rows" / n / "bench_row.json").stat().st_mtime_ns for n in finished} == finished
    assert "row broken: FAILED" in second.stdout  # failed rows are retried, not reused


def test_distributed_rows_run_on_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "HASTEN_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = tmp_path / "bench"
    _run([*_bench_command(), *TINY, "--budget-steps", "4", "--rows", "baseline,zero3", "--nproc-per-node", "2",
          "--out", str(out)], env, tmp_path)
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["zero3"]["status"] == "ok", rows["zero3"]["error"]
    summary = json.loads((out / "rows" / "zero3" / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["memory_per_rank"]) == 2


def test_rows_side_by_side_over_two_seeds(tmp_path: Path) -> None:
    """--concurrent 2 on the CPU: two rows at a time, each with its share of the cores (the rule that rows
    from the baseline wait for it is checked on the scheduler in tests/unit/test_bench.py). --seeds 2: the
    bench once per seed, and every row's val loss minus the baseline's of the same seed over the seeds."""
    env = {**os.environ, "HASTEN_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = tmp_path / "bench"
    done = _run([*_bench_command(), *TINY, "train.seed=5", "--budget-steps", "10", "--rows", "baseline,wsd",
                 "--concurrent", "2", "--seeds", "2", "--out", str(out)], env, tmp_path)
    reports = {s: json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (5, 6)}
    rows = {s: {r["name"]: r for r in report["rows"]} for s, report in reports.items()}
    for seed in (5, 6):
        baseline, wsd = rows[seed]["baseline"], rows[seed]["wsd"]
        assert baseline["status"] == wsd["status"] == "ok"
        assert max(baseline["started_at"], wsd["started_at"]) < min(baseline["ended_at"], wsd["ended_at"])  # overlapped
        assert all(r["inference_ms"] > 0 and r["other_cpu_share"] is None for r in rows[seed].values())
        assert reports[seed]["environment"]["concurrent"] == 2
    assert "Rows trained up to 2 at a time" in (out / "seed-5" / "report.md").read_text()
    assert "timing each row's inference alone" in done.stdout
    command = json.loads((out / "seed-6" / "rows" / "wsd" / "bench_row.json").read_text())["command"]
    assert f"train.threads={len(os.sched_getaffinity(0)) // 2}" in command and "train.seed=6" in command

    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [5, 6]
    assert rows[5]["wsd"]["final_val_loss"] != rows[6]["wsd"]["final_val_loss"]  # other draws
    wsd = next(r for r in summary["rows"] if r["name"] == "wsd")
    expected = [rows[s]["wsd"]["final_val_loss"] - rows[s]["baseline"]["final_val_loss"] for s in (5, 6)]
    assert wsd["val_loss_minus_baseline"]["values"] == expected
    assert (out / "seeds.md").read_text().startswith("# hasten bench over seeds 5, 6")


def test_a_row_past_the_row_timeout_is_stopped_and_the_others_go_on(tmp_path: Path) -> None:
    """Two rows at once (one CPU core each), so the test takes the limit, not the limit plus the baseline.
    While the endless row still trains, the report on disk already holds the baseline's numbers (a
    bench stopped then would leave them)."""
    LIMIT = 30  # the 5-step baseline takes ~4 s alone: room for a loaded 2-core machine running two tests at once
    env = {**os.environ, "HASTEN_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = tmp_path / "bench"
    command = [*_bench_command(), *TINY, "--budget-steps", "5", "--rows", "baseline", "--concurrent", "2",
               "--row", "endless:train.steps=1000000", "--row-timeout", str(LIMIT), "--out", str(out)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=tmp_path) as proc:
        partial = partial_md = None
        while proc.poll() is None and partial is None:
            time.sleep(0.5)
            if (out / "report.html").exists():  # the last of the files each write makes
                try:
                    partial, partial_md = json.loads((out / "report.json").read_text()), (out / "report.md").read_text()
                except json.JSONDecodeError:  # read while the next write was under way
                    continue
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert partial is not None, "no report was written before the bench ended"
    assert partial["environment"]["pending_rows"] == ["endless"]
    assert [(r["name"], r["status"]) for r in partial["rows"]] == [("baseline", "trained")]  # inference comes last
    assert partial["rows"][0]["tokens_per_second"] > 0 and partial["rows"][0]["steps"] == 5
    assert "Partial report, rewritten as rows finish: rows not finished yet: endless" in partial_md
    report = json.loads((out / "report.json").read_text())
    assert "pending_rows" not in report["environment"] and "Partial report" not in (out / "report.md").read_text()
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["baseline"]["status"] == "ok"
    assert rows["endless"]["status"] == "failed" and "--row-timeout" in rows["endless"]["error"]
    assert LIMIT <= rows["endless"]["process_time_s"] < LIMIT + 60  # stopped at its limit, not at the end of its steps
    assert "row endless: FAILED" in stdout
