"""Checkpoints reshard between world sizes; `torchrun -m hasten train` is the real launch path."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import hasten
from hasten.train.checkpoint import list_checkpoints
from tests.dist.launch import spawn, torchrun, train_ranks
from tests.dist.test_strategies import B, COMMON, LOSS_RTOL, losses

RESUME = [*COMMON, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _single(out, *extra):
    return hasten.train(hasten.load_config("default", [*RESUME, f"train.batch_size={2 * B}", f"train.out_dir={out}",
                                                       *extra]))


def test_two_rank_zero3_checkpoint_resumes_in_one_process(tmp_path, env):
    spawn(train_ranks, [*RESUME, f"train.batch_size={B}", f"train.out_dir={tmp_path / 'two'}",
                        "parallel.strategy=zero3"])
    half = list_checkpoints(tmp_path / "two")[0]
    assert half.name == "step_0000002"
    _single(tmp_path / "one", f"train.resume={half}")
    straight, resumed = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({s: straight[s] for s in (3, 4)}, rel=LOSS_RTOL)


def test_one_process_checkpoint_resumes_on_two_ranks_under_torchrun(tmp_path, env):
    """Also the launch itself: only rank 0 prints progress and the summary; global batch is logged."""
    _single(tmp_path / "one")
    half = list_checkpoints(tmp_path / "one")[0]
    out = tmp_path / "two"
    proc = torchrun("train", *RESUME, f"train.batch_size={B}", f"train.out_dir={out}", "parallel.strategy=zero2",
                    f"train.resume={half}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resumed from step 2") == 1 and proc.stderr.count("step      4  loss") == 1
    assert "global batch 256 tokens = 64 per micro-batch × 2 micro-batches × 2 ranks" in proc.stderr
    assert proc.stdout.count("summary.json") == 1  # the summary table, from rank 0 only
    straight, resumed = losses(tmp_path / "one"), losses(out)
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({s: straight[s] for s in (3, 4)}, rel=LOSS_RTOL)
    # export gathers the sharded checkpoint into whole tensors in one file
    export = hasten.export(out)
    weights = load_file(str(export / "model.safetensors"))
    tied = weights.get("tok_embeddings.weight", weights.get("output.weight"))  # stored once
    assert tied.shape == (320, 64) and weights["layers.1.ffn.w2.weight"].shape == (64, 192)
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert json.loads((export / "config.json").read_text())["model"]["dim"] == 64


def test_every_rank_reports_its_own_error(tmp_path, env):
    proc = torchrun("train", *COMMON, f"train.out_dir={tmp_path / 'bad'}", env=env)  # strategy none, 2 ranks
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"hasten: error: rank {rank}/2: 2 processes were launched but parallel.strategy=none" in proc.stderr


FAIL_ON_RANK_1 = """
import importlib, os
if os.environ.get("RANK") == "1":  # rank 1 fails at its first evaluation; rank 0 goes into the evaluation's all-reduce
    loop = importlib.import_module("hasten.train.loop")
    def evaluate(run, forward_loss):
        raise RuntimeError("injected failure on rank 1")
    loop.evaluate = evaluate
"""


def test_a_failure_on_one_rank_ends_the_launch_at_once(tmp_path, env):
    """The failing rank leaves without waiting for the others (which wait in a collective it never joins),
    and torchrun stops them and reports it: a barrier on the way out hung such a launch until the timeout."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "inject"), env.get("PYTHONPATH")]))}
    proc = torchrun("train", *COMMON, "train.eval_every=2", f"train.batch_size={B}", "parallel.strategy=ddp",
                    f"train.out_dir={tmp_path / 'run'}", env=env, timeout=120)
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in proc.stderr
    root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "injected failure on rank 1" in root_cause


def test_impossible_combinations_fail_early():
    with pytest.raises(hasten.ConfigError, match="CPU offload needs parallel.strategy=zero2 or zero3"):
        hasten.load_config("default", ["parallel.strategy=ddp", "parallel.cpu_offload=true"])
    with pytest.raises(hasten.ConfigError, match="needs a process group; launch with `torchrun"):
        hasten.train(hasten.load_config("default", [*COMMON, "parallel.strategy=zero3"]))
