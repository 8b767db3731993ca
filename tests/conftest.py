"""Shared fixtures: tiny runs on small, real data, with caches kept inside the test's tmp folder."""

from __future__ import annotations

import pytest

from hasten.config import load_config

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
