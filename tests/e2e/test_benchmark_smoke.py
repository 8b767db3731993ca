"""The GPU benchmark scripts in their `--smoke` mode (tiny sizes on the CPU): each runs to the end
and writes its results file, so a script broken by a change is found here, not on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMOKES = {  # script and arguments, whether it takes --workdir, the file it writes
    "architectures": (["architectures.py", "--models", "dense,moe-scaled", "--seconds", "4"], True, "architectures.json"),
    "profile_mixer": (["profile_mixer.py", "--ablations"], False, "profile_mixer_ablations.json"),
    "optimizers": (["optimizers.py"], True, "optimizers.json"),
    "peft": (["peft_finetune.py"], True, "peft.json"),
}


@pytest.mark.parametrize("name", sorted(SMOKES))
def test_benchmark_smoke_run_writes_its_results(name, tmp_path):
    script, has_workdir, result = SMOKES[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HASTEN_CACHE": str(tmp_path / "cache")}
    workdir = ["--workdir", str(tmp_path / "work")] if has_workdir else []  # nothing reused from earlier runs
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:], "--smoke",
                           "--out", str(tmp_path / "out"), *workdir], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / result).read_text())
