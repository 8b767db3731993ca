"""The `hasten` command end to end, in subprocesses, on tiny real runs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.conftest import run_hasten as hasten


def test_train_generate_export_round_trip(tmp_path, env):
    run = tmp_path / "run"
    proc = hasten("train", *TINY, "train.steps=12", "train.eval_every=6", "log.plot=true", "log.sample_tokens=10",
                  f"train.out_dir={run}", env=env)
    assert "val loss" in proc.stderr and "sample:" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 12 and (run / "loss.png").stat().st_size > 1000
    from_run = hasten("generate", str(run), "--prompt", "def ", "--tokens", "16", "--seed", "3", env=env).stdout
    assert from_run.startswith("def ")
    out = hasten("export", str(run), env=env).stdout.strip()
    export = Path(out)
    assert (export / "model.safetensors").exists() and (export / "config.json").exists()
    assert json.loads((export / "config.json").read_text())["model"]["dim"] == 64
    from_export = hasten("generate", str(export), "--prompt", "def ", "--tokens", "16", "--seed", "3", env=env).stdout
    assert from_export == from_run  # same weights, same seed: the export loses nothing


def test_distill_a_student_from_a_trained_teacher(tmp_path, env):
    from hasten.config import recipe_path

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    hasten("train", *TINY, "model.dim=128", "train.steps=10", "train.eval_every=10", f"train.out_dir={teacher}", env=env)
    recipe = tmp_path / "chunked.toml"  # a recipe that chunks the loss (as gpt2-124m does): distill compares whole logits
    recipe.write_text(recipe_path("default").read_text().replace("[train]\n", "[train]\nloss_chunk = 32\n"))
    proc = hasten("distill", str(recipe), *TINY, f"distill.teacher={teacher}", "model.n_layers=1", "train.steps=6",
                  "train.eval_every=6", "log.every=3", f"train.out_dir={student}", env=env)
    summary = json.loads((student / "summary.json").read_text())
    assert summary["completed"] and summary["teacher_params"] > summary["params"] and "teacher_params" in proc.stdout
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert all("kd" in r for r in records if r["event"] == "train")
    missing = hasten("distill", *TINY, env=env, check=False)
    assert missing.returncode == 2 and "hasten distill needs distill.teacher=PATH" in missing.stderr


def test_nas_searches_and_writes_a_pattern_that_trains(tmp_path, env):
    out = tmp_path / "nas"
    proc = hasten("nas", *TINY, "nas.steps=6", "nas.warmup_steps=2", "log.every=3", f"train.out_dir={out}", env=env)
    result = json.loads((out / "nas.json").read_text())
    pattern = result["derived_mixers"]
    assert len(pattern) == 2 and set(pattern) <= {"A", "M"} and f"model.mixers={pattern}" in proc.stdout
    assert set(result["latency_ms"]) == {"A", "M"} and len(result["history"]) == 2
    hasten("train", *TINY, f"model.mixers={pattern}", "train.steps=2", f"train.out_dir={tmp_path / 'derived'}", env=env)
    bad = hasten("nas", *TINY, "nas.candidates=AX", f"train.out_dir={out}", env=env, check=False)
    assert bad.returncode == 2 and "nas.candidates='AX'" in bad.stderr


def test_recipe_file_with_overrides(tmp_path, env):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('[model]\npreset = "tiny"\n[train]\nsteps = 3\nbatch_size = 2\nseq_len = 16\n'
                      '[data]\ntokenizer = "byte"\nmax_documents = 30\n')
    run = tmp_path / "r"
    hasten("train", str(recipe), "train.steps=4", "log.sample_tokens=0", f"train.out_dir={run}", env=env)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert 'steps = 4' in (run / "config.toml").read_text()


@pytest.mark.parametrize("args, message", [
    (["train.stpes=3"], "Unknown config key 'train.stpes'. Did you mean train.steps?"),
    (["precision.dtype=fp8"], "precision.dtype='fp8' is not allowed: choose one of auto, fp32, bf16, fp16."),
    (["missing.toml"], "Recipe 'missing.toml' is neither a file nor a shipped recipe"),
    (["data.source=/no/such/place"], "/no/such/place"),
])
def test_bad_input_fails_at_once_with_one_sentence(env, args, message):
    proc = hasten("train", *args, env=env, check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_and_a_bad_key_answer_before_torch_is_imported(env):
    """`import hasten` and the command's parsing and config checks import no torch (whose import alone
    takes seconds); hasten.train stays the function once its package hasten.train is imported."""
    code = ("import contextlib, io, sys\n"
            "import hasten.cli\n"
            "with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):\n"
            "    bad = hasten.cli.main(['train', 'train.stpes=3'])\n"
            "    try:\n"
            "        hasten.cli.main(['train', '--help'])\n"
            "    except SystemExit as done:\n"
            "        helped = done.code\n"
            "print(bad, helped, 'torch' in sys.modules)\n"
            "import hasten.train.loop\n"
            "print(hasten.train.__module__, hasten.train.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["2", "0", "False", "hasten.api", "train"], out.stdout + out.stderr


def test_generate_from_a_folder_that_is_not_a_run(tmp_path, env):
    proc = hasten("generate", str(tmp_path), env=env, check=False)
    assert proc.returncode == 2 and "is not a hasten run folder" in proc.stderr
    quantized = hasten("generate", str(tmp_path), "--quantized", env=env, check=False)
    assert quantized.returncode == 2
    assert f"hasten: error: {tmp_path / 'quantized.pt'} does not exist: the run did not finish with qat.scheme set" \
        in quantized.stderr


def test_help_documents_every_field(env):
    from hasten.config import field_help

    text = hasten("train", "--help", env=env).stdout
    for key, *_ in field_help():
        assert key in text


def _sigterm_once_started(args: list[str], env: dict[str, str], started) -> tuple[str, str]:
    """Run `hasten ARGS`, send SIGTERM once `started()` holds, and return its output; it must exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "hasten", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not started():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    return stdout, stderr


def test_a_search_stopped_by_sigterm_keeps_its_state_and_resumes(tmp_path, env):
    out = tmp_path / "nas"
    stdout, _ = _sigterm_once_started(["nas", *TINY, "nas.steps=100000", "nas.warmup_steps=1", "log.every=1",
                                       "checkpoint.every=1", f"train.out_dir={out}"], env,
                                      started=lambda: (out / "nas_state.pt").exists())
    assert "stopped by SIGTERM" in stdout
    partial = json.loads((out / "nas.json").read_text())
    stopped_at = partial["steps_done"]
    assert 0 < stopped_at < 100000 and not partial["complete"]
    hasten("nas", *TINY, f"nas.steps={stopped_at + 2}", "nas.warmup_steps=1", "train.resume=auto",
           f"train.out_dir={out}", env=env)
    resumed = json.loads((out / "nas.json").read_text())
    assert resumed["complete"] and resumed["steps_done"] == stopped_at + 2
    assert resumed["latency_ms"] == partial["latency_ms"]  # the table measured at the start, kept


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, env):
    run = tmp_path / "run"
    log = run / "metrics.jsonl"
    _, stderr = _sigterm_once_started(["train", *TINY, "train.steps=100000", "log.every=5", "checkpoint.every=0",
                                       "train.eval_every=0", f"train.out_dir={run}"], env,
                                      started=lambda: log.exists() and bool(log.read_text()))
    assert "received SIGTERM" in stderr
    summary = json.loads((run / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert 0 < stopped_at < 100000 and not summary["completed"]
    assert (run / "checkpoints" / f"step_{stopped_at:07d}" / "trainer_state.json").exists()
    hasten("train", *TINY, f"train.steps={stopped_at + 3}", "train.resume=auto", f"train.out_dir={run}", env=env)
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["completed"] and resumed["steps"] == stopped_at + 3
