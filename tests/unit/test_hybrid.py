"""Hybrid decoders from per-layer patterns: validation, cached generation, the shipped recipes
training through hasten.train with their extra loss terms logged, and exact resume."""

from __future__ import annotations

import math

import pytest
import torch

import hasten
from hasten.config import ConfigError, ModelConfig, load_config
from hasten.models import Attention, Mamba2, MoE, SwiGLU, build_model, generate
from hasten.train.checkpoint import list_checkpoints
from hasten.train.log import read_log
from tests.conftest import TINY

SMALL_SSM = ["model.n_layers=4", "model.ssm_state=16", "model.ssm_head_dim=16", "model.ssm_chunk=16",
             "model.num_experts=4", "optim.lr=3e-3"]


@pytest.mark.parametrize("fields, words", [
    (dict(mixers="MMA"), "one letter per layer, 4 letters"),
    (dict(mixers="MXAM"), "use only the letters A, M (found X)"),
    (dict(ffns="DEDEE"), "one letter per layer"),
    (dict(ffns="DEE"), "or a shorter pattern whose length divides it"),
    (dict(ffns="DDDd"), "use only the letters D, E (found d)"),
    (dict(ffns="DEDE", top_k=9), "model.top_k=9"),
    (dict(mixers="MMMM", ssm_head_dim=48), "model.ssm_head_dim=48"),
])
def test_pattern_validation_errors(fields, words):
    with pytest.raises(ConfigError, match="is not allowed") as err:
        ModelConfig(dim=64, n_layers=4, n_heads=4, **fields)
    assert words in str(err.value) and str(err.value).count(".") <= 3  # one sentence


def test_patterns_build_the_named_layers():
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, max_seq_len=32, mixers="MMAM", ffns="DEDE",
                      ssm_state=16, ssm_head_dim=16)
    model = build_model(cfg, 256)
    assert [type(b.mixer) for b in model.layers] == [Mamba2, Mamba2, Attention, Mamba2]
    assert [type(b.ffn) for b in model.layers] == [SwiGLU, MoE, SwiGLU, MoE]
    assert ModelConfig(dim=64, n_layers=3, n_heads=4).layer_mixers() == "AAA"


def test_hybrid_cached_generation_matches_recomputation():
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=24, mixers="MAM", ffns="EDE",
                      ssm_state=16, ssm_head_dim=16, ssm_chunk=8)
    torch.manual_seed(0)
    model = build_model(cfg, 256)
    cached = generate(model, [5, 6, 7, 8], 30, temperature=0.9, seed=3)
    model.new_cache = None
    assert generate(model, [5, 6, 7, 8], 30, temperature=0.9, seed=3) == cached


def _config(recipe, tmp_path, monkeypatch, *extra, out="run"):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    return load_config(recipe, [*TINY, *SMALL_SSM, f"train.out_dir={tmp_path / out}", *extra])


@pytest.mark.parametrize("recipe", ["moe", "mamba", "hybrid"])
def test_recipe_trains_and_loss_falls(recipe, tmp_path, monkeypatch):
    cfg = _config(recipe, tmp_path, monkeypatch, "train.steps=24", "log.every=4", "train.eval_every=24")
    summary = hasten.train(cfg)
    records = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert summary["completed"] and math.isfinite(summary["final_val_loss"])
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    if "E" in cfg.model.layer_ffns():  # aux terms are logged separately, and the total includes them
        assert {"ce", "moe_balance", "moe_z", "moe_dropped", "moe_max_load"} <= set(records[-1])
        assert records[-1]["loss"] > records[-1]["ce"] and records[-1]["moe_dropped"] == 0.0
        assert 0.9 < records[-1]["moe_balance"] < 2.0


def test_resume_with_moe_and_mamba_is_exact(tmp_path, monkeypatch):
    common = ("train.steps=6", "checkpoint.every=3", "log.every=1", "train.eval_every=6")
    hasten.train(_config("hybrid", tmp_path, monkeypatch, *common, out="straight"))
    half = list_checkpoints(tmp_path / "straight")[0]
    hasten.train(_config("hybrid", tmp_path, monkeypatch, *common, f"train.resume={half}", out="resumed"))

    def losses(name):
        return {r["step"]: (r["loss"], r["moe_balance"]) for r in read_log(tmp_path / name / "metrics.jsonl")
                if r["event"] == "train"}
    a, b = losses("straight"), losses("resumed")
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)


def test_a_short_pattern_repeats_over_the_layers():
    config = ModelConfig(dim=64, n_layers=4, n_heads=4, mixers="MA", ffns="E", ssm_head_dim=16)
    assert config.layer_mixers() == "MAMA" and config.layer_ffns() == "EEEE"
