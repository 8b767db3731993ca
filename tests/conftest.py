"""Shared fixtures: tiny runs on small, real data, with caches kept inside the test's tmp folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # hasten's Triton kernels are then checked under Triton's interpreter (when the
    # triton package is installed), which must be on before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hasten.config import load_config  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on a 2-core machine: one thread each
    # (inherited by the processes the tests start), not two each contending for the two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

TINY = ["model.preset=tiny", "data.tokenizer=byte", "data.max_documents=60", "train.batch_size=4",
        "train.seq_len=32", "train.eval_batches=2", "log.progress=false", "log.tensorboard=false",
        "log.plot=false", "log.sample_tokens=0", "optim.warmup_steps=2"]


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    """A factory of tiny-model configs that write into tmp_path; extra overrides win."""
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))

    def make(*overrides: str, out: str = "run"):
        return load_config("default", [*TINY, f"train.out_dir={tmp_path / out}", *overrides])

    return make


def run_hasten(*args: str, env: dict[str, str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """The real `hasten` command in a subprocess; a failure shows its stderr."""
    proc = subprocess.run([sys.executable, "-m", "hasten", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"hasten {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def env(tmp_path):
    """The environment of CLI subprocesses: token cache inside the test's folder, unbuffered output."""
    return {**os.environ, "HASTEN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def triton_device():
    """Where hasten's hand-written Triton kernels are checked: "cuda" (compiled) on a GPU; else "cpu"
    under Triton's interpreter (set on above) when the triton package is installed (the dev extra, on
    Linux), each program run in NumPy; skipped without it."""
    from hasten.models.ops import triton_cross_entropy

    if triton_cross_entropy.available():
        return "cuda"
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET) and there is no GPU")
    return "cpu"
