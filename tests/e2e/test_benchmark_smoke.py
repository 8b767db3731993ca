"""The GPU benchmark scripts in their `--smoke` mode (tiny sizes on the CPU): each runs to the end
and writes its results file, so a script broken by a change is found here, not on the GPU machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The scripts import hasten from this tree; packages found through an existing PYTHONPATH stay found.
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])

SMOKES = {  # script and arguments, whether it takes --workdir, the file it writes
    "architectures": (["architectures.py", "--models", "dense,moe-scaled,moe-shared"], True, "architectures.json"),
    "profile_mixer": (["profile_mixer.py", "--ablations"], False, "profile_mixer_ablations.json"),
    # the optimizers that take the loop's other paths (curvature refresh, Muon's split, train/eval
    # weights), each swept over two rates: the script end to end in a third of the full smoke's time
    "optimizers": (["optimizers.py", "--optimizers", "sophia,muon,schedulefree_adamw", "--lr-mults", "0.5,1"], True,
                   "optimizers.json"),
    "peft": (["peft_finetune.py"], True, "peft.json"),
}


@pytest.mark.parametrize("name", sorted(SMOKES))
def test_benchmark_smoke_run_writes_its_results(name, tmp_path):
    script, has_workdir, result = SMOKES[name]
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "HASTEN_CACHE": str(tmp_path / "cache")}
    workdir = ["--workdir", str(tmp_path / "work")] if has_workdir else []  # nothing reused from earlier runs
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:], "--smoke",
                           "--out", str(tmp_path / "out"), *workdir], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = json.loads((tmp_path / "out" / result).read_text())
    assert written
    if name == "optimizers":  # its summary derived again from the recorded runs, training nothing, is the same
        again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script[0]), "--from-json",
                                str(tmp_path / "out" / result)], capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((tmp_path / "out" / result).read_text())["summary"] == written["summary"]
        assert written["summary"]["time_to_adamw_loss_ratio"]["adamw"] == 1.0


def test_no_benchmark_script_shadows_an_installed_module():
    """Each script's folder is first on its import path: a script named like a library hides it."""
    clashes = [p.name for p in (ROOT / "benchmarks").glob("*.py") if importlib.util.find_spec(p.stem) is not None]
    assert not clashes, f"benchmark scripts named like importable modules: {clashes}"


def test_pretrain_summary_reports_variants_without_the_recipe_row_and_lists_failures():
    spec = importlib.util.spec_from_file_location("pt", ROOT / "benchmarks" / "pretrain_throughput.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    row = dict(tokens_per_second=300.0, mfu=0.4, peak_memory_gib=1.0, step_ms=1.0, final_loss=3.0)
    rows = [{**row, "name": "hasten[bf16res]", "overrides": ["model.fp32_residual=false"]},
            {**row, "name": "hf_trainer", "tokens_per_second": 200.0, "mfu": None}, {"name": "plain", "error": "boom"}]
    summary = pt._summary(rows)
    assert "ratio_vs_hf" not in summary and summary["variants"]["hasten[bf16res]"]["ratio_vs_hf"] == 1.5
    assert summary["targets_met"] == {}  # the recipe's row did not run: no target is judged
    text = pt._markdown(dict(device="cpu", torch="x", steps=1, warmup=1, rows=rows, summary=summary))
    assert "hasten[bf16res] / HF Trainer: **1.500**" in text and "Failed (error kept in the JSON): plain." in text


def test_pretrain_rows_record_the_clock_and_power_of_the_busy_samples(tmp_path):
    spec = importlib.util.spec_from_file_location("pt", ROOT / "benchmarks" / "pretrain_throughput.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    sampler = pt.GpuSampler()
    sampler.log = tmp_path / "gpu.csv"
    sampler.log.write_text("1980, 80.5, 700.00, Not Active\n1575, 690.0, 700.00, Active\n1425, 700.0, 700.00, Active\n"
                           "1965, 500.0, 700.00, Not Active\n[N/A], [N/A], 700.00, [N/A]\n")
    busy = sampler.summary()["gpu_busy"]  # the idle sample and the unreadable one left out
    assert busy == dict(samples=3, sm_clock_mhz_median=1575.0, power_w_median=690.0, power_limit_w=700.0,
                        power_capped_share=2 / 3)
    assert not sampler.log.exists() and sampler.summary() == {}


def test_quack_kernels_renders_its_tables_and_refuses_a_gpu_it_cannot_use(tmp_path):
    """The QuACK comparison needs a Hopper GPU: without one it says so; its tables come from the
    results file alone (a case that failed or was skipped keeps its reason in the table)."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    script = str(ROOT / "benchmarks" / "quack_kernels.py")
    results = dict(device="gpu", torch="x", quack="0.0", shapes=dict(tokens=8, dim=4, hidden=8, vocab=16), rows=[
        dict(section="head + cross-entropy", name="hasten", ms=2.0, first_call_s=1.0, peak_gib=0.5,
             rel_err=dict(loss=0.0, dh=0.003)),
        dict(section="gemm", name="down: quack tuned", ms=0.5, tflops=600.0, first_call_s=9.0, peak_gib=0.1,
             rel_err=dict(out=0.002)),
        dict(section="gemm", name="head: cublas", skipped="time budget spent")])
    (tmp_path / "q.json").write_text(json.dumps(results))
    done = subprocess.run([sys.executable, script, "--render", str(tmp_path / "q.json")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "q.md").read_text()
    assert "## head + cross-entropy" in text and "| hasten | 2.000 |  | 1.0 | 0.5 | 0.0030 |" in text
    assert "| down: quack tuned | 0.500 | 600.0 |" in text and "| head: cublas | time budget spent |" in text
    import torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        refused = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out")], capture_output=True,
                                 text=True, env=env, timeout=120)
        assert refused.returncode != 0 and "needs a CUDA GPU of compute capability 9.0" in refused.stderr


def test_ptq_schemes_quantizes_a_trained_run_at_each_scheme(tiny_config, tmp_path):
    pytest.importorskip("torchao")
    import hasten

    # on the CPU, where the script evaluates (a GPU run's bf16 evaluation differs from it by ~2e-3)
    hasten.train(tiny_config("train.steps=4", "train.eval_every=4", "train.compile=false", "train.device=cpu"))
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "HASTEN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptq_schemes.py"), str(tmp_path / "run"),
                           "--schemes", "int8w:0,int4w:32"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if "val loss" in line]
    assert [line[0] for line in lines] == ["float", "int8w", "int4w"]
    float_loss, int8_loss, int4_loss = (float(line[-1]) for line in lines)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert float_loss == pytest.approx(summary["final_val_loss"], abs=1e-4)  # the run's own evaluation
    assert abs(int8_loss - float_loss) < abs(int4_loss - float_loss) + 1e-3 < 0.5  # int8 at least as close


def test_architectures_trains_models_side_by_side_and_joins_rows(tmp_path):
    """--parallel 2: one process per GPU (here: per CPU process), each with its share of the models, rows joined;
    --rows-from joins rows of another run, paired with dense only at the same seed."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "HASTEN_CACHE": str(tmp_path / "cache")}

    def bench(*args):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "architectures.py"), "--smoke", "--seed", "3",
                               "--seconds", "3", "--workdir", str(tmp_path / "work"), *args], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    bench("--models", "dense,moe-alt", "--parallel", "2", "--out", str(tmp_path / "a"))
    joined = json.loads((tmp_path / "a" / "architectures.json").read_text())
    rows = {r["name"]: r for r in joined["models"]}
    assert sorted(rows) == ["dense", "moe-alt"] and {r["seed"] for r in rows.values()} == {3}
    assert all((tmp_path / "work" / f"parallel-{i}" / "architectures.json").is_file() for i in (0, 1))
    ratio = rows["moe-alt"]["tokens_per_second"] / rows["dense"]["tokens_per_second"]
    assert joined["summary"]["moe_alternating_tokens_per_second_ratio"] == pytest.approx(ratio)
    assert "MoE on every other layer (moe-alt)" in (tmp_path / "a" / "architectures.md").read_text()
    # an earlier run whose dense row trained at another seed: not a pair for moe-alt's seed-3 row
    (tmp_path / "c").mkdir()
    earlier = {**joined, "models": [{**rows["dense"], "seed": 4}]}
    (tmp_path / "c" / "architectures.json").write_text(json.dumps(earlier))
    moe_alt_only = tmp_path / "work" / "parallel-1" / "architectures.json"  # the second process's share
    bench("--models", "", "--skip-layers", "--out", str(tmp_path / "c"), "--rows-from", str(moe_alt_only))
    rejoined = json.loads((tmp_path / "c" / "architectures.json").read_text())
    assert sorted(r["name"] for r in rejoined["models"]) == ["dense", "moe-alt"]
    assert "moe_alternating_tokens_per_second_ratio" not in rejoined["summary"]
